"""The session config: one YAML file per robot/cell/task, loaded into these frozen dataclasses.

A file has these sections (all but name optional)::

    name: sim_panda_reach
    seed: 0
    robot:    # what the robot server runs: backend, control clock, action scaling, safety, task, cameras
    server:   # where the robot server binds, message limits, CURVE keys
    env:      # how the actor's gymnasium env reaches the robot (zmq or in-process)
    learner:  # replay, SAC/RLPD, where the learner listens, checkpoints, warm start
    actor:    # the acting loop: exploration, evaluation, teleop, reward classifier, policy source
    ray:      # steerl train --ray: many simulated actors and the learner as Ray actors
    dashboard: # the operator console: the web page, its token, the actor's telemetry/command sockets

Units are SI (metres, radians, seconds) unless a field name says otherwise (``_ms``, ``_hz``).
"""

from __future__ import annotations

import ipaddress
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union
from urllib.parse import urlparse

from hardware_configs.loader import ConfigError, load_yaml

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = "sim_panda_pick_cube"

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class ControlConfig:
    """The robot server's control clock."""

    rate_hz: float = 10.0
    # sync: step as fast as possible, deterministic under a seed (training, tests).
    # realtime: the server's clock paces every step at rate_hz, as a real arm does.
    mode: Literal["sync", "realtime"] = "sync"

    def validate(self) -> None:
        if not 0.5 <= self.rate_hz <= 1000.0:
            raise ValueError(f"rate_hz must lie in [0.5, 1000], got {self.rate_hz}")

    @property
    def period_s(self) -> float:
        return 1.0 / self.rate_hz


@dataclass(frozen=True)
class ActionConfig:
    """How a normalised action in [-1, 1] maps to a motion of the tool centre point (TCP).

    The action vector is ``[dx, dy, dz, (dyaw,) gripper]``: deltas scaled by ``xyz_scale_m`` and
    ``yaw_scale_rad`` per control step, and an absolute gripper command (-1 open, +1 closed).
    """

    use_yaw: bool = False
    xyz_scale_m: float = 0.03
    yaw_scale_rad: float = 0.15
    # continuous: the gripper entry is a closing fraction ((g + 1) / 2). binary: closed when g > 0,
    # open otherwise, always with the full grasp force (a real parallel gripper's grasp/open; a
    # policy's exploration noise around +1 then cannot loosen a grasp).
    gripper: Literal["continuous", "binary"] = "continuous"

    def validate(self) -> None:
        if self.xyz_scale_m <= 0 or self.yaw_scale_rad <= 0:
            raise ValueError("xyz_scale_m and yaw_scale_rad must be positive")

    @property
    def dim(self) -> int:
        return 5 if self.use_yaw else 4


@dataclass(frozen=True)
class SafetyConfig:
    """Limits the robot server enforces on every command, whatever the client sends."""

    workspace_low: Vec3 = (0.30, -0.30, 0.02)
    workspace_high: Vec3 = (0.75, 0.30, 0.45)
    yaw_limits_rad: tuple[float, float] = (-math.pi / 2, math.pi / 2)
    max_step_xyz_m: float = 0.03
    max_step_yaw_rad: float = 0.2
    # No command for this long: the server holds the arm where it is.
    watchdog_ms: int = 500

    def validate(self) -> None:
        for axis, (lo, hi) in enumerate(zip(self.workspace_low, self.workspace_high)):
            if not lo < hi:
                raise ValueError(f"workspace_low[{axis}]={lo} must be below workspace_high[{axis}]={hi}")
        if not self.yaw_limits_rad[0] < self.yaw_limits_rad[1]:
            raise ValueError("yaw_limits_rad must be (low, high) with low < high")
        if self.max_step_xyz_m <= 0 or self.max_step_yaw_rad <= 0:
            raise ValueError("max_step_xyz_m and max_step_yaw_rad must be positive")
        if self.watchdog_ms <= 0:
            raise ValueError("watchdog_ms must be positive")


@dataclass(frozen=True)
class TaskConfig:
    """The task the backend scores. Real backends report no reward of their own (a reward
    classifier or the operator supplies it); the PyBullet cell implements these tasks."""

    name: Literal["reach", "pick_cube"] = "reach"
    max_episode_steps: int = 100
    # Reward = sparse success (0/1) + dense_reward_weight * shaping term in [-1, 0].
    dense_reward_weight: float = 0.0
    # Include simulator-only state (goal or cube pose) in the observation.
    privileged_state: bool = True
    # Uniform randomisation half-width (m) of the goal (reach) or cube (pick_cube) around its centre.
    randomise_xy_m: float = 0.10
    reach_tolerance_m: float = 0.03
    lift_height_m: float = 0.06
    # pick_cube's reach term: "distance" (3-D TCP-to-cube distance) or "aligned" (half of it
    # replaced by the horizontal distance, so that lining up above the cube pays at any height).
    reach_shaping: Literal["distance", "aligned"] = "distance"

    def validate(self) -> None:
        if self.max_episode_steps < 1:
            raise ValueError("max_episode_steps must be at least 1")
        if self.randomise_xy_m < 0:
            raise ValueError("randomise_xy_m must be non-negative")


@dataclass(frozen=True)
class CameraConfig:
    """One RGB camera in the observation as ``images/<name>`` (uint8, height x width x 3).

    A camera with an empty ``device`` is rendered by the simulator backend. A camera naming an
    entry of ``robot.camera_devices`` is an output of that physical camera: its frame is cropped
    to ``crop`` (source pixels; None: the whole frame) and resized to ``width`` x ``height``.
    Several cameras may name the same device (several crops of one view).
    """

    name: str
    width: int = 128
    height: int = 128
    device: str = ""
    # (x, y, width, height) of the region of the device's frame to keep, in capture pixels.
    crop: Optional[tuple[int, int, int, int]] = None

    def validate(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"camera name {self.name!r} must be a plain identifier")
        if not (8 <= self.width <= 4096 and 8 <= self.height <= 4096):
            raise ValueError(f"camera {self.name!r}: width and height must lie in [8, 4096]")
        if self.crop is not None:
            if not self.device:
                raise ValueError(f"camera {self.name!r}: crop applies only to a camera with a device")
            x, y, crop_width, crop_height = self.crop
            if x < 0 or y < 0 or crop_width < 1 or crop_height < 1:
                raise ValueError(f"camera {self.name!r}: crop {self.crop} must be (x >= 0, y >= 0, "
                                 "width >= 1, height >= 1)")


