"""Robot backends behind one interface (:class:`~robot_server.backends.base.RobotBackend`)."""

from __future__ import annotations

import dataclasses

from hardware_configs.schema import RobotConfig
from robot_server.backends.base import ArmFault, ArmState, ArmTarget, RobotBackend, TaskSignal


def make_backend(robot: RobotConfig) -> RobotBackend:
    """The backend named by ``robot.backend``; vendor libraries are imported only when chosen.

    The backend sees only the cameras it renders itself; cameras with a ``device`` come from the
    robot server's :class:`~robot_server.cameras.CameraRig`."""
    if robot.simulated_cameras != robot.cameras:
        robot = dataclasses.replace(robot, cameras=robot.simulated_cameras)
    if robot.backend == "pybullet":
        from robot_server.backends.pybullet_cell import PyBulletCell

        return PyBulletCell(robot)
    if robot.backend == "kinematic":
        from robot_server.backends.kinematic import KinematicArm

        return KinematicArm(robot)
    if robot.backend == "franka":
        from robot_server.backends.franka import FrankaArm

        return FrankaArm(robot)
    if robot.backend == "ur":
        from robot_server.backends.ur import URArm

        return URArm(robot)
    raise ValueError(f"robot.backend: unknown backend {robot.backend!r}")


__all__ = ["ArmFault", "ArmState", "ArmTarget", "RobotBackend", "TaskSignal", "make_backend"]
