"""A stand-in for the ``franky`` module (pip package franky-control 2.0.0) for tests without an arm.

It implements the part of franky's documented API that steerl uses, with franky's class, method
and keyword names (``Robot(fci_hostname, relative_dynamics_factor=..., default_torque_threshold=...,
default_force_threshold=...)``, ``Robot.move(motion, asynchronous=False)``, ``join_motion``,
``poll_motion``, ``recover_from_errors``, ``stop``, ``current_cartesian_state``, ``current_pose``,
``Gripper.move/grasp/open`` and their ``*_async`` variants returning a ``BoolFuture``, ``Affine``,
``Twist``, ``CartesianMotion``, ``CartesianStopMotion``, ``CartesianImpedanceTrackingMotion`` with
``set_reference(CartesianReference(...))``, ``ReferenceType``, and franky's exception hierarchy:
libfranka's errors derive from ``franky.Exception``; ``GripperException`` and
``MotionReuseException`` do not). tests/test_arm_backends.py checks every name here against the
real module when it is installed.

Behaviour, after franky's guide: motions are single-use; an asynchronous move preempts the running
motion only within the same control mode; an error of the asynchronous motion thread is stored and
rethrown by the next ``move`` / ``join_motion`` / ``poll_motion``; ``stop`` preempts a running
motion with a ``ControlException`` (rethrown the same way); after a reflex the arm refuses motions
until ``recover_from_errors``.

Each robot address is one :class:`SimulatedFranka` (``arm_at(address)``) whose point-mass TCP
(:class:`fake_arm.PointMassTcp`) moves on the wall clock; it logs what it was told and can be made
to refuse: ``refuse_next_move(error)``, ``reflex(error)``, ``unreachable = True``.
"""

from __future__ import annotations

import builtins
import enum
import sys
import threading
from typing import Any

import numpy as np

from fake_arm import PointMassTcp, quat_multiply


# -- exceptions -----------------------------------------------------------------------------------
class Exception(builtins.Exception):  # noqa: A001 - franky's own name
    """Base class of the libfranka errors."""


class ControlException(Exception):
    """An error during motion generation or control (a reflex, a preempted motion)."""


class CommandException(Exception):
    """An error executing a command."""


class NetworkException(Exception):
    """The connection failed or was lost."""


class InvalidOperationException(Exception):
    """An operation not allowed in the current state."""


class GripperException(builtins.Exception):
    """An error of the gripper."""


class MotionReuseException(builtins.Exception):
    """A motion object passed to ``move`` a second time."""


# -- geometry -------------------------------------------------------------------------------------
class Affine:
    """A rigid transform: a translation and an (x, y, z, w) rotation quaternion."""

    def __init__(self, translation: Any = (0.0, 0.0, 0.0), quaternion: Any = (0.0, 0.0, 0.0, 1.0)) -> None:
        if isinstance(translation, Affine):
            translation, quaternion = translation.translation, translation.quaternion
        self._translation = np.asarray(translation, dtype=np.float64).reshape(3).copy()
        quat = np.asarray(quaternion, dtype=np.float64).reshape(4)
        self._quaternion = quat / np.linalg.norm(quat)

    @property
    def translation(self) -> np.ndarray:
        return self._translation.copy()

    @property
    def quaternion(self) -> np.ndarray:
        return self._quaternion.copy()

    def __mul__(self, other: "Affine") -> "Affine":
        from fake_arm import quat_conjugate

        rotated = quat_multiply(quat_multiply(self._quaternion, np.array([*other._translation, 0.0])),
                                quat_conjugate(self._quaternion))[:3]
        return Affine(self._translation + rotated, quat_multiply(self._quaternion, other._quaternion))

    def __repr__(self) -> str:
        return f"Affine(t={self._translation}, q={self._quaternion})"


class Twist:
    """Linear (m/s) and angular (rad/s) velocity."""

    def __init__(self, linear_velocity: Any = None, angular_velocity: Any = None) -> None:
        self._linear = np.zeros(3) if linear_velocity is None else np.asarray(linear_velocity, dtype=np.float64)
        self._angular = np.zeros(3) if angular_velocity is None else np.asarray(angular_velocity, dtype=np.float64)

    @property
    def linear(self) -> np.ndarray:
        return self._linear.copy()

    @property
    def angular(self) -> np.ndarray:
        return self._angular.copy()


