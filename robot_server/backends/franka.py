"""A Franka Emika Panda / FR3 through franky (``pip install franky-control``, python module ``franky``).

Control (``robot.franka.control``):

- ``impedance`` (default): one :class:`franky.CartesianImpedanceTrackingMotion` runs asynchronously
  for the whole episode; each :meth:`FrankaArm.command` replaces its reference with
  ``set_reference(CartesianReference(target=pose))``. The controller is a critically damped spring
  of ``translational_stiffness`` / ``rotational_stiffness`` whose pose error is clipped to
  ``translational_error_clip_m`` / ``rotational_error_clip_rad``: compliant on contact, the way
  HIL-SERL drives its Franka.
- ``cartesian_motion``: each command starts ``CartesianMotion(pose, ReferenceType.Absolute)`` with
  ``robot.move(..., asynchronous=True)``, preempting the previous one (Franka's Cartesian pose
  interface, trajectory-limited by ``relative_dynamics_factor``).

Both return at once; the arm moves on the wall clock while the robot server waits for its tick.

The reset moves synchronously with ``CartesianMotion`` (the impedance motion is stopped first: an
asynchronous preemption cannot switch control modes) and opens the gripper. The gripper is binary:
a command crossing ``gripper_close_threshold`` starts ``Gripper.grasp_async`` (closing on an object
of any width) or ``Gripper.move_async`` to the full opening, without waiting.

Errors: any franky exception on a command (``ControlException`` for a reflex, ``CommandException``,
``NetworkException``, an error stored by the asynchronous motion thread and rethrown by
``poll_motion``) leads to ``recover_from_errors()``, a hold, and an :class:`ArmFault` naming the
call and the cause; the next command starts a fresh motion.

Pose convention: ``franky.Affine(translation, quaternion_xyzw)`` of the end effector in the base
frame; the tool points down at heading ``yaw`` (see :mod:`~robot_server.backends.real_arm`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from hardware_configs.schema import RobotConfig
from robot_server.backends.base import ArmFault, ArmState, ArmTarget, RobotBackend
from robot_server.backends.real_arm import (
    as_vector,
    describe_error,
    import_vendor,
    refuse_rendered_cameras,
    reset_pose,
)
from robot_server.backends.orientation import same_hemisphere, tool_down_quaternion, yaw_of_quaternion

log = logging.getLogger("steerl.robot_server.franka")

# franky's error types; GripperException and MotionReuseException do not derive from franky.Exception.
_VENDOR_ERROR_NAMES = ("Exception", "GripperException", "MotionReuseException")
# How long the end of a stopped motion is awaited.
_STOP_TIMEOUT_S = 2.0


class FrankaArm(RobotBackend):
    """A Franka arm and its hand through franky; see the module docstring.

    ``vendor`` is the ``franky`` module, or for tests any object with the same names (``Robot``,
    ``Gripper``, ``Affine``, ``CartesianMotion``, ``CartesianStopMotion``, ``ReferenceType``,
    ``CartesianImpedanceTrackingMotion``, ``CartesianReference``, ``Twist``, the exception types).
    When omitted, ``franky`` is imported here, so that only a server that chose this backend needs it.
    """

    def __init__(self, robot: RobotConfig, vendor: Any | None = None) -> None:
        refuse_rendered_cameras(robot, "franka")
        self._robot_config = robot
        self._config = robot.franka
        if not self._config.robot_ip:
            raise ValueError("robot.franka.robot_ip: required with backend 'franka'")
        self._franky = vendor if vendor is not None else import_vendor("franky", "franka", "franky-control")
        self._vendor_errors: tuple[type[BaseException], ...] = tuple(
            getattr(self._franky, name) for name in _VENDOR_ERROR_NAMES if hasattr(self._franky, name)
        )
        self.max_gripper_width_m = self._config.gripper_max_width_m
        self._reference_quat = tool_down_quaternion(robot.reset_yaw_rad)
        self._tracking: Any | None = None  # the running CartesianImpedanceTrackingMotion
        self._gripper_closed = False
        address = self._config.robot_ip
        try:
            self._robot = self._franky.Robot(
                address,
                relative_dynamics_factor=self._config.relative_dynamics_factor,
                default_torque_threshold=self._config.collision_torque_threshold_nm,
                default_force_threshold=self._config.collision_force_threshold_n,
            )
            self._robot.recover_from_errors()
            self._gripper = self._franky.Gripper(address) if self._config.gripper else None
        except self._vendor_errors as error:
            raise ArmFault(f"franka: cannot connect to the arm at {address} (franky.Robot / franky.Gripper): "
                           f"{describe_error(error)}") from error

    # -- motions ------------------------------------------------------------------------------
    def _affine(self, xyz: np.ndarray, yaw: float) -> Any:
        return self._franky.Affine(np.asarray(xyz, dtype=np.float64), tool_down_quaternion(yaw))

    def _start_tracking(self) -> None:
        """Start the impedance motion, its reference at the current pose (so the arm does not jump)."""
        motion = self._franky.CartesianImpedanceTrackingMotion(
            translational_stiffness=self._config.translational_stiffness,
            rotational_stiffness=self._config.rotational_stiffness,
            translational_error_clip=np.full(3, self._config.translational_error_clip_m),
            rotational_error_clip=np.full(3, self._config.rotational_error_clip_rad),
        )
        motion.set_reference(self._franky.CartesianReference(target=self._robot.current_pose.end_effector_pose))
        self._robot.move(motion, asynchronous=True)
        self._tracking = motion

    def _stop_tracking(self) -> None:
        """End the impedance motion; the stop is reported by franky as a ControlException, expected here."""
        if self._tracking is None:
            return
        self._tracking = None
        self._robot.stop()
        try:
            if not self._robot.join_motion(timeout=_STOP_TIMEOUT_S):
                log.error("franka: the impedance motion did not end within %.1f s of Robot.stop", _STOP_TIMEOUT_S)
        except self._vendor_errors as error:
            log.debug("impedance motion ended by stop: %s", describe_error(error))
        if self._robot.has_errors:
            self._robot.recover_from_errors()

    def _drain_motion_error(self) -> None:
        """Collect (and log) an error the last asynchronous motion stored, so that a reset, the
        way out of a fault, does not trip over it; then recover."""
        try:
            self._robot.poll_motion()
        except self._vendor_errors as error:
            log.warning("franka: the last motion ended with %s; recovering", describe_error(error))
            self._tracking = None
            self._robot.recover_from_errors()

    def _fault(self, call: str, error: BaseException) -> ArmFault:
        """Recover from the error, hold the arm, and describe what happened."""
        self._tracking = None
        try:
            recovered = bool(self._robot.recover_from_errors())
        except self._vendor_errors as recovery_error:
            recovered = False
            log.error("franka: recover_from_errors failed: %s", describe_error(recovery_error))
        self.hold()
        return ArmFault(
            f"franka: {call} failed: {describe_error(error)}; "
            f"{'recovered from errors' if recovered else 'recover_from_errors did not succeed'}, the arm is held"
        )

    # -- RobotBackend -------------------------------------------------------------------------
    def reset(self, rng: np.random.Generator) -> None:
        xyz, yaw = reset_pose(self._robot_config, self._config.reset, rng)
        franky = self._franky
        call = "Robot.poll_motion / Robot.stop (ending the previous motion)"
        try:
            self._drain_motion_error()
            self._stop_tracking()
            if self._robot.has_errors:
                self._robot.recover_from_errors()
            if self._gripper is not None:  # release first, close to where the episode left the object
                call = "Gripper.move to the full opening"
                self._gripper.move(self.max_gripper_width_m, self._config.gripper_speed_mps)
            self._gripper_closed = False
            call = "Robot.move(CartesianMotion) to the reset pose"
            motion = franky.CartesianMotion(self._affine(xyz, yaw), franky.ReferenceType.Absolute,
                                            relative_dynamics_factor=self._config.reset_dynamics_factor)
            self._robot.move(motion)
            if self._config.control == "impedance":
                call = "Robot.move(CartesianImpedanceTrackingMotion, asynchronous=True)"
                self._start_tracking()
        except self._vendor_errors as error:
            raise self._fault(f"reset: {call}", error) from error

    def command(self, target: ArmTarget) -> None:
        franky = self._franky
        pose = self._affine(target.xyz, target.yaw)
        call = "Robot.poll_motion"
        try:
            in_motion = self._robot.poll_motion()  # rethrows an error of the asynchronous motion thread
            if self._config.control == "impedance":
                if self._tracking is not None and not in_motion:
                    log.warning("franka: the impedance motion ended on its own; starting a new one")
                    self._tracking = None
                if self._tracking is None:
                    call = "Robot.move(CartesianImpedanceTrackingMotion, asynchronous=True)"
                    self._start_tracking()
                call = "CartesianImpedanceTrackingMotion.set_reference"
                self._tracking.set_reference(franky.CartesianReference(target=pose))
            else:
                call = "Robot.move(CartesianMotion, asynchronous=True)"
                self._robot.move(franky.CartesianMotion(pose, franky.ReferenceType.Absolute), asynchronous=True)
            call = "Gripper.grasp_async / Gripper.move_async"
            self._command_gripper(target.gripper_closed)
        except self._vendor_errors as error:
            raise self._fault(call, error) from error

    def _command_gripper(self, closed_fraction: float) -> None:
        if self._gripper is None:
            return
        close = closed_fraction >= self._config.gripper_close_threshold
        if close == self._gripper_closed:
            return
        if close:
            # Width 0 with a 1 m outer tolerance: grasp whatever lies between the fingers.
            self._gripper.grasp_async(0.0, self._config.gripper_speed_mps, self._config.gripper_force_n,
                                      epsilon_inner=0.005, epsilon_outer=1.0)
        else:
            self._gripper.move_async(self.max_gripper_width_m, self._config.gripper_speed_mps)
        self._gripper_closed = close

    def advance(self, duration_s: float) -> None:
        """A real arm moves on the wall clock: nothing to do."""

    def hold(self) -> None:
        """Stop where the arm is: the impedance reference jumps to the measured pose with zero
        velocity, or a ``CartesianStopMotion`` preempts the running Cartesian motion. Never raises
        (it runs on error paths); a failure is logged."""
        try:
            if self._tracking is not None:
                here = self._robot.current_pose.end_effector_pose
                self._tracking.set_reference(
                    self._franky.CartesianReference(target=here, target_twist=self._franky.Twist()))
            elif self._robot.is_in_control:
                self._robot.move(self._franky.CartesianStopMotion(), asynchronous=True)
        except self._vendor_errors as error:
            log.error("franka: hold failed: %s", describe_error(error))
            self._tracking = None
            try:
                self._robot.stop()
            except self._vendor_errors as stop_error:
                log.error("franka: Robot.stop failed: %s", describe_error(stop_error))

    def read_state(self) -> ArmState:
        try:
            state = self._robot.current_cartesian_state
            pose = state.pose.end_effector_pose
            twist = state.velocity.end_effector_twist
            xyz = as_vector(pose.translation, 3, "franka: end_effector_pose.translation")
            quat = same_hemisphere(as_vector(pose.quaternion, 4, "franka: end_effector_pose.quaternion"),
                                   self._reference_quat)
            linear = as_vector(twist.linear, 3, "franka: end_effector_twist.linear")
            angular = as_vector(twist.angular, 3, "franka: end_effector_twist.angular")
            width = float(self._gripper.width) if self._gripper is not None else (
                0.0 if self._gripper_closed else self.max_gripper_width_m)
        except (*self._vendor_errors, ValueError) as error:
            raise ArmFault(f"franka: reading the state (Robot.current_cartesian_state, Gripper.width) failed: "
                           f"{describe_error(error)}") from error
        return ArmState(
            tcp_xyz=xyz,
            tcp_quat_xyzw=quat,
            tcp_yaw=yaw_of_quaternion(quat),
            tcp_linear_velocity=linear,
            tcp_angular_velocity=angular,
            gripper_width_m=float(np.clip(width, 0.0, self.max_gripper_width_m)),
        )

    def close(self) -> None:
        try:
            self._stop_tracking()
        except self._vendor_errors as error:
            log.error("franka: stopping the impedance motion failed: %s", describe_error(error))
        self.hold()
