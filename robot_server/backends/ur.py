"""A Universal Robots arm (CB3, e-Series) through ur_rtde (``pip install ur-rtde``; python modules
``rtde_control``, ``rtde_receive``, ``rtde_io``).

Control (``robot.ur.control``), one call per control step, returning at once:

- ``servoL`` (default): ``RTDEControlInterface.servoL(pose, velocity, acceleration, time,
  lookahead_time, gain)`` to the target pose; ``time`` is one control period unless
  ``servo_time_s`` says otherwise. The arguments are positional: ur_rtde's binding names them
  ``arg0..arg5``.
- ``speedL``: ``RTDEControlInterface.speedL(xd, acceleration)`` with the TCP twist that closes the
  measured pose error within one control period, clipped to ``speed_max_mps`` / ``speed_max_radps``.
  The arm keeps that speed until the next command; the robot server's watchdog holds it
  (``speedStop``) when commands stop.

``hold`` is ``servoStop`` / ``speedStop``; the reset is a blocking ``moveL``. State comes from
``RTDEReceiveInterface.getActualTCPPose`` / ``getActualTCPSpeed``. Before every command the backend
checks ``isProtectiveStopped`` / ``isEmergencyStopped``; a stopped arm, a command that returns
False (ur_rtde's refusal: control script not running, remote control off) or raises RuntimeError
leads to a hold and an :class:`ArmFault` naming the call.

Rotations: UR poses are ``(x, y, z, rx, ry, rz)`` with the orientation as a rotation vector
``r = theta * n`` (unit axis ``n``, angle ``theta = |r|`` in ``[0, pi]``). With quaternions
``(x, y, z, w)``::

    q = (n sin(theta/2), cos(theta/2))                    rotation vector -> quaternion
    theta = 2 atan2(|v|, w),  r = theta v / |v|           quaternion (v, w), w >= 0 -> rotation vector

(for ``theta -> 0``: ``sin(theta/2)/theta -> 1/2`` and ``r -> 2 v / w``). The tool-down pose at
heading ``yaw`` (:mod:`~robot_server.backends.real_arm`) has ``q = (cos yaw/2, sin yaw/2, 0, 0)``,
so ``w = 0``, ``theta = pi`` and::

    r(yaw) = pi * (cos(yaw/2), sin(yaw/2), 0)

e.g. ``(pi, 0, 0)`` for yaw 0 (tool z down, tool x along base x) and ``(0, pi, 0)`` for yaw pi. At
``theta = pi``, ``r`` and ``-r`` are the same rotation and the controller may report either; both
give the same quaternion up to sign (fixed by the reset-orientation hemisphere rule) and the same
yaw ``atan2(R[1, 0], R[0, 0])``.

Gripper: a :class:`GripperDriver`; the bundled :class:`DigitalOutputGripper` switches a tool or
standard digital output (``RTDEIOInterface.setToolDigitalOut`` / ``setStandardDigitalOut``) and
reads it back from ``RTDEReceiveInterface.getActualDigitalOutputBits``. Other grippers (Robotiq
over its socket, ...) plug in through ``URArm(gripper=...)``.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np

from hardware_configs.schema import RobotConfig, URConfig
from robot_server.backends.base import ArmFault, ArmState, ArmTarget, RobotBackend
from robot_server.backends.real_arm import (
    as_vector,
    describe_error,
    import_vendor,
    refuse_rendered_cameras,
    reset_pose,
)
from robot_server.backends.orientation import same_hemisphere, tool_down_quaternion, yaw_of_quaternion

log = logging.getLogger("steerl.robot_server.ur")

# What ur_rtde raises: pybind11 turns std::runtime_error (and boost's system errors) into
# RuntimeError and std::range_error / std::invalid_argument into ValueError.
_VENDOR_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, OSError)

# Bit offsets of the outputs in RTDEReceiveInterface.getActualDigitalOutputBits:
# 0-7 standard, 8-15 configurable, 16-17 tool.
_OUTPUT_BIT_OFFSET = {"standard_digital_output": 0, "tool_digital_output": 16}


# -- rotations ------------------------------------------------------------------------------------
def rotvec_to_quaternion(rotvec: np.ndarray) -> np.ndarray:
    """Rotation vector ``theta * n`` -> quaternion ``(n sin(theta/2), cos(theta/2))`` as (x, y, z, w)."""
    rotvec = np.asarray(rotvec, dtype=np.float64)
    theta = float(np.linalg.norm(rotvec))
    # sin(theta/2) / theta, with its series 1/2 - theta^2/48 near zero.
    scale = 0.5 - theta * theta / 48.0 if theta < 1e-6 else math.sin(0.5 * theta) / theta
    return np.array([*(rotvec * scale), math.cos(0.5 * theta)])


def quaternion_to_rotvec(quat_xyzw: np.ndarray) -> np.ndarray:
    """Quaternion (x, y, z, w) -> rotation vector with angle in [0, pi] (``q`` and ``-q`` agree)."""
    quat = np.asarray(quat_xyzw, dtype=np.float64)
    quat = quat / np.linalg.norm(quat)
    if quat[3] < 0.0:
        quat = -quat
    vector, w = quat[:3], float(quat[3])
    sine = float(np.linalg.norm(vector))
    if sine < 1e-9:
        return 2.0 * vector / w  # theta ~ 2 |v| / w
    return 2.0 * math.atan2(sine, w) * vector / sine


def tool_down_rotvec(yaw: float) -> np.ndarray:
    """The tool-down orientation at heading ``yaw``: ``pi * (cos(yaw/2), sin(yaw/2), 0)``."""
    return quaternion_to_rotvec(tool_down_quaternion(yaw))


def _quaternion_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product ``a * b`` of (x, y, z, w) quaternions."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
        aw * bw - ax * bx - ay * by - az * bz,
    ])


def orientation_error_rotvec(target_xyzw: np.ndarray, current_xyzw: np.ndarray) -> np.ndarray:
    """The rotation vector (base frame) that turns ``current`` into ``target``:
    ``rotvec(q_target * conj(q_current))``."""
    conjugate = np.asarray(current_xyzw, dtype=np.float64) * np.array([-1.0, -1.0, -1.0, 1.0])
    return quaternion_to_rotvec(_quaternion_multiply(np.asarray(target_xyzw, dtype=np.float64), conjugate))


def _clip_norm(vector: np.ndarray, limit: float) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector * (limit / norm) if norm > limit else vector


# -- grippers -------------------------------------------------------------------------------------
class GripperDriver(Protocol):
    """A gripper on a UR arm. ``command`` must return at once; ``open`` may block until open."""

    max_width_m: float

    def command(self, closed_fraction: float) -> None:
        """Start closing (``closed_fraction`` 1) or opening (0); values in between are allowed."""

    def open(self) -> None:
        """Open fully (the reset)."""

    def width_m(self) -> float:
        """The current (or, without a sensor, the commanded) opening in metres."""

    def close(self) -> None:
        """Release the connection."""


class NoGripper:
    """An arm without a gripper: reports a constant full opening."""

    def __init__(self, max_width_m: float) -> None:
        self.max_width_m = max_width_m

    def command(self, closed_fraction: float) -> None:
        pass

    def open(self) -> None:
        pass

    def width_m(self) -> float:
        return self.max_width_m

    def close(self) -> None:
        pass


class DigitalOutputGripper:
    """A binary gripper switched by one digital output of the UR controller.

    A command at or above ``close_threshold`` sets the output to ``close_level``, below it to the
    opposite level; the output is written only when the wanted state changes. The reported width
    is ``0`` or ``max_width_m`` according to the output level read back from the controller (there
    is no finger sensor)."""

    def __init__(self, io: Any, receive: Any, kind: str, pin: int, close_level: bool,
                 max_width_m: float, close_threshold: float) -> None:
        if kind not in _OUTPUT_BIT_OFFSET:
            raise ValueError(f"robot.ur.gripper: {kind!r} is not a digital output kind")
        self.max_width_m = max_width_m
        self._io = io
        self._receive = receive
        self._kind = kind
        self._pin = pin
        self._close_level = close_level
        self._close_threshold = close_threshold
        self._closed: bool | None = None
        self._call = "RTDEIOInterface.setToolDigitalOut" if kind == "tool_digital_output" \
            else "RTDEIOInterface.setStandardDigitalOut"

    def _set(self, closed: bool) -> None:
        level = self._close_level if closed else not self._close_level
        setter = self._io.setToolDigitalOut if self._kind == "tool_digital_output" else self._io.setStandardDigitalOut
        if not setter(self._pin, level):
            raise ArmFault(f"ur: {self._call}({self._pin}, {level}) returned False (gripper not switched)")
        self._closed = closed

    def command(self, closed_fraction: float) -> None:
        closed = closed_fraction >= self._close_threshold
        if closed != self._closed:
            self._set(closed)

    def open(self) -> None:
        self._set(False)

    def width_m(self) -> float:
        bits = int(self._receive.getActualDigitalOutputBits())
        level = bool((bits >> (_OUTPUT_BIT_OFFSET[self._kind] + self._pin)) & 1)
        return 0.0 if level == self._close_level else self.max_width_m

    def close(self) -> None:
        self._io.disconnect()


def _import_ur_rtde() -> SimpleNamespace:
    """The three ur_rtde interfaces, imported only when the UR backend is chosen."""
    return SimpleNamespace(
        RTDEControlInterface=import_vendor("rtde_control", "ur", "ur-rtde").RTDEControlInterface,
        RTDEReceiveInterface=import_vendor("rtde_receive", "ur", "ur-rtde").RTDEReceiveInterface,
        RTDEIOInterface=import_vendor("rtde_io", "ur", "ur-rtde").RTDEIOInterface,
    )


class URArm(RobotBackend):
    """A Universal Robots arm through ur_rtde; see the module docstring.

    ``vendor`` holds the classes ``RTDEControlInterface``, ``RTDEReceiveInterface`` and
    ``RTDEIOInterface`` (by default imported from ur_rtde here; tests pass fakes with the same
    API). ``gripper`` replaces the gripper that ``robot.ur.gripper`` describes.
    """

    def __init__(self, robot: RobotConfig, vendor: Any | None = None, gripper: GripperDriver | None = None) -> None:
        refuse_rendered_cameras(robot, "ur")
        self._robot_config = robot
        self._config: URConfig = robot.ur
        if not self._config.robot_ip:
            raise ValueError("robot.ur.robot_ip: required with backend 'ur'")
        vendor = vendor if vendor is not None else _import_ur_rtde()
        self._period_s = robot.control.period_s
        self._servo_time_s = self._config.servo_time_s or self._period_s
        self._reference_quat = tool_down_quaternion(robot.reset_yaw_rad)
        address = self._config.robot_ip
        frequency = self._config.rtde_frequency_hz or -1.0  # -1: ur_rtde picks the controller's rate
        try:
            self._receive = vendor.RTDEReceiveInterface(address, frequency)
            self._control = vendor.RTDEControlInterface(address, frequency)
            if gripper is None:
                gripper = self._make_gripper(vendor, address)
        except _VENDOR_ERRORS as error:
            raise ArmFault(f"ur: cannot connect to the controller at {address} (RTDEReceiveInterface / "
                           f"RTDEControlInterface / RTDEIOInterface): {describe_error(error)}") from error
        self._gripper: GripperDriver = gripper
        self.max_gripper_width_m = gripper.max_width_m

    def _make_gripper(self, vendor: Any, address: str) -> GripperDriver:
        config = self._config
        if config.gripper == "none":
            return NoGripper(config.gripper_max_width_m)
        return DigitalOutputGripper(vendor.RTDEIOInterface(address), self._receive, config.gripper,
                                    config.gripper_pin, config.gripper_close_level,
                                    config.gripper_max_width_m, config.gripper_close_threshold)

    # -- faults -------------------------------------------------------------------------------
    def _check_safety(self, what: str) -> None:
        """Refuse to command an arm in emergency or protective stop."""
        if self._receive.isEmergencyStopped():
            self.hold()
            raise ArmFault(f"ur: {what} not sent: the arm is in emergency stop "
                           "(RTDEReceiveInterface.isEmergencyStopped); release it, then reset the episode")
        if self._receive.isProtectiveStopped():
            self.hold()
            raise ArmFault(f"ur: {what} not sent: the arm is in protective stop "
                           "(RTDEReceiveInterface.isProtectiveStopped); clear it on the teach pendant, "
                           "then reset the episode")

    def _refused(self, call: str, error: BaseException | None = None) -> ArmFault:
        self.hold()
        if error is None:
            return ArmFault(f"ur: {call} refused the command (returned False: control script not running "
                            "or remote control off); the arm is held")
        return ArmFault(f"ur: {call} failed: {describe_error(error)}; the arm is held")

    # -- RobotBackend -------------------------------------------------------------------------
    def reset(self, rng: np.random.Generator) -> None:
        xyz, yaw = reset_pose(self._robot_config, self._config.reset, rng)
        call = "RTDEControlInterface.moveL to the reset pose"
        try:
            self.hold()
            self._check_safety("reset")
            if not self._control.isProgramRunning():  # a protective stop ends the control script
                call = "RTDEControlInterface.reuploadScript"
                if not self._control.reuploadScript():
                    raise self._refused(call)
            call = "gripper open"
            self._gripper.open()
            call = "RTDEControlInterface.moveL to the reset pose"
            pose = [*map(float, xyz), *map(float, tool_down_rotvec(yaw))]
            if not self._control.moveL(pose, self._config.reset_speed_mps, self._config.reset_acceleration_mps2):
                raise self._refused(call)
        except ArmFault:  # a RuntimeError too, already described; hold (again: a stop is idempotent)
            self.hold()
            raise
        except _VENDOR_ERRORS as error:
            raise self._refused(call, error) from error

    def command(self, target: ArmTarget) -> None:
        config = self._config
        call = "RTDEReceiveInterface safety check"
        try:
            self._check_safety(f"{config.control} target")
            target_quat = tool_down_quaternion(target.yaw)
            if config.control == "servoL":
                call = "RTDEControlInterface.servoL"
                pose = [*map(float, target.xyz), *map(float, quaternion_to_rotvec(target_quat))]
                accepted = self._control.servoL(pose, config.servo_velocity_mps, config.servo_acceleration_mps2,
                                                self._servo_time_s, config.servo_lookahead_time_s, config.servo_gain)
            else:
                call = "RTDEControlInterface.speedL"
                state = self.read_state()
                linear = _clip_norm((np.asarray(target.xyz) - state.tcp_xyz) / self._period_s, config.speed_max_mps)
                angular = _clip_norm(orientation_error_rotvec(target_quat, state.tcp_quat_xyzw) / self._period_s,
                                     config.speed_max_radps)
                accepted = self._control.speedL([*map(float, linear), *map(float, angular)],
                                                config.speed_acceleration_mps2)
            if not accepted:
                raise self._refused(call)
            call = "gripper command"
            self._gripper.command(target.gripper_closed)
        except ArmFault:  # a RuntimeError too, already described; hold (again: a stop is idempotent)
            self.hold()
            raise
        except _VENDOR_ERRORS as error:
            raise self._refused(call, error) from error

    def advance(self, duration_s: float) -> None:
        """A real arm moves on the wall clock: nothing to do."""

    def hold(self) -> None:
        """``servoStop`` / ``speedStop`` at ``stop_deceleration_mps2``. Never raises (it runs on
        error paths); a refusal or failure is logged."""
        stop = self._control.servoStop if self._config.control == "servoL" else self._control.speedStop
        name = "servoStop" if self._config.control == "servoL" else "speedStop"
        try:
            if not stop(self._config.stop_deceleration_mps2):
                log.warning("ur: RTDEControlInterface.%s returned False (control script not running?)", name)
        except _VENDOR_ERRORS as error:
            log.error("ur: RTDEControlInterface.%s failed: %s", name, describe_error(error))

    def read_state(self) -> ArmState:
        try:
            pose = as_vector(self._receive.getActualTCPPose(), 6, "ur: RTDEReceiveInterface.getActualTCPPose")
            speed = as_vector(self._receive.getActualTCPSpeed(), 6, "ur: RTDEReceiveInterface.getActualTCPSpeed")
            width = float(self._gripper.width_m())
        except _VENDOR_ERRORS as error:
            raise ArmFault(f"ur: reading the state failed: {describe_error(error)}") from error
        quat = same_hemisphere(rotvec_to_quaternion(pose[3:]), self._reference_quat)
        return ArmState(
            tcp_xyz=pose[:3].copy(),
            tcp_quat_xyzw=quat,
            tcp_yaw=yaw_of_quaternion(quat),
            tcp_linear_velocity=speed[:3].copy(),
            tcp_angular_velocity=speed[3:].copy(),
            gripper_width_m=float(np.clip(width, 0.0, self.max_gripper_width_m)),
        )

    def close(self) -> None:
        self.hold()
        for what, action in (("gripper close", self._gripper.close),
                             ("RTDEControlInterface.stopScript", self._control.stopScript),
                             ("RTDEControlInterface.disconnect", self._control.disconnect),
                             ("RTDEReceiveInterface.disconnect", self._receive.disconnect)):
            try:
                action()
            except _VENDOR_ERRORS as error:
                log.error("ur: %s failed: %s", what, describe_error(error))