class RobotPose:
    def __init__(self, end_effector_pose: Affine, elbow_state: Any = None) -> None:
        self._pose = end_effector_pose
        self._elbow_state = elbow_state

    @property
    def end_effector_pose(self) -> Affine:
        return self._pose

    @property
    def elbow_state(self) -> Any:
        return self._elbow_state


class RobotVelocity:
    def __init__(self, end_effector_twist: Twist, elbow_velocity: float | None = None) -> None:
        self._twist = end_effector_twist
        self._elbow_velocity = elbow_velocity

    @property
    def end_effector_twist(self) -> Twist:
        return self._twist

    @property
    def elbow_velocity(self) -> float | None:
        return self._elbow_velocity


class CartesianState:
    def __init__(self, pose: RobotPose | Affine, velocity: RobotVelocity | Twist | None = None) -> None:
        self._pose = pose if isinstance(pose, RobotPose) else RobotPose(pose)
        velocity = velocity if velocity is not None else Twist()
        self._velocity = velocity if isinstance(velocity, RobotVelocity) else RobotVelocity(velocity)

    @property
    def pose(self) -> RobotPose:
        return self._pose

    @property
    def velocity(self) -> RobotVelocity:
        return self._velocity


class ReferenceType(enum.Enum):
    Absolute = 0
    Relative = 1


class RelativeDynamicsFactor:
    def __init__(self, velocity: float = 1.0, acceleration: float | None = None, jerk: float | None = None) -> None:
        self._values = (velocity, velocity if acceleration is None else acceleration, velocity if jerk is None else jerk)
        if not all(0.0 < value <= 1.0 for value in self._values):
            raise ValueError(f"relative dynamics factors must lie in (0, 1], got {self._values}")

    @property
    def velocity(self) -> float:
        return self._values[0]

    @property
    def acceleration(self) -> float:
        return self._values[1]

    @property
    def jerk(self) -> float:
        return self._values[2]


def _factor(value: RelativeDynamicsFactor | float) -> RelativeDynamicsFactor:
    return value if isinstance(value, RelativeDynamicsFactor) else RelativeDynamicsFactor(float(value))


# -- motions --------------------------------------------------------------------------------------
class CartesianMotion:
    """A Cartesian pose motion to one target (Cartesian pose control mode)."""

    def __init__(self, target: CartesianState | RobotPose | Affine, reference_type: ReferenceType = ReferenceType.Absolute,
                 relative_dynamics_factor: RelativeDynamicsFactor | float = 1.0, return_when_finished: bool = True,
                 ee_frame: Affine | None = None) -> None:
        self._target = target if isinstance(target, CartesianState) else CartesianState(target)
        self._reference_type = reference_type
        self._relative_dynamics_factor = _factor(relative_dynamics_factor)

    @property
    def target(self) -> CartesianState:
        return self._target

    @property
    def reference_type(self) -> ReferenceType:
        return self._reference_type


class CartesianStopMotion:
    """Stops the arm in Cartesian pose control mode."""

    def __init__(self, relative_dynamics_factor: RelativeDynamicsFactor | float = 1.0) -> None:
        self._relative_dynamics_factor = _factor(relative_dynamics_factor)

    @property
    def relative_dynamics_factor(self) -> RelativeDynamicsFactor:
        return self._relative_dynamics_factor


class CartesianReference:
    """The reference an impedance tracking motion follows."""

    def __init__(self, target: Affine | None = None, target_twist: Twist | None = None,
                 target_acceleration: Any = None) -> None:
        self.target = target if target is not None else Affine()
        self.target_twist = target_twist
        self.target_acceleration = target_acceleration