@dataclass(frozen=True)
class CameraDeviceConfig:
    """A physical camera the robot server opens (see robot_server/cameras.py).

    ``realsense`` selects an Intel RealSense by ``serial``; ``opencv`` opens any
    ``cv2.VideoCapture`` source: a device index (``0``) or a path or URL (a video file plays back
    at ``fps`` and ends). ``width``/``height``/``fps`` are the capture mode requested from the
    device; the cameras naming this device crop and resize its frames.
    """

    name: str
    driver: Literal["realsense", "opencv"]
    serial: str = ""
    source: Union[int, str] = ""
    width: int = 640
    height: int = 480
    fps: int = 30
    # Manual exposure in the driver's units (RealSense: the colour sensor's exposure option, e.g.
    # 166 = 16.6 ms on a D400 RGB sensor; OpenCV: CAP_PROP_EXPOSURE). None: auto exposure.
    exposure: Optional[float] = None
    # RealSense only: also stream depth, aligned to the colour frame (rs.align).
    depth: bool = False
    # A camera whose newest frame is older than this is stale.
    max_frame_age_ms: float = 100.0
    # Consecutive control steps a camera of this device may stay stale before the robot server
    # ends the episode (camera fault: truncated, arm held).
    max_stale_steps: int = 2

    def validate(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"camera device name {self.name!r} must be a plain identifier")
        if self.driver == "realsense" and not self.serial:
            raise ValueError(f"camera device {self.name!r}: serial is required for driver 'realsense'")
        if self.driver == "opencv" and self.source == "":
            raise ValueError(f"camera device {self.name!r}: source (index, path or URL) is required "
                             "for driver 'opencv'")
        if self.depth and self.driver != "realsense":
            raise ValueError(f"camera device {self.name!r}: depth is supported by driver 'realsense' only")
        if not (8 <= self.width <= 8192 and 8 <= self.height <= 8192):
            raise ValueError(f"camera device {self.name!r}: width and height must lie in [8, 8192]")
        if not 1 <= self.fps <= 1000:
            raise ValueError(f"camera device {self.name!r}: fps must lie in [1, 1000], got {self.fps}")
        if self.exposure is not None and self.exposure <= 0:
            raise ValueError(f"camera device {self.name!r}: exposure must be positive (or null for auto)")
        if self.max_frame_age_ms <= 0:
            raise ValueError(f"camera device {self.name!r}: max_frame_age_ms must be positive")
        if self.max_stale_steps < 0:
            raise ValueError(f"camera device {self.name!r}: max_stale_steps must be non-negative")


@dataclass(frozen=True)
class PyBulletConfig:
    """Simulator settings of the PyBullet cell."""

    physics_hz: float = 240.0
    gui: bool = False
    # Random joint-space noise (rad) added to the reset posture.
    reset_joint_noise_rad: float = 0.0


def _check_host(value: str, field_name: str) -> None:
    """``value`` is empty, an IP address or a host name (no scheme, port, path or spaces)."""
    if not value:
        return
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    labels = value.split(".")
    if not all(label and label[0].isalnum() and all(c.isalnum() or c == "-" for c in label) for label in labels):
        raise ValueError(f"{field_name}: {value!r} is neither an IP address nor a host name")


@dataclass(frozen=True)
class RealArmResetConfig:
    """How a real arm's reset pose is randomised each episode: uniform offsets of at most these
    half-widths around ``robot.reset_xyz`` / ``robot.reset_yaw_rad`` (clipped to the safety box)."""

    xyz_noise_m: Vec3 = (0.0, 0.0, 0.0)
    yaw_noise_rad: float = 0.0

    def validate(self) -> None:
        if any(value < 0 for value in self.xyz_noise_m) or self.yaw_noise_rad < 0:
            raise ValueError("xyz_noise_m and yaw_noise_rad must be non-negative")


