"""The safety layer: turns a client's normalised action into a target the arm may execute.

Every action goes through three gates, in this order:

1. **Validation** — the action must be a float vector of the configured length with finite
   entries; anything else is refused (:class:`UnsafeAction`) and the arm does not move.
2. **Scaling and per-step limits** — ``a in [-1, 1]`` (values outside are clipped and counted)
   becomes ``delta_xyz = a[:3] * xyz_scale_m`` and ``delta_yaw = a[3] * yaw_scale_rad``, each axis
   clipped to ``max_step_xyz_m`` / ``max_step_yaw_rad``.
3. **Workspace box** — ``target = measured_tcp + delta`` is clipped to
   ``[workspace_low, workspace_high]`` and the yaw to ``yaw_limits_rad``.

The gripper entry is absolute: ``-1`` open, ``+1`` closed, mapped to a closing fraction in [0, 1]
(``action.gripper: continuous``) or to fully closed when positive, else open (``binary``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hardware_configs.schema import RobotConfig
from robot_server.backends.base import ArmState, ArmTarget


class UnsafeAction(ValueError):
    """An action the server refuses to execute; ``field`` names the offending part."""

    def __init__(self, message: str, field: str = "action") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SafetyReport:
    """Which limits shaped this step's target."""

    clipped_action: bool
    clipped_step: bool
    clipped_box: bool


class SafetyLayer:
    """Validates actions and maps them to safe Cartesian targets (see module docstring)."""

    def __init__(self, robot: RobotConfig) -> None:
        self._action = robot.action
        self._safety = robot.safety
        self._reset_yaw = robot.reset_yaw_rad
        self._low = np.asarray(robot.safety.workspace_low, dtype=np.float64)
        self._high = np.asarray(robot.safety.workspace_high, dtype=np.float64)
        self.action_dim = robot.action.dim

    def validate(self, action: np.ndarray) -> np.ndarray:
        """The action as float64, or UnsafeAction if its shape, dtype or values are wrong."""
        if action.dtype.kind != "f":
            raise UnsafeAction(f"action: dtype {action.dtype.name} is not a float type")
        if action.shape != (self.action_dim,):
            raise UnsafeAction(
                f"action: expected shape ({self.action_dim},) "
                f"[dx, dy, dz{', dyaw' if self._action.use_yaw else ''}, gripper], got {action.shape}"
            )
        if not np.all(np.isfinite(action)):
            bad = [int(i) for i in np.flatnonzero(~np.isfinite(action))]
            raise UnsafeAction(f"action: non-finite values at index {bad}; the arm was not moved")
        return action.astype(np.float64)

    def target(self, action: np.ndarray, state: ArmState) -> tuple[ArmTarget, SafetyReport]:
        """The safe target for a validated action, starting from the measured TCP pose."""
        clipped = np.clip(action, -1.0, 1.0)
        clipped_action = bool(np.any(clipped != action))

        raw_delta = clipped[:3] * self._action.xyz_scale_m
        delta = np.clip(raw_delta, -self._safety.max_step_xyz_m, self._safety.max_step_xyz_m)
        clipped_step = bool(np.any(delta != raw_delta))

        raw_xyz = np.asarray(state.tcp_xyz, dtype=np.float64) + delta
        xyz = np.clip(raw_xyz, self._low, self._high)
        clipped_box = bool(np.any(xyz != raw_xyz))

        if self._action.use_yaw:
            raw_dyaw = clipped[3] * self._action.yaw_scale_rad
            dyaw = float(np.clip(raw_dyaw, -self._safety.max_step_yaw_rad, self._safety.max_step_yaw_rad))
            clipped_step |= dyaw != raw_dyaw
            raw_yaw = state.tcp_yaw + dyaw
            yaw = float(np.clip(raw_yaw, *self._safety.yaw_limits_rad))
            clipped_box |= yaw != raw_yaw
        else:
            yaw = self._reset_yaw

        if self._action.gripper == "binary":
            gripper_closed = 1.0 if clipped[-1] > 0.0 else 0.0
        else:
            gripper_closed = float((clipped[-1] + 1.0) / 2.0)
        return ArmTarget(xyz=xyz, yaw=yaw, gripper_closed=gripper_closed), SafetyReport(
            clipped_action, clipped_step, clipped_box
        )