class CartesianImpedanceTrackingMotion:
    """Client-side Cartesian impedance control (torque control mode) tracking the newest reference."""

    def __init__(self, translational_stiffness: float = 500, rotational_stiffness: float = 50,
                 translational_error_clip: Any = None, rotational_error_clip: Any = None,
                 gains_time_constant: float = 0.1) -> None:
        if not (translational_stiffness >= 0 and rotational_stiffness >= 0):
            raise ValueError("stiffness must be non-negative")
        self.translational_stiffness = float(translational_stiffness)
        self.rotational_stiffness = float(rotational_stiffness)
        self.translational_error_clip = np.asarray(translational_error_clip if translational_error_clip is not None
                                                   else (0.1, 0.1, 0.1), dtype=np.float64)
        self.rotational_error_clip = np.asarray(rotational_error_clip if rotational_error_clip is not None
                                                else (0.25, 0.25, 0.25), dtype=np.float64)
        self._reference: CartesianReference | None = None
        self._arm: SimulatedFranka | None = None

    def set_reference(self, reference: CartesianReference) -> None:
        self._reference = reference
        if self._arm is not None:
            self._arm.reference_changed(self, reference)

    def get_reference(self) -> CartesianReference | None:
        return self._reference


# -- the simulated arm ----------------------------------------------------------------------------
class SimulatedFranka:
    """One fake Franka (arm and hand) at an address; see the module docstring."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.lock = threading.RLock()
        self.tcp = PointMassTcp()
        self.log: list[tuple] = []
        self.unreachable = False
        self.has_errors = False
        self.recovery_succeeds = True
        self.relative_dynamics_factor = RelativeDynamicsFactor(1.0)
        self.connect_arguments: dict[str, Any] = {}
        self._pending_error: BaseException | None = None
        self._refusal: BaseException | None = None
        self._used_motions: list[Any] = []  # kept alive so that id() stays unique
        self._tracking: Any | None = None
        self._pose_motion_active = False
        self.control_mode: str | None = None  # of the last motion started
        # the hand
        self.gripper_width = 0.08
        self.gripper_max_width = 0.08
        self.object_width: float | None = None  # an object between the fingers stops a grasp

    # fault injection
    def refuse_next_move(self, error: BaseException) -> None:
        """The next ``Robot.move`` raises ``error`` and leaves the arm in reflex (``has_errors``)."""
        with self.lock:
            self._refusal = error

    def reflex(self, error: BaseException) -> None:
        """A reflex now (e.g. a collision): the arm stops, ``error`` is stored for the motion thread."""
        with self.lock:
            self.tcp.stop()
            self._tracking = None
            self._pose_motion_active = False
            self.has_errors = True
            self._pending_error = error
            self.log.append(("reflex", type(error).__name__))

    # helpers used by Robot
    def raise_pending(self) -> None:
        error, self._pending_error = self._pending_error, None
        if error is not None:
            raise error

    def in_motion(self) -> bool:
        self.tcp.update()
        if self._pose_motion_active and self.tcp.target_reached:
            self._pose_motion_active = False
        return self._tracking is not None or self._pose_motion_active

    def reference_changed(self, motion: Any, reference: CartesianReference) -> None:
        with self.lock:
            if motion is not self._tracking:
                return
            self.tcp.update()
            self.log.append(("reference", reference.target.translation, reference.target.quaternion, self.tcp.xyz.copy()))
            self.tcp.set_target(reference.target.translation, reference.target.quaternion)

    def follow_tracking_reference(self) -> None:
        """Pull the reference of the running impedance motion (works for real franky objects too)."""
        if self._tracking is not None:
            reference = self._tracking.get_reference()
            if reference is not None:
                self.tcp.set_target(reference.target.translation, reference.target.quaternion)

    def gripper_targets(self) -> list[tuple]:
        return [entry for entry in self.log if entry[0].startswith("gripper")]

    def arm_targets(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(target_xyz, measured_xyz_when_commanded)`` of every streamed (non-reset) target."""
        return [(entry[3], entry[5]) for entry in self.log if entry[0] == "move" and entry[2]
                and entry[1] == "CartesianMotion"] + [(entry[1], entry[3]) for entry in self.log
                                                      if entry[0] == "reference"]


_ARMS: dict[str, SimulatedFranka] = {}
_ARMS_LOCK = threading.Lock()


def arm_at(address: str) -> SimulatedFranka:
    """The simulated arm at ``address`` (created on first use)."""
    with _ARMS_LOCK:
        if address not in _ARMS:
            _ARMS[address] = SimulatedFranka(address)
        return _ARMS[address]


def forget_arms() -> None:
    with _ARMS_LOCK:
        _ARMS.clear()


def _control_mode(motion: Any) -> str:
    return "torque" if "Impedance" in type(motion).__name__ else "cartesian_pose"


