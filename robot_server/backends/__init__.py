"""Robot backends behind one interface (:class:`~robot_server.backends.base.RobotBackend`)."""

from __future__ import annotations

from hardware_configs.schema import RobotConfig
from robot_server.backends.base import ArmState, ArmTarget, RobotBackend, TaskSignal


def make_backend(robot: RobotConfig) -> RobotBackend:
    """The backend named by ``robot.backend``; vendor libraries are imported only when chosen."""
    if robot.backend == "pybullet":
        from robot_server.backends.pybullet_cell import PyBulletCell

        return PyBulletCell(robot)
    if robot.backend == "kinematic":
        from robot_server.backends.kinematic import KinematicArm

        return KinematicArm(robot)
    raise ValueError(f"robot.backend: unknown backend {robot.backend!r}")


__all__ = ["ArmState", "ArmTarget", "RobotBackend", "TaskSignal", "make_backend"]
