"""The backend interface: the only code that touches a robot (simulated or real).

The robot server's :class:`~robot_server.cell.RobotCell` drives a backend through this interface
and owns everything else: action scaling, the safety clip, the watchdog, the control clock and the
episode bookkeeping. A backend therefore only ever receives targets that are already inside the
workspace box and the per-step limits.

Conventions: positions in metres in the robot base frame; the tool points down and ``yaw`` is the
rotation of the tool about the vertical axis (0 = the reset orientation); quaternions are
``(x, y, z, w)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from transport.spaces import FieldSpec


@dataclass(frozen=True)
class ArmTarget:
    """A safe Cartesian target for the TCP and a gripper command."""

    xyz: np.ndarray  # (3,) metres
    yaw: float  # radians about the vertical axis
    gripper_closed: float  # 0.0 fully open .. 1.0 fully closed


@dataclass(frozen=True)
class ArmState:
    """What the arm reports about itself."""

    tcp_xyz: np.ndarray  # (3,)
    tcp_quat_xyzw: np.ndarray  # (4,)
    tcp_yaw: float
    tcp_linear_velocity: np.ndarray  # (3,) m/s
    tcp_angular_velocity: np.ndarray  # (3,) rad/s
    gripper_width_m: float


@dataclass(frozen=True)
class TaskSignal:
    """Reward and success as the backend can judge them (real arms: 0 and False)."""

    reward: float = 0.0
    success: bool = False


class ArmFault(RuntimeError):
    """The arm refused or failed a command: a vendor library error, a protective or emergency stop,
    a lost connection. The backend raising it has already stopped the arm (held it where it is);
    the message names the vendor call and its cause, and the robot server replies with it."""


class RobotBackend(ABC):
    """A robot arm with its gripper and cameras, simulated or real."""

    #: Largest gripper opening in metres (the range of ``gripper_width_m``).
    max_gripper_width_m: float = 0.08

    @abstractmethod
    def reset(self, rng: np.random.Generator) -> None:
        """Move to the configured reset pose, open the gripper and randomise the task with
        ``rng``; return when the arm is there."""

    @abstractmethod
    def command(self, target: ArmTarget) -> None:
        """Start moving towards ``target`` (already clipped to the safety limits)."""

    @abstractmethod
    def advance(self, duration_s: float) -> None:
        """Let ``duration_s`` of robot time pass. A simulator integrates its physics for that
        long; a real arm returns at once (the wall clock moves it)."""

    @abstractmethod
    def hold(self) -> None:
        """Stop all motion and keep the current pose (watchdog, emergency stop)."""

    @abstractmethod
    def read_state(self) -> ArmState:
        """The arm's current TCP pose, velocity and gripper width."""

    def camera_specs(self) -> dict[str, FieldSpec]:
        """``{camera_name: spec}`` of the RGB images this backend delivers."""
        return {}

    def read_cameras(self) -> dict[str, np.ndarray]:
        """The newest frame of each camera, uint8 ``(height, width, 3)``."""
        return {}

    def task_observation_specs(self) -> dict[str, FieldSpec]:
        """Extra observation fields the task provides (simulator-only state such as a cube pose)."""
        return {}

    def read_task_observation(self) -> dict[str, np.ndarray]:
        return {}

    def task_signal(self) -> TaskSignal:
        """Reward and success of the current state."""
        return TaskSignal()

    def close(self) -> None:
        """Release the hardware or simulator."""