class Robot:
    """A connection to a (simulated) Franka arm.

    ``data_types`` is the module whose ``Affine``, ``Twist``, ``RobotPose``, ``RobotVelocity`` and
    ``CartesianState`` the state is returned as (this one; a test may set the real ``franky``)."""

    control_rate = 0.001
    degrees_of_freedom = 7
    data_types: Any = None

    def __init__(self, fci_hostname: str, relative_dynamics_factor: RelativeDynamicsFactor | float = 1.0,
                 default_torque_threshold: float = 20.0, default_force_threshold: float = 30.0) -> None:
        arm = arm_at(fci_hostname)
        if arm.unreachable:
            raise NetworkException(f"libfranka: Connection to FCI failed: no route to {fci_hostname}")
        with arm.lock:
            arm.relative_dynamics_factor = _factor(relative_dynamics_factor)
            arm.connect_arguments = {"relative_dynamics_factor": arm.relative_dynamics_factor.velocity,
                                     "default_torque_threshold": default_torque_threshold,
                                     "default_force_threshold": default_force_threshold}
        self._arm = arm
        self._hostname = fci_hostname

    @property
    def fci_hostname(self) -> str:
        return self._hostname

    @property
    def relative_dynamics_factor(self) -> RelativeDynamicsFactor:
        return self._arm.relative_dynamics_factor

    @relative_dynamics_factor.setter
    def relative_dynamics_factor(self, value: RelativeDynamicsFactor | float) -> None:
        self._arm.relative_dynamics_factor = _factor(value)

    def move(self, motion: Any, asynchronous: bool = False) -> None:
        arm = self._arm
        with arm.lock:
            arm.raise_pending()
            if arm.has_errors:
                raise ControlException('libfranka: Move command rejected: command not possible in the current mode ("Reflex")!')
            if any(motion is used for used in arm._used_motions):
                raise MotionReuseException("This motion has already been executed; create a new one")
            arm._used_motions.append(motion)
            if arm._refusal is not None:
                error, arm._refusal = arm._refusal, None
                arm.tcp.stop()
                arm._tracking = None
                arm._pose_motion_active = False
                arm.has_errors = True
                arm.log.append(("refused", type(motion).__name__, type(error).__name__))
                raise error
            mode = _control_mode(motion)
            if arm.in_motion() and arm.control_mode not in (None, mode):
                raise InvalidOperationException(
                    f"cannot preempt a running {arm.control_mode} motion with a {mode} motion: the control mode cannot change")
            kind = type(motion).__name__
            arm.tcp.update()
            measured = arm.tcp.xyz.copy()
            speed_scale = arm.relative_dynamics_factor.velocity
            if kind == "CartesianMotion":
                pose = motion.target.pose.end_effector_pose
                xyz, quat = pose.translation, pose.quaternion
                if motion.reference_type == type(motion.reference_type).Relative:
                    relative = Affine(arm.tcp.xyz, arm.tcp.quat) * Affine(xyz, quat)
                    xyz, quat = relative.translation, relative.quaternion
                arm.log.append(("move", kind, asynchronous, np.asarray(xyz), np.asarray(quat), measured))
                if asynchronous:
                    arm._tracking = None
                    arm.tcp.set_target(xyz, quat, speed_scale)
                    arm._pose_motion_active = True
                else:
                    arm.tcp.teleport(xyz, quat)  # a blocking move returns when the arm is there
                    arm._pose_motion_active = False
            elif kind == "CartesianStopMotion":
                arm.log.append(("move", kind, asynchronous, None, None, measured))
                arm.tcp.stop()
                arm._tracking = None
                arm._pose_motion_active = False
            elif kind == "CartesianImpedanceTrackingMotion":
                if not asynchronous:
                    raise RuntimeError("fake franky: a synchronous impedance tracking motion never returns")
                arm.log.append(("move", kind, asynchronous, None, None, measured))
                arm._pose_motion_active = False
                arm._tracking = motion
                if isinstance(motion, CartesianImpedanceTrackingMotion):
                    motion._arm = arm
                arm.follow_tracking_reference()
            else:
                raise NotImplementedError(f"fake franky: motion type {kind} is not simulated")
            arm.control_mode = mode

    def join_motion(self, timeout: float | None = None) -> bool:
        arm = self._arm
        with arm.lock:
            arm.raise_pending()
            if arm._tracking is not None:
                if timeout is None:
                    raise RuntimeError("fake franky: join_motion() on an impedance tracking motion blocks forever")
                return False
            if arm._pose_motion_active:
                arm.tcp.teleport(arm.tcp._target_xyz, arm.tcp._target_quat)
                arm._pose_motion_active = False
            return True

    def poll_motion(self) -> bool:
        arm = self._arm
        with arm.lock:
            arm.raise_pending()
            return arm.in_motion()

    def stop(self) -> None:
        arm = self._arm
        with arm.lock:
            if arm.in_motion():
                arm._pending_error = ControlException("libfranka: motion aborted by stop")
            arm._tracking = None
            arm._pose_motion_active = False
            arm.tcp.stop()
            arm.log.append(("stop",))

    def recover_from_errors(self) -> bool:
        arm = self._arm
        with arm.lock:
            arm.log.append(("recover",))
            if arm.recovery_succeeds:
                arm.has_errors = False
            return arm.recovery_succeeds

    @property
    def has_errors(self) -> bool:
        return self._arm.has_errors

    @property
    def is_in_control(self) -> bool:
        with self._arm.lock:
            return self._arm.in_motion()

    @property
    def current_pose(self) -> RobotPose:
        return self.current_cartesian_state.pose

    @property
    def current_cartesian_state(self) -> CartesianState:
        arm = self._arm
        with arm.lock:
            arm.follow_tracking_reference()
            arm.tcp.update()
            types = self.data_types or sys.modules[__name__]
            return types.CartesianState(
                types.RobotPose(types.Affine(arm.tcp.xyz, arm.tcp.quat)),
                types.RobotVelocity(types.Twist(arm.tcp.linear_velocity, arm.tcp.angular_velocity)))