@dataclass(frozen=True)
class FrankaConfig:
    """A Franka Emika Panda / FR3 through franky (pip package franky-control); see
    robot_server/backends/franka.py."""

    # The arm's FCI address; required with backend 'franka'.
    robot_ip: str = ""
    # impedance: franky's CartesianImpedanceTrackingMotion, a compliant torque-mode controller that
    #   tracks the newest target (contact-rich tasks, as in HIL-SERL).
    # cartesian_motion: a new CartesianMotion per step on Franka's stiff Cartesian pose interface.
    control: Literal["impedance", "cartesian_motion"] = "impedance"
    # Scale in (0, 1] of the arm's velocity, acceleration and jerk limits, for every motion.
    relative_dynamics_factor: float = 0.1
    # A further scale (multiplied by the one above) of the move to the reset pose.
    reset_dynamics_factor: float = 0.5
    # Impedance control: spring stiffness towards the target (N/m, Nm/rad), critically damped.
    translational_stiffness: float = 2000.0
    rotational_stiffness: float = 150.0
    # Impedance control: the pose error is clipped to this, so the largest spring force the arm
    # builds up against an obstacle is about stiffness x clip (2000 N/m x 0.02 m = 40 N).
    translational_error_clip_m: float = 0.02
    rotational_error_clip_rad: float = 0.15
    # Contact reflexes: a joint torque (Nm) or TCP force (N) above these stops the arm.
    collision_torque_threshold_nm: float = 20.0
    collision_force_threshold_n: float = 30.0
    gripper: bool = True
    gripper_speed_mps: float = 0.1
    gripper_force_n: float = 40.0
    gripper_max_width_m: float = 0.08
    # A gripper command (0 open .. 1 closed) at or above this grasps, below it opens.
    gripper_close_threshold: float = 0.5
    reset: RealArmResetConfig = field(default_factory=RealArmResetConfig)

    def validate(self) -> None:
        _check_host(self.robot_ip, "robot_ip")
        for name in ("relative_dynamics_factor", "reset_dynamics_factor"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        if not 0.0 < self.translational_stiffness <= 3000.0:
            raise ValueError(f"translational_stiffness must lie in (0, 3000] N/m, got {self.translational_stiffness}")
        if not 0.0 < self.rotational_stiffness <= 300.0:
            raise ValueError(f"rotational_stiffness must lie in (0, 300] Nm/rad, got {self.rotational_stiffness}")
        for name in ("translational_error_clip_m", "rotational_error_clip_rad", "collision_torque_threshold_nm",
                     "collision_force_threshold_n", "gripper_speed_mps"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.gripper_force_n <= 140.0:
            raise ValueError(f"gripper_force_n must lie in (0, 140] N, got {self.gripper_force_n}")
        if not 0.0 < self.gripper_max_width_m <= 0.3:
            raise ValueError(f"gripper_max_width_m must lie in (0, 0.3] m, got {self.gripper_max_width_m}")
        if not 0.0 < self.gripper_close_threshold < 1.0:
            raise ValueError(f"gripper_close_threshold must lie in (0, 1), got {self.gripper_close_threshold}")


@dataclass(frozen=True)
class URConfig:
    """A Universal Robots arm (CB3, e-Series) through ur_rtde (pip package ur-rtde); see
    robot_server/backends/ur.py. Poses are in the controller's base frame."""

    # The controller's IP address; required with backend 'ur'.
    robot_ip: str = ""
    # servoL: stream pose targets (RTDEControlInterface.servoL). speedL: stream TCP velocities that
    # close the pose error within one control period (RTDEControlInterface.speedL).
    control: Literal["servoL", "speedL"] = "servoL"
    # RTDE frequency (Hz) of the control and receive interfaces; 0: ur_rtde's default
    # (500 Hz on e-Series, 125 Hz on CB3).
    rtde_frequency_hz: float = 0.0
    # servoL: how long each target controls the arm (s); 0: one control period.
    servo_time_s: float = 0.0
    # servoL: lookahead time (s, [0.03, 0.2]) smooths the trajectory; gain ([100, 2000]) is the
    # proportional gain for following the target.
    servo_lookahead_time_s: float = 0.1
    servo_gain: float = 300.0
    # servoL's velocity (m/s) and acceleration (m/s^2) arguments (unused by current ur_rtde versions,
    # passed as documented).
    servo_velocity_mps: float = 0.25
    servo_acceleration_mps2: float = 0.5
    # speedL: the largest commanded TCP speeds and the acceleration towards them.
    speed_max_mps: float = 0.25
    speed_max_radps: float = 1.0
    speed_acceleration_mps2: float = 0.5
    # hold: deceleration of servoStop / speedStop (m/s^2).
    stop_deceleration_mps2: float = 10.0
    # reset: the moveL to the reset pose.
    reset_speed_mps: float = 0.1
    reset_acceleration_mps2: float = 0.3
    # The gripper: none, or one digital output of the controller (tool: pins 0-1, standard: 0-7)
    # switching a pneumatic or simple electric gripper; other grippers plug into URArm(gripper=...).
    gripper: Literal["none", "tool_digital_output", "standard_digital_output"] = "tool_digital_output"
    gripper_pin: int = 0
    # The output level that closes the gripper.
    gripper_close_level: bool = True
    gripper_max_width_m: float = 0.085
    # A gripper command (0 open .. 1 closed) at or above this closes, below it opens.
    gripper_close_threshold: float = 0.5
    reset: RealArmResetConfig = field(default_factory=RealArmResetConfig)

    def validate(self) -> None:
        _check_host(self.robot_ip, "robot_ip")
        if self.rtde_frequency_hz != 0.0 and not 1.0 <= self.rtde_frequency_hz <= 500.0:
            raise ValueError("rtde_frequency_hz must be 0 (ur_rtde's default) or lie in [1, 500], "
                             f"got {self.rtde_frequency_hz}")
        if self.servo_time_s < 0.0:
            raise ValueError(f"servo_time_s must be non-negative (0: one control period), got {self.servo_time_s}")
        if not 0.03 <= self.servo_lookahead_time_s <= 0.2:
            raise ValueError("servo_lookahead_time_s must lie in [0.03, 0.2] (ur_rtde's range), "
                             f"got {self.servo_lookahead_time_s}")
        if not 100.0 <= self.servo_gain <= 2000.0:
            raise ValueError(f"servo_gain must lie in [100, 2000] (ur_rtde's range), got {self.servo_gain}")
        for name in ("servo_velocity_mps", "servo_acceleration_mps2", "speed_max_mps", "speed_max_radps",
                     "speed_acceleration_mps2", "stop_deceleration_mps2", "reset_speed_mps", "reset_acceleration_mps2"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        pins = {"tool_digital_output": 2, "standard_digital_output": 8}.get(self.gripper)
        if pins is not None and not 0 <= self.gripper_pin < pins:
            raise ValueError(f"gripper_pin must lie in [0, {pins - 1}] for gripper {self.gripper!r}, "
                             f"got {self.gripper_pin}")
        if not 0.0 < self.gripper_max_width_m <= 0.3:
            raise ValueError(f"gripper_max_width_m must lie in (0, 0.3] m, got {self.gripper_max_width_m}")
        if not 0.0 < self.gripper_close_threshold < 1.0:
            raise ValueError(f"gripper_close_threshold must lie in (0, 1), got {self.gripper_close_threshold}")


REAL_ARM_BACKENDS = ("franka", "ur")


@dataclass(frozen=True)
class RobotConfig:
    """Everything the robot server needs to run the robot."""

    # pybullet, kinematic: simulated. franka (franky), ur (ur_rtde): real arms, see their sections.
    backend: Literal["pybullet", "kinematic", "franka", "ur"] = "pybullet"
    reset_xyz: Vec3 = (0.50, 0.0, 0.25)
    reset_yaw_rad: float = 0.0
    control: ControlConfig = field(default_factory=ControlConfig)
    action: ActionConfig = field(default_factory=ActionConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    cameras: tuple[CameraConfig, ...] = ()
    # Physical cameras (real hardware path); cameras name them in their ``device`` field.
    camera_devices: tuple[CameraDeviceConfig, ...] = ()
    pybullet: PyBulletConfig = field(default_factory=PyBulletConfig)
    franka: FrankaConfig = field(default_factory=FrankaConfig)
    ur: URConfig = field(default_factory=URConfig)

    def _validate_real_arm(self) -> None:
        """Rules of the real-arm backends: an address, the wall clock, cameras from devices."""
        if self.backend not in REAL_ARM_BACKENDS:
            return
        section = self.franka if self.backend == "franka" else self.ur
        if not section.robot_ip:
            raise ValueError(f"{self.backend}.robot_ip: required with backend {self.backend!r} "
                             "(the address of the arm's controller)")
        if self.control.mode != "realtime":
            raise ValueError(f"control.mode: backend {self.backend!r} is a real arm that moves on the wall "
                             "clock; set control.mode: realtime")
        for index, camera in enumerate(self.cameras):
            if not camera.device:
                raise ValueError(f"cameras[{index}].device: camera {camera.name!r} needs a device with "
                                 f"backend {self.backend!r} (a real arm renders no images)")

    def validate(self) -> None:
        self._validate_real_arm()
        low, high = self.safety.workspace_low, self.safety.workspace_high
        if not all(lo <= x <= hi for x, lo, hi in zip(self.reset_xyz, low, high)):
            raise ValueError(
                f"reset_xyz {self.reset_xyz} lies outside the workspace box {low} .. {high}"
            )
        names = [camera.name for camera in self.cameras]
        if len(set(names)) != len(names):
            raise ValueError(f"camera names must be unique, got {names}")
        device_names = [device.name for device in self.camera_devices]
        if len(set(device_names)) != len(device_names):
            raise ValueError(f"camera_devices names must be unique, got {device_names}")
        devices = {device.name: device for device in self.camera_devices}
        for index, camera in enumerate(self.cameras):
            if not camera.device:
                continue
            device = devices.get(camera.device)
            if device is None:
                known = ", ".join(device_names) or "none configured"
                raise ValueError(f"cameras[{index}].device: {camera.device!r} is not an entry of "
                                 f"camera_devices (known: {known})")
            if camera.crop is not None:
                x, y, crop_width, crop_height = camera.crop
                if x + crop_width > device.width or y + crop_height > device.height:
                    raise ValueError(
                        f"cameras[{index}].crop: {camera.crop} (x, y, width, height) exceeds the "
                        f"{device.width}x{device.height} capture of camera device {device.name!r}"
                    )

    @property
    def simulated_cameras(self) -> tuple[CameraConfig, ...]:
        """The cameras the backend renders itself (no ``device``)."""
        return tuple(camera for camera in self.cameras if not camera.device)


@dataclass(frozen=True)
class CurveServerKeys:
    """CURVE keys of a robot server (files made by ``steerl keys generate``)."""

    secret_key_file: str
    # Directory of the public keys (``*.key``) of clients allowed to connect.
    authorized_keys_dir: str


@dataclass(frozen=True)
class CurveClientKeys:
    """CURVE keys of a client: its own key pair and the server's public key."""

    secret_key_file: str
    server_public_key_file: str


def is_loopback(address: str) -> bool:
    """Whether a ZeroMQ endpoint stays on this machine (loopback host, ipc:// or inproc://)."""
    parsed = urlparse(address)
    if parsed.scheme in ("ipc", "inproc"):
        return True
    host = (parsed.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """Where the robot server listens and what it accepts."""

    address: str = "tcp://127.0.0.1:5555"
    max_message_bytes: int = 8 * 1024 * 1024
    # A controlling client silent for this long loses control to the next one that asks.
    controller_lease_ms: int = 3000
    curve: Optional[CurveServerKeys] = None

    def validate(self) -> None:
        if urlparse(self.address).scheme not in ("tcp", "ipc", "inproc"):
            raise ValueError(f"address {self.address!r} must start with tcp://, ipc:// or inproc://")
        if not is_loopback(self.address) and self.curve is None:
            raise ValueError(
                f"address {self.address!r} binds beyond loopback: set server.curve keys "
                "(steerl keys generate) so that only authorised clients can command the robot"
            )
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")


def _check_endpoint(address: str) -> None:
    if urlparse(address).scheme not in ("tcp", "ipc", "inproc"):
        raise ValueError(f"address {address!r} must start with tcp://, ipc:// or inproc://")


@dataclass(frozen=True)
class PolicyServerConfig:
    """The policy server (``steerl policy-server``, learner side): samples actions for actors whose
    policy needs a GPU (learner/policy_server.py)."""

    address: str = "tcp://127.0.0.1:5570"
    max_message_bytes: int = 64 * 1024 * 1024
    # After a request arrives, wait up to this long for requests of other actors, to sample them in
    # one call (0: serve what has arrived). The wait ends early once every recently active client
    # has a request pending, so a single actor never waits.
    batch_wait_ms: float = 2.0
    # The most observations in one sample call (and in one batched request).
    max_batch_size: int = 64
    # The largest number of samples K a request may ask for.
    max_samples: int = 256
    curve: Optional[CurveServerKeys] = None

    def validate(self) -> None:
        _check_endpoint(self.address)
        if not is_loopback(self.address) and self.curve is None:
            raise ValueError(f"address {self.address!r} binds beyond loopback: set curve keys (steerl keys "
                             "generate) so that only authorised actors reach the policy")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")
        if not 0.0 <= self.batch_wait_ms <= 1000.0:
            raise ValueError(f"batch_wait_ms must lie in [0, 1000], got {self.batch_wait_ms}")
        if self.max_batch_size < 1 or self.max_samples < 1:
            raise ValueError("max_batch_size and max_samples must be at least 1")


@dataclass(frozen=True)
class PolicyClientConfig:
    """How the actor reaches a policy server (``actor.policy_source: remote``)."""

    address: str = "tcp://127.0.0.1:5570"
    # Deadline of each action request. Without a reply by then the actor holds the arm for this
    # step (actor/remote_policy.py) and asks again on the next one. Keep it below the control
    # period to keep the loop's rate, and below robot.safety.watchdog_ms.
    timeout_ms: int = 150
    # At start-up, how long the actor waits for the server's handshake (loading a large policy takes
    # a while); a server that does not answer by then stops the actor with an error.
    connect_timeout_ms: int = 120_000
    # The language instruction sent with every request (OpenVLA); "" for none.
    instruction: str = ""
    # The policy kind the actor expects ("openvla", "sac"...); "" accepts any. A server serving
    # another kind is refused at the handshake.
    policy_kind: str = ""
    max_message_bytes: int = 64 * 1024 * 1024
    curve: Optional[CurveClientKeys] = None

    def validate(self) -> None:
        _check_endpoint(self.address)
        if self.timeout_ms <= 0 or self.connect_timeout_ms <= 0:
            raise ValueError("timeout_ms and connect_timeout_ms must be positive")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")


@dataclass(frozen=True)
class EnvConfig:
    """How the actor's gymnasium env reaches the robot."""

    # zmq: talk to a robot server process. inproc: run the backend inside the actor process.
    connection: Literal["zmq", "inproc"] = "zmq"
    address: str = "tcp://127.0.0.1:5555"
    timeout_ms: int = 5000
    curve: Optional[CurveClientKeys] = None

    def validate(self) -> None:
        if self.timeout_ms <= 0:
            raise ValueError("timeout_ms must be positive")


@dataclass(frozen=True)
class ImageEncoderConfig:
    """How camera images enter the networks (one encoder per camera, shared by actor and critic)."""

    # small_cnn: a 4-layer CNN trained with the critic. pretrained: a frozen TorchScript backbone
    # loaded from pretrained_path (features computed once per batch, no gradient).
    kind: Literal["small_cnn", "pretrained"] = "small_cnn"
    pretrained_path: str = ""
    channels: int = 32
    # One 3x3 convolution per entry, with that stride (DrQ/SERL: 2, 1, 1, 1). Larger strides cut
    # the convolution cost roughly by their square (what a CPU-only learner needs).
    strides: tuple[int, ...] = (2, 1, 1, 1)
    latent_dim: int = 64
    # How the small CNN's feature map becomes a vector. flatten (DrQ/SERL): every activation into
    # the projection; its weight grows with the image (about 20 MB per 128x128 camera).
    # spatial_softmax: one expected (x, y) keypoint per channel (2 x channels values): a few KB,
    # independent of the image size.
    pooling: Literal["flatten", "spatial_softmax"] = "flatten"
    # DrQ random shift: pad by this many pixels, crop back at a random offset (0 disables).
    augment_pad: int = 4

    def validate(self) -> None:
        if self.kind == "pretrained" and not self.pretrained_path:
            raise ValueError("kind 'pretrained' needs pretrained_path")
        if self.latent_dim < 1 or self.channels < 1 or self.augment_pad < 0:
            raise ValueError("channels and latent_dim must be positive, augment_pad non-negative")
        if not self.strides or not all(1 <= stride <= 4 for stride in self.strides):
            raise ValueError(f"strides must be a non-empty list of values in [1, 4], got {list(self.strides)}")


@dataclass(frozen=True)
class GripperCriticConfig:
    """HIL-SERL's discrete gripper head: close / stay / open, trained by double DQN."""

    enabled: bool = False
    # Subtracted from the gripper critic's reward each time the gripper changes state.
    toggle_penalty: float = 0.1
    # Epsilon-greedy exploration of the gripper in training actions (never in evaluation): with
    # this probability per step a uniformly drawn open/stay/close replaces the head's greedy
    # choice, so that the online critic also sees the choices its policy would not take.
    exploration_epsilon: float = 0.1
    # Weight of a conservative term on the gripper head in online training (SAC/RLPD/WSRL):
    # w * mean[logsumexp_c G(s, c) - G(s, c_executed)], Cal-QL's gripper term without the
    # calibration. 0 is plain double DQN; Cal-QL pre-training uses its own term (alpha_cql) instead.
    conservative_weight: float = 0.0


@dataclass(frozen=True)
class SACConfig:
    """SAC / RLPD hyper-parameters (see learner/sac.py for the math)."""

    hidden_dims: tuple[int, ...] = (256, 256)
    num_critics: int = 2
    # The TD target takes the min over a random subset of this many target critics (REDQ/RLPD).
    critic_subset: int = 2
    layer_norm: bool = True
    discount: float = 0.99
    tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    temperature_lr: float = 3e-4
    init_temperature: float = 1.0
    # None: -action_dim / 2 (RLPD's choice).
    target_entropy: Optional[float] = None
    # Include the entropy bonus of the next action in the TD target.
    backup_entropy: bool = True
    batch_size: int = 256
    # Critic updates per environment step; the actor and temperature update once per step.
    utd_ratio: int = 1
    # Standardise the state fields with a mean and standard deviation measured once, on the demos
    # and the first online transitions, before the first update (then frozen and published with
    # the policy). Raw positions in metres differ by centimetres; unscaled, an MLP learns slowly.
    normalize_state: bool = True
    # Floor of a feature's standard deviation (a nearly constant feature is not blown up to noise).
    state_min_std: float = 0.01
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    gripper_critic: GripperCriticConfig = field(default_factory=GripperCriticConfig)

    def validate(self) -> None:
        if not 1 <= self.critic_subset <= self.num_critics:
            raise ValueError(f"critic_subset must lie in [1, num_critics={self.num_critics}]")
        if not 0.0 < self.discount < 1.0:
            raise ValueError("discount must lie in (0, 1)")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError("tau must lie in (0, 1]")
        if self.batch_size < 1 or self.utd_ratio < 1:
            raise ValueError("batch_size and utd_ratio must be at least 1")
        if not self.state_min_std > 0.0:
            raise ValueError("state_min_std must be positive")
        if not self.gripper_critic.conservative_weight >= 0.0:
            raise ValueError("gripper_critic.conservative_weight must be >= 0, got "
                             f"{self.gripper_critic.conservative_weight}")
        if not 0.0 <= self.gripper_critic.exploration_epsilon <= 1.0:
            raise ValueError("gripper_critic.exploration_epsilon must lie in [0, 1], got "
                             f"{self.gripper_critic.exploration_epsilon}")


@dataclass(frozen=True)
class WarmStartConfig:
    """WSRL (learner/wsrl.py): fine-tune online from an offline checkpoint, without its data.

    The path of ``checkpoint`` is checked where the learner runs (``steerl train``/``steerl
    learner`` and the learner itself), not when the file is loaded: the actor's machine reads the
    same config file and has no copy of the checkpoint.
    """

    # A learner or Cal-QL checkpoint (ckpt-<n>/) or a run directory (its newest checkpoint);
    # "" for no warm start. --warm-start overrides it.
    checkpoint: str = ""
    # Online transitions collected with the pre-trained policy before the first update; replaces
    # learner.learning_starts (and the actor takes no random steps). --warmup-steps overrides it.
    warmup_steps: int = 5000
    # With a warm start, the share of each minibatch drawn from offline_data (and --demos); the
    # rest is online data. 0 is WSRL's choice: the offline data is discarded.
    offline_ratio: float = 0.0
    # Replay buffer directories (steerl record-demos, a checkpoint's online/) sampled at
    # offline_ratio; needed when offline_ratio > 0.
    offline_data: tuple[str, ...] = ()
    # The first this-many updates after the warm-up train the critics only (the actor and the
    # temperature wait): the pre-trained critics recalibrate to the online returns before the
    # pre-trained policy follows their gradients. 0 is WSRL's choice.
    actor_delay_updates: int = 0
    # Keep the checkpoint's Adam moments (WSRL restores the whole agent state); false starts the
    # optimisers afresh. The learning rates are always this config's.
    load_optimizers: bool = True
    # Start from sac.init_temperature instead of the checkpoint's temperature. WSRL keeps the
    # pre-trained temperature; a reset makes the first online episodes explore more, at the risk
    # of unlearning what the policy knew.
    reset_temperature: bool = False
    # Q-values of the online batches (data actions, policy actions, TD targets) are logged for
    # each of the first q_log_updates updates after the warm-up, then every q_log_every updates
    # (0: never), to TensorBoard, the learner log and RUN_DIR/warm_start_q.json.
    q_log_updates: int = 50
    q_log_every: int = 1000

    @property
    def enabled(self) -> bool:
        return bool(self.checkpoint)

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be non-negative, got {self.warmup_steps}")
        if self.actor_delay_updates < 0:
            raise ValueError(f"actor_delay_updates must be non-negative, got {self.actor_delay_updates}")
        if not 0.0 <= self.offline_ratio < 1.0:
            raise ValueError(f"offline_ratio must lie in [0, 1), got {self.offline_ratio}")
        if self.offline_ratio > 0.0 and not self.offline_data:
            raise ValueError(f"offline_ratio {self.offline_ratio:g} needs offline_data (replay buffer "
                             "directories to draw that share of each batch from)")
        if self.q_log_updates < 0 or self.q_log_every < 0:
            raise ValueError("q_log_updates and q_log_every must be non-negative")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class PARLConfig:
    """PA-RL hyper-parameters (the math is in learner/parl.py's docstring); validated on
    construction, errors name the field (``PARLConfig.top_k: ...``). In a session config it is
    ``learner.parl`` (with ``learner.algorithm: parl``): the critic is then built from
    ``learner.sac`` and reads ``learner.observation_keys``."""

    # -- the session (steerl train with learner.algorithm: parl)
    #: The policy directory to fine-tune (steerl train-bc output, or any DistillablePolicy's).
    base_policy: str = ""
    #: One distillation iteration (``distill_steps`` supervised steps) after this many updates.
    distill_every_updates: int = 1

    # -- action optimisation
    #: N, base-policy samples per state (one ``sample`` call for the whole batch).
    num_samples: int = 32
    #: k, samples kept by critic value for the local optimisation.
    top_k: int = 10
    #: T, gradient-ascent steps on the kept actions (0: global optimisation only).
    local_steps: int = 10
    #: eta, the step size of a <- clip(a + eta grad_a Q, -1, 1).
    local_step_size: float = 3e-4
    #: How the ensemble's values combine: "mean" (the authors') or "min".
    critic_reduction: Literal["mean", "min"] = "mean"
    #: The agent's critic that steers the optimisation: "online" (the authors') or "target".
    optimize_with: Literal["online", "target"] = "online"
    #: beta: acting draws among the k with P proportional to exp(Q / beta); 0 takes the argmax.
    action_temperature: float = 1.0

    # -- distillation
    #: Supervised steps on the base policy per PA-RL iteration (``PARLAgent.distill``).
    distill_steps: int = 1
    #: (observation, optimised action) pairs per distillation step.
    distill_batch: int = 32
    #: AdamW learning rate of the distillation (the diffusion weights or the LoRA adapters).
    distill_lr: float = 3e-4
    #: Gradients of a distillation step are clipped to this global norm (0: no clipping).
    distill_grad_clip_norm: float = 1.0
    #: The newest this many pairs are kept for distillation (on the CPU).
    distill_buffer_size: int = 10_000

    # -- LoRA adapters (OpenVLA)
    lora_rank: int = 32
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    #: Module names peft adapts; ("all-linear",) is every linear layer but the output head.
    lora_target_modules: tuple[str, ...] = ("all-linear",)

    #: Seeds the distillation's batches and noise and the acting draws.
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.lora_target_modules, (list, str)):
            targets = (self.lora_target_modules,) if isinstance(self.lora_target_modules, str) \
                else tuple(self.lora_target_modules)
            object.__setattr__(self, "lora_target_modules", targets)
        self.validate()

    def validate(self) -> None:
        def need(condition: bool, name: str, rule: str) -> None:
            if not condition:
                raise ValueError(f"PARLConfig.{name}: {rule}, got {getattr(self, name)!r}")

        for name in ("num_samples", "top_k", "distill_steps", "distill_batch", "distill_buffer_size", "lora_rank",
                     "distill_every_updates"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(self.top_k <= self.num_samples, "top_k", f"must not exceed num_samples ({self.num_samples})")
        need(_is_int(self.local_steps) and self.local_steps >= 0, "local_steps", "must be an integer >= 0")
        need(_is_real(self.local_step_size) and self.local_step_size >= 0, "local_step_size",
             "must be a finite number >= 0")
        need(self.critic_reduction in ("mean", "min"), "critic_reduction", "must be one of mean, min")
        need(self.optimize_with in ("online", "target"), "optimize_with", "must be one of online, target")
        need(_is_real(self.action_temperature) and self.action_temperature >= 0, "action_temperature",
             "must be a finite number >= 0 (0: argmax)")
        need(_is_real(self.distill_lr) and self.distill_lr > 0, "distill_lr", "must be a positive number")
        need(_is_real(self.distill_grad_clip_norm) and self.distill_grad_clip_norm >= 0, "distill_grad_clip_norm",
             "must be a number >= 0 (0: no clipping)")
        need(_is_real(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "must be a positive number")
        need(_is_real(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", "must lie in [0, 1)")
        need(len(self.lora_target_modules) > 0
             and all(isinstance(name, str) and name for name in self.lora_target_modules),
             "lora_target_modules", "must be a non-empty list of module names")
        need(_is_int(self.seed), "seed", "must be an integer")

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-able data (checkpoint metadata)."""
        from hardware_configs.loader import to_dict

        return to_dict(self)


@dataclass(frozen=True)
class LearnerConfig:
    """The learner process: what it trains on, where it listens, how often it publishes."""

    # sac: SAC/RLPD trains the Gaussian policy the actor runs (learner/sac.py). parl: PA-RL
    # fine-tunes the base policy of learner.parl with a critic built from learner.sac; the actor
    # runs the base policy steered by that critic (learner/parl.py).
    algorithm: Literal["sac", "parl"] = "sac"
    sac: SACConfig = field(default_factory=SACConfig)
    parl: PARLConfig = field(default_factory=PARLConfig)
    # Observation fields the networks see; empty: every field of the robot's observation.
    observation_keys: tuple[str, ...] = ()
    replay_capacity: int = 200_000
    # Share of each batch drawn from demonstrations: the demo buffer and the operator's
    # interventions together (when they hold data).
    demo_ratio: float = 0.5
    # Capacity of the buffer of intervened transitions (HIL-SERL: they also count as demos).
    intervention_capacity: int = 50_000
    # Online transitions before the first update.
    learning_starts: int = 500
    # Transitions in, weights out (the actor connects here).
    address: str = "tcp://127.0.0.1:5560"
    # CURVE keys of the learner's socket: required when it binds beyond loopback (the learner
    # refuses to start without them); actors then need actor.learner_curve.
    curve: Optional[CurveServerKeys] = None
    publish_every_updates: int = 50
    checkpoint_every_updates: int = 5000
    run_dir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads for the updates; 0: all cores but one (the actor and the simulator need one).
    num_threads: int = 0
    # The policy server (steerl policy-server) for actors with actor.policy_source: remote.
    policy_server: PolicyServerConfig = field(default_factory=PolicyServerConfig)
    # WSRL: start from an offline (e.g. Cal-QL) checkpoint and fine-tune online (learner/wsrl.py).
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)

    def validate(self) -> None:
        if not 0.0 <= self.demo_ratio < 1.0:
            raise ValueError("demo_ratio must lie in [0, 1)")
        if self.replay_capacity < 1000:
            raise ValueError("replay_capacity must be at least 1000")
        if self.intervention_capacity < 100:
            raise ValueError("intervention_capacity must be at least 100")
        if self.algorithm == "parl":
            if not self.parl.base_policy:
                raise ValueError("parl.base_policy: algorithm parl fine-tunes a base policy: give its directory")
            if self.sac.gripper_critic.enabled:
                raise ValueError("sac.gripper_critic.enabled: PA-RL optimises every action dimension with the "
                                 "continuous critic; the discrete gripper head is not supported")
            if self.warm_start.enabled:
                raise ValueError("warm_start: a warm start loads a SAC/Cal-QL policy and critic; with algorithm parl "
                                 "the base policy acts (warm-starting PA-RL's critic is not supported yet)")


@dataclass(frozen=True)
class ActorConfig:
    """The acting loop on the robot PC."""

    # Uniform random actions for this many env steps before the policy acts (when no demos; none
    # with learner.warm_start: the pre-trained policy acts from the first step).
    random_steps: int = 1000
    # Evaluate the deterministic policy for eval_episodes every eval_every_episodes (0: never).
    eval_every_episodes: int = 20
    eval_episodes: int = 10
    # Simulation only: before each episode, wait until the learner has made at least one update
    # per this many env steps (after learning_starts), so a fast simulator cannot outrun the
    # learner's update-to-data ratio. 0 disables it (real robots never wait).
    max_steps_per_update: float = 0.0
    # Bound of the queue of unacknowledged transitions (MiB) while the learner is away.
    send_queue_mb: int = 2048
    timeout_ms: int = 2000
    # Teleop device for human interventions and operator events: a bundled name (keyboard,
    # gamepad_xbox, spacemouse, simulated_operator) or a YAML path; "" for none. --teleop overrides it.
    teleop: str = ""
    # A reward classifier file (steerl train-reward-classifier): its success decision replaces the
    # robot's reward and ends the episode; "" keeps the robot's reward.
    reward_classifier: str = ""
    # Success when p(success) >= this; None: the threshold stored in the classifier file.
    reward_threshold: Optional[float] = None
    # Extra conditions on the observation for a success, e.g. ["gripper_width[0] < 0.06"].
    reward_proprio_checks: tuple[str, ...] = ()
    # Where the actions come from: local, the policy the learner publishes, run in this process;
    # remote, a policy server (policy_server below) for policies that need a GPU. On a timeout, an
    # error or a server away, a remote policy holds the arm (zero motion), never repeats an action.
    # random_steps applies to both (set it to 0 to let a remote policy act from the first step).
    policy_source: Literal["local", "remote"] = "local"
    policy_server: PolicyClientConfig = field(default_factory=PolicyClientConfig)
    # CURVE keys for the link to a learner that binds beyond loopback (learner.curve).
    learner_curve: Optional[CurveClientKeys] = None

    def validate(self) -> None:
        if self.max_steps_per_update < 0:
            raise ValueError("max_steps_per_update must be non-negative")
        if self.reward_threshold is not None and not 0.0 <= self.reward_threshold <= 1.0:
            raise ValueError(f"reward_threshold must lie in [0, 1], got {self.reward_threshold}")
        if self.reward_proprio_checks and not self.reward_classifier:
            raise ValueError("reward_proprio_checks need a reward_classifier")


@dataclass(frozen=True)
class RayConfig:
    """``steerl train --ray`` (tools/ray_session.py): the learner, ``num_actors`` simulated actors and
    optionally a policy server as Ray actors. Data still flows over the actor <-> learner ZeroMQ
    protocol; Ray only places, starts, watches and restarts the processes."""

    enabled: bool = False
    # "": start a local Ray instance on this machine; "auto" or "HOST:PORT": join that running cluster.
    address: str = ""
    num_actors: int = 2
    # Ray's CPU accounting per simulated actor and for the learner (a local instance is given at
    # least what they add up to, so they all start even on a small machine: they then share cores).
    actor_cpus: float = 1.0
    learner_cpus: float = 1.0
    # GPUs for the learner (and the policy server); None: one when the cluster has a GPU and
    # learner.device is not "cpu", else none. Actors never get one.
    learner_gpus: Optional[float] = None
    # Each actor's PyBullet cell: in the actor's own process (inproc), or behind a robot server
    # child process of its own on a free port (server: the same sockets as a real robot).
    actor_env: Literal["inproc", "server"] = "inproc"
    # A policy directory (steerl policy-server --policy): served by a Ray actor; the simulated
    # actors then take their actions from it (actor.policy_source: remote). "": none.
    policy_server: str = ""
    # How often Ray restarts a dead actor (it resumes its episode numbering from the learner) and
    # a dead learner (it resumes from its last checkpoint and its transition log).
    max_actor_restarts: int = 3
    max_learner_restarts: int = 2
    # A local instance's object store (MiB): weights and transitions never pass through it.
    object_store_mb: int = 256

    def validate(self) -> None:
        if self.num_actors < 1:
            raise ValueError(f"num_actors must be at least 1, got {self.num_actors}")
        if self.actor_cpus < 0 or self.learner_cpus < 0:
            raise ValueError("actor_cpus and learner_cpus must be non-negative")
        if self.learner_gpus is not None and self.learner_gpus < 0:
            raise ValueError(f"learner_gpus must be non-negative, got {self.learner_gpus}")
        if self.max_actor_restarts < 0 or self.max_learner_restarts < 0:
            raise ValueError("max_actor_restarts and max_learner_restarts must be non-negative")
        if self.object_store_mb < 80:
            raise ValueError(f"object_store_mb must be at least 80 (Ray's minimum), got {self.object_store_mb}")


@dataclass(frozen=True)
class DashboardConfig:
    """The operator console (``steerl dashboard``, ``steerl train --dashboard``, ``steerl deploy``).

    The actor publishes its telemetry and takes operator commands on two loopback sockets; the
    dashboard process beside it serves the web page over HTTP and WebSockets. The page is bound to
    loopback by default; a ``host`` beyond it needs a token (``token``, or the environment variable
    named by ``token_env``), and every request without it is refused."""

    host: str = "127.0.0.1"
    port: int = 8765
    # The shared secret that a page served beyond loopback must present; "" for none.
    token: str = ""
    token_env: str = "STEERL_DASHBOARD_TOKEN"
    # Actor-side sockets (loopback only): telemetry (PUB) and operator commands (PULL).
    telemetry_address: str = "tcp://127.0.0.1:5570"
    command_address: str = "tcp://127.0.0.1:5571"
    # At most this many telemetry messages (with camera images) a second leave the actor.
    telemetry_hz: float = 10.0
    jpeg_quality: int = 80
    # Where the page lists checkpoints and where sessions it starts write (default: learner.run_dir).
    runs_dir: str = ""
    # The dashboard process lowers its CPU priority by this much (os.nice), so that on the robot PC
    # the robot server and the actor's control loop win any contention with JPEG encoding.
    niceness: int = 10

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must lie in 1..65535, got {self.port}")
        for name in ("telemetry_address", "command_address"):
            address = getattr(self, name)
            if not address.startswith(("tcp://", "ipc://")):
                raise ValueError(f"{name} must be a tcp:// or ipc:// endpoint, got {address!r}")
            if not is_loopback(address):
                raise ValueError(f"{name} must stay on this machine (loopback), got {address!r}: the dashboard "
                                 "runs beside the actor and serves the page beyond it with a token")
        if self.telemetry_address == self.command_address:
            raise ValueError("telemetry_address and command_address must differ")
        if not 0 < self.telemetry_hz <= 100:
            raise ValueError(f"telemetry_hz must lie in (0, 100], got {self.telemetry_hz}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in 1..100, got {self.jpeg_quality}")
        if not 0 <= self.niceness <= 19:
            raise ValueError(f"niceness must lie in 0..19, got {self.niceness}")

    def resolved_token(self) -> str:
        """``token``, else the value of the environment variable ``token_env`` ("" for none)."""
        import os

        return self.token or (os.environ.get(self.token_env, "") if self.token_env else "")

    @property
    def loopback_only(self) -> bool:
        """Whether the page is served to this machine only."""
        return self.host == "localhost" or _is_loopback_host(self.host)


def _is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SessionConfig:
    """One robot cell and task: the whole content of a file in hardware_configs/."""

    name: str
    seed: int = 0
    robot: RobotConfig = field(default_factory=RobotConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a bundled config (``sim_panda_reach``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    bundled = CONFIG_DIR / f"{Path(str(name_or_path)).stem}.yaml"
    if path.suffix in ("", ".yaml") and bundled.exists():
        return bundled
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"{name_or_path}: no such config file (bundled configs: {available})")


def load_config(name_or_path: str | Path) -> SessionConfig:
    """Load and validate a session config; errors name the file and the field."""
    return load_yaml(SessionConfig, resolve_config_path(name_or_path))


def save_config(config: SessionConfig, path: str | Path) -> Path:
    """Write ``config`` as YAML that :func:`load_config` reads back to an equal object."""
    import yaml

    from hardware_configs.loader import to_dict

    path = Path(path)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path
