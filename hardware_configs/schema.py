"""The session config: one YAML file per robot/cell/task, loaded into these frozen dataclasses.

A file has four sections::

    name: sim_panda_reach
    seed: 0
    robot:    # what the robot server runs: backend, control clock, action scaling, safety, task, cameras
    server:   # where the robot server binds, message limits, CURVE keys
    env:      # how the actor's gymnasium env reaches the robot (zmq or in-process)

Units are SI (metres, radians, seconds) unless a field name says otherwise (``_ms``, ``_hz``).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional
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

    def validate(self) -> None:
        if self.max_episode_steps < 1:
            raise ValueError("max_episode_steps must be at least 1")
        if self.randomise_xy_m < 0:
            raise ValueError("randomise_xy_m must be non-negative")


@dataclass(frozen=True)
class CameraConfig:
    """One RGB camera in the observation as ``images/<name>`` (uint8, height x width x 3)."""

    name: str
    width: int = 128
    height: int = 128

    def validate(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"camera name {self.name!r} must be a plain identifier")
        if not (8 <= self.width <= 4096 and 8 <= self.height <= 4096):
            raise ValueError(f"camera {self.name!r}: width and height must lie in [8, 4096]")


@dataclass(frozen=True)
class PyBulletConfig:
    """Simulator settings of the PyBullet cell."""

    physics_hz: float = 240.0
    gui: bool = False
    # Random joint-space noise (rad) added to the reset posture.
    reset_joint_noise_rad: float = 0.0


@dataclass(frozen=True)
class RobotConfig:
    """Everything the robot server needs to run the robot."""

    backend: Literal["pybullet", "kinematic"] = "pybullet"
    reset_xyz: Vec3 = (0.50, 0.0, 0.25)
    reset_yaw_rad: float = 0.0
    control: ControlConfig = field(default_factory=ControlConfig)
    action: ActionConfig = field(default_factory=ActionConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    cameras: tuple[CameraConfig, ...] = ()
    pybullet: PyBulletConfig = field(default_factory=PyBulletConfig)

    def validate(self) -> None:
        low, high = self.safety.workspace_low, self.safety.workspace_high
        if not all(lo <= x <= hi for x, lo, hi in zip(self.reset_xyz, low, high)):
            raise ValueError(
                f"reset_xyz {self.reset_xyz} lies outside the workspace box {low} .. {high}"
            )
        names = [camera.name for camera in self.cameras]
        if len(set(names)) != len(names):
            raise ValueError(f"camera names must be unique, got {names}")


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


def _is_loopback(address: str) -> bool:
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
        if not _is_loopback(self.address) and self.curve is None:
            raise ValueError(
                f"address {self.address!r} binds beyond loopback: set server.curve keys "
                "(steerl keys generate) so that only authorised clients can command the robot"
            )
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


@dataclass(frozen=True)
class GripperCriticConfig:
    """HIL-SERL's discrete gripper head: close / stay / open, trained by double DQN."""

    enabled: bool = False
    # Subtracted from the gripper critic's reward each time the gripper changes state.
    toggle_penalty: float = 0.1


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


@dataclass(frozen=True)
class LearnerConfig:
    """The learner process: what it trains on, where it listens, how often it publishes."""

    algorithm: Literal["sac"] = "sac"
    sac: SACConfig = field(default_factory=SACConfig)
    # Observation fields the networks see; empty: every field of the robot's observation.
    observation_keys: tuple[str, ...] = ()
    replay_capacity: int = 200_000
    # Share of each batch drawn from the demo buffer (when it holds data).
    demo_ratio: float = 0.5
    # Online transitions before the first update.
    learning_starts: int = 500
    # Transitions in, weights out (the actor connects here).
    address: str = "tcp://127.0.0.1:5560"
    publish_every_updates: int = 50
    checkpoint_every_updates: int = 5000
    run_dir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads for the updates; 0: all cores but one (the actor and the simulator need one).
    num_threads: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.demo_ratio < 1.0:
            raise ValueError("demo_ratio must lie in [0, 1)")
        if self.replay_capacity < 1000:
            raise ValueError("replay_capacity must be at least 1000")


@dataclass(frozen=True)
class ActorConfig:
    """The acting loop on the robot PC."""

    # Uniform random actions for this many env steps before the policy acts (when no demos).
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

    def validate(self) -> None:
        if self.max_steps_per_update < 0:
            raise ValueError("max_steps_per_update must be non-negative")


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
