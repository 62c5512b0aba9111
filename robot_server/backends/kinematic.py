"""An ideal kinematic arm: the TCP is exactly at the last commanded target after each period.

It costs nothing to step, which makes it the instrument for measuring everything around the
backend (transport, codec, safety, clock) and for testing the safety layer with exact geometry.
Its cameras deliver synthetic frames whose first pixel row encodes the frame counter, so that
tests can tell fresh frames from stale ones.
"""

from __future__ import annotations

import numpy as np

from hardware_configs.schema import RobotConfig
from robot_server.backends.base import ArmState, ArmTarget, RobotBackend
from robot_server.backends.orientation import tool_down_quaternion
from transport.spaces import FieldSpec


class KinematicArm(RobotBackend):
    """A backend whose TCP follows commands perfectly; see the module docstring."""

    def __init__(self, robot: RobotConfig) -> None:
        self._robot = robot
        self._xyz = np.asarray(robot.reset_xyz, dtype=np.float64)
        self._yaw = robot.reset_yaw_rad
        self._gripper_width = self.max_gripper_width_m
        self._velocity = np.zeros(3)
        self._target: ArmTarget | None = None
        self._frame_counter = 0
        pattern_rng = np.random.default_rng(0)
        self._frames = {
            camera.name: pattern_rng.integers(0, 256, (camera.height, camera.width, 3), dtype=np.uint8)
            for camera in robot.cameras
        }

    def reset(self, rng: np.random.Generator) -> None:
        self._xyz = np.asarray(self._robot.reset_xyz, dtype=np.float64)
        self._yaw = self._robot.reset_yaw_rad
        self._gripper_width = self.max_gripper_width_m
        self._velocity = np.zeros(3)
        self._target = None
        self._frame_counter = 0

    def command(self, target: ArmTarget) -> None:
        self._target = target

    def advance(self, duration_s: float) -> None:
        if self._target is None:
            self._velocity = np.zeros(3)
            return
        new_xyz = np.asarray(self._target.xyz, dtype=np.float64)
        self._velocity = (new_xyz - self._xyz) / max(duration_s, 1e-9)
        self._xyz = new_xyz
        self._yaw = self._target.yaw
        self._gripper_width = (1.0 - self._target.gripper_closed) * self.max_gripper_width_m

    def hold(self) -> None:
        self._target = None
        self._velocity = np.zeros(3)

    def read_state(self) -> ArmState:
        return ArmState(
            tcp_xyz=self._xyz.copy(),
            tcp_quat_xyzw=tool_down_quaternion(self._yaw),
            tcp_yaw=self._yaw,
            tcp_linear_velocity=self._velocity.copy(),
            tcp_angular_velocity=np.zeros(3),
            gripper_width_m=self._gripper_width,
        )

    def camera_specs(self) -> dict[str, FieldSpec]:
        return {c.name: FieldSpec("uint8", (c.height, c.width, 3), 0, 255) for c in self._robot.cameras}

    def read_cameras(self) -> dict[str, np.ndarray]:
        self._frame_counter += 1
        for frame in self._frames.values():
            frame[0, :8, 0] = np.frombuffer(self._frame_counter.to_bytes(8, "little"), dtype=np.uint8)
        return self._frames
