"""The tool-down orientation convention every backend reports in (see base.py).

The tool points down and ``yaw`` is the heading of the tool's x axis about the world z axis::

    R(yaw) = Rz(yaw) @ Rx(pi) = [[cos yaw,  sin yaw,  0],
                                 [sin yaw, -cos yaw,  0],
                                 [0,        0,       -1]]

As a quaternion ``(x, y, z, w)``, with ``h = yaw / 2``::

    q(yaw) = qz(yaw) * qx(pi) = (0, 0, sin h, cos h) * (1, 0, 0, 0) = (cos h, sin h, 0, 0)

and back, for any rotation ``R`` (the tool need not point exactly down)::

    yaw = atan2(R[1, 0], R[0, 0]) = atan2(2 (x y + w z), 1 - 2 (y^2 + z^2))

``q`` and ``-q`` are the same rotation. A tool-down quaternion has ``w = 0``, so the usual
"``w >= 0``" sign rule flips at random between two readings of the same pose; reported quaternions
are instead put in the hemisphere of the reset orientation (``q . q(reset_yaw) >= 0``), which keeps
them continuous over the whole yaw range the safety layer allows (less than a half turn either way).
"""

from __future__ import annotations

import math

import numpy as np


def tool_down_quaternion(yaw: float) -> np.ndarray:
    """The tool-down orientation at heading ``yaw`` as ``(x, y, z, w)``: ``(cos yaw/2, sin yaw/2, 0, 0)``."""
    half = 0.5 * float(yaw)
    return np.array([math.cos(half), math.sin(half), 0.0, 0.0])


def quaternion_to_matrix(quat_xyzw: np.ndarray) -> np.ndarray:
    """The rotation matrix of a (not necessarily normalised) quaternion ``(x, y, z, w)``."""
    x, y, z, w = np.asarray(quat_xyzw, dtype=np.float64) / np.linalg.norm(quat_xyzw)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def yaw_of_quaternion(quat_xyzw: np.ndarray) -> float:
    """The heading of the tool's x axis about world z: ``atan2(2 (xy + wz), 1 - 2 (y^2 + z^2))``."""
    x, y, z, w = np.asarray(quat_xyzw, dtype=np.float64)
    return math.atan2(2.0 * (x * y + w * z), 1.0 - 2.0 * (y * y + z * z))


def same_hemisphere(quat_xyzw: np.ndarray, reference_xyzw: np.ndarray) -> np.ndarray:
    """``quat`` normalised and signed so that its dot product with ``reference`` is non-negative."""
    quat = np.asarray(quat_xyzw, dtype=np.float64)
    quat = quat / np.linalg.norm(quat)
    return -quat if float(np.dot(quat, reference_xyzw)) < 0.0 else quat