class BoolFuture:
    """The result of an asynchronous gripper command (the fake's commands complete at once)."""

    def __init__(self, value: bool) -> None:
        self._value = value

    def get(self) -> bool:
        return self._value

    def wait(self, timeout: float | None = None) -> bool:
        return True


class Gripper:
    """The Franka hand of a (simulated) arm; widths in metres, speeds in m/s, forces in N."""

    def __init__(self, fci_hostname: str) -> None:
        arm = arm_at(fci_hostname)
        if arm.unreachable:
            raise NetworkException(f"libfranka gripper: Connection to {fci_hostname} failed")
        self._arm = arm

    def _move_to(self, width: float, what: str, *arguments: float) -> bool:
        arm = self._arm
        with arm.lock:
            if not 0.0 <= width <= arm.gripper_max_width + 1e-9:
                raise CommandException(f"libfranka gripper: {what}: width {width} outside [0, {arm.gripper_max_width}]")
            arm.log.append((f"gripper_{what}", width, *arguments))
            arm.gripper_width = width
            return True

    def move(self, width: float, speed: float) -> bool:
        return self._move_to(width, "move", speed)

    def move_async(self, width: float, speed: float) -> BoolFuture:
        return BoolFuture(self.move(width, speed))

    def grasp(self, width: float, speed: float, force: float, epsilon_inner: float = 0.005,
              epsilon_outer: float = 0.005) -> bool:
        arm = self._arm
        final = max(width, arm.object_width) if arm.object_width is not None else width
        self._move_to(final, "grasp", speed, force, epsilon_inner, epsilon_outer)
        return width - epsilon_inner < final < width + epsilon_outer

    def grasp_async(self, width: float, speed: float, force: float, epsilon_inner: float = 0.005,
                    epsilon_outer: float = 0.005) -> BoolFuture:
        return BoolFuture(self.grasp(width, speed, force, epsilon_inner, epsilon_outer))

    def open(self, speed: float) -> bool:
        return self._move_to(self._arm.gripper_max_width, "open", speed)

    def open_async(self, speed: float) -> BoolFuture:
        return BoolFuture(self.open(speed))

    def stop(self) -> bool:
        self._arm.log.append(("gripper_stop",))
        return True

    def homing(self) -> bool:
        return True

    @property
    def width(self) -> float:
        return self._arm.gripper_width

    @property
    def max_width(self) -> float:
        return self._arm.gripper_max_width

    @property
    def is_grasped(self) -> bool:
        arm = self._arm
        return arm.object_width is not None and abs(arm.gripper_width - arm.object_width) < 1e-9
