"""A point-mass TCP on the wall clock, the body that the fake vendor libraries (fake_franky,
fake_ur_rtde) move.

In pose mode the TCP approaches its target first-order with time constant ``time_constant_s``,
its speed capped at ``max_speed_mps * speed_scale`` (and the same for the orientation, slerped);
in velocity mode it moves with a constant twist. The state is integrated lazily from the clock
whenever it is read or changed, so a test sees the arm move while the robot server waits for its
control tick, exactly as with a real arm. The quaternion helpers here are deliberately separate from
the backends' own, so that the tests check one against the other.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (x, y, z, w) quaternions, via the (w, v) form."""
    wa, va = a[3], np.asarray(a[:3])
    wb, vb = b[3], np.asarray(b[:3])
    vector = wa * vb + wb * va + np.cross(va, vb)
    return np.array([*vector, wa * wb - float(np.dot(va, vb))])


def quat_conjugate(q: np.ndarray) -> np.ndarray:
    return np.array([-q[0], -q[1], -q[2], q[3]])


def quat_from_rotvec(rotvec: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(rotvec))
    if angle < 1e-12:
        return np.array([0.0, 0.0, 0.0, 1.0])
    axis = np.asarray(rotvec) / angle
    return np.array([*(axis * math.sin(angle / 2)), math.cos(angle / 2)])


def rotvec_from_quat(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    if q[3] < 0:
        q = -q
    angle = 2.0 * math.acos(min(1.0, q[3]))
    sine = math.sqrt(max(0.0, 1.0 - q[3] * q[3]))
    if sine < 1e-12:
        return np.zeros(3)
    return np.asarray(q[:3]) / sine * angle


def slerp(a: np.ndarray, b: np.ndarray, fraction: float) -> np.ndarray:
    """The rotation ``fraction`` of the way from ``a`` to ``b`` along the shorter arc."""
    if float(np.dot(a, b)) < 0:
        b = -b
    delta = quat_multiply(b, quat_conjugate(a))
    return quat_multiply(quat_from_rotvec(rotvec_from_quat(delta) * fraction), a)


class PointMassTcp:
    """A TCP pose that follows a target or a twist on the clock; see the module docstring."""

    def __init__(self, xyz=(0.45, 0.0, 0.30), quat=(1.0, 0.0, 0.0, 0.0), *,
                 clock: Callable[[], float] = time.monotonic, time_constant_s: float = 0.005,
                 max_speed_mps: float = 2.0, max_angular_speed_radps: float = 8.0) -> None:
        self.clock = clock
        self.time_constant_s = time_constant_s
        self.max_speed_mps = max_speed_mps
        self.max_angular_speed_radps = max_angular_speed_radps
        self.xyz = np.asarray(xyz, dtype=np.float64)
        self.quat = np.asarray(quat, dtype=np.float64) / np.linalg.norm(quat)
        self.linear_velocity = np.zeros(3)
        self.angular_velocity = np.zeros(3)
        self._target_xyz = self.xyz.copy()
        self._target_quat = self.quat.copy()
        self._speed_scale = 1.0
        self._twist: tuple[np.ndarray, np.ndarray] | None = None
        self._last_s = clock()

    def update(self) -> None:
        """Integrate from the last update to now."""
        now = self.clock()
        dt = now - self._last_s
        if dt <= 0.0:
            return
        self._last_s = now
        old_xyz, old_quat = self.xyz.copy(), self.quat.copy()
        if self._twist is not None:
            linear, angular = self._twist
            self.xyz = self.xyz + linear * dt
            self.quat = quat_multiply(quat_from_rotvec(angular * dt), self.quat)
        else:
            fraction = 1.0 - math.exp(-dt / self.time_constant_s)
            step = (self._target_xyz - self.xyz) * fraction
            limit = self.max_speed_mps * self._speed_scale * dt
            norm = float(np.linalg.norm(step))
            self.xyz = self.xyz + (step * limit / norm if norm > limit else step)
            angle = float(np.linalg.norm(rotvec_from_quat(quat_multiply(self._target_quat, quat_conjugate(self.quat)))))
            if angle > 1e-12:
                angular_limit = self.max_angular_speed_radps * self._speed_scale * dt
                self.quat = slerp(self.quat, self._target_quat, min(fraction, angular_limit / angle))
        self.quat = self.quat / np.linalg.norm(self.quat)
        self.linear_velocity = (self.xyz - old_xyz) / dt
        self.angular_velocity = rotvec_from_quat(quat_multiply(self.quat, quat_conjugate(old_quat))) / dt

    def set_target(self, xyz, quat, speed_scale: float = 1.0) -> None:
        self.update()
        self._twist = None
        self._target_xyz = np.asarray(xyz, dtype=np.float64)
        self._target_quat = np.asarray(quat, dtype=np.float64) / np.linalg.norm(quat)
        self._speed_scale = speed_scale

    def set_twist(self, linear, angular) -> None:
        self.update()
        self._twist = (np.asarray(linear, dtype=np.float64), np.asarray(angular, dtype=np.float64))

    def stop(self) -> None:
        """Stop where the TCP is now (an ideal brake)."""
        self.update()
        self._twist = None
        self._target_xyz, self._target_quat = self.xyz.copy(), self.quat.copy()
        self.linear_velocity = np.zeros(3)
        self.angular_velocity = np.zeros(3)

    def teleport(self, xyz, quat) -> None:
        """Be at ``xyz, quat`` at rest now (a completed blocking move)."""
        self.update()
        self._twist = None
        self.xyz = np.asarray(xyz, dtype=np.float64)
        self.quat = np.asarray(quat, dtype=np.float64) / np.linalg.norm(quat)
        self._target_xyz, self._target_quat = self.xyz.copy(), self.quat.copy()
        self.linear_velocity = np.zeros(3)
        self.angular_velocity = np.zeros(3)

    @property
    def target_reached(self) -> bool:
        return self._twist is None and float(np.linalg.norm(self._target_xyz - self.xyz)) < 1e-4
