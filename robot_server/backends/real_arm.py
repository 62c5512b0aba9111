"""What the real-arm backends (:mod:`~robot_server.backends.franka`, :mod:`~robot_server.backends.ur`)
share: the tool-down orientation convention, the reset pose with its randomisation, and the rules
for vendor libraries (imported only when the backend is chosen, injectable for tests).

The orientation helpers live in :mod:`~robot_server.backends.orientation`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

from hardware_configs.schema import RealArmResetConfig, RobotConfig


def reset_pose(robot: RobotConfig, reset: RealArmResetConfig,
               rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The randomised reset pose ``(xyz, yaw)`` of an episode.

    ``xyz = reset_xyz + U(-xyz_noise_m, xyz_noise_m)`` per axis, clipped to the workspace box, and
    ``yaw = reset_yaw_rad + U(-yaw_noise_rad, yaw_noise_rad)``, clipped to ``yaw_limits_rad``. The
    draws always happen (zero noise draws zeros), so an episode's rng stream does not depend on
    whether noise is configured.
    """
    safety = robot.safety
    xyz = np.asarray(robot.reset_xyz, dtype=np.float64) + rng.uniform(-1.0, 1.0, 3) * np.asarray(reset.xyz_noise_m)
    xyz = np.clip(xyz, safety.workspace_low, safety.workspace_high)
    yaw = robot.reset_yaw_rad + float(rng.uniform(-1.0, 1.0)) * reset.yaw_noise_rad
    return xyz, float(np.clip(yaw, *safety.yaw_limits_rad))


def import_vendor(module: str, backend: str, package: str) -> ModuleType:
    """Import a vendor library for ``backend``, or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"robot.backend {backend!r} needs the python module {module!r} (pip package {package}); "
            f"install it with: pip install 'steerl[hardware]'  ({error})"
        ) from error


def refuse_rendered_cameras(robot: RobotConfig, backend: str) -> None:
    """A real arm renders no images: every camera of the config must come from a camera device
    (the robot server's camera rig delivers those; the backend never sees their frames)."""
    rendered = [camera for camera in robot.cameras if not getattr(camera, "device", "")]
    if rendered:
        names = ", ".join(repr(camera.name) for camera in rendered)
        raise ValueError(
            f"robot.cameras: {names} name no device, but backend {backend!r} is a real arm and renders "
            "no images; set each camera's device to an entry of robot.camera_devices"
        )


def describe_error(error: BaseException) -> str:
    """``TypeName: message`` of a vendor exception (its message alone is often terse)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def as_vector(values: Any, length: int, what: str) -> np.ndarray:
    """A vendor reading as a float vector of ``length``, or ValueError naming the reading."""
    vector = np.asarray(values, dtype=np.float64).reshape(-1)
    if vector.shape != (length,) or not np.all(np.isfinite(vector)):
        raise ValueError(f"{what}: expected {length} finite numbers, got {values!r}")
    return vector
