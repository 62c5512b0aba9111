"""A stand-in for ur_rtde (pip package ur-rtde 1.6.5) for tests without an arm.

It provides the three interfaces steerl uses, with ur_rtde's class, method and argument names and
conventions: ``RTDEControlInterface(hostname, frequency=-1.0)`` with ``servoL(pose, speed,
acceleration, time, lookahead_time, gain)`` (positional only: the binding names them arg0..arg5;
lookahead in [0.03, 0.2], gain in [100, 2000], else ValueError as ur_rtde's range check),
``speedL(xd, acceleration=0.25, time=0.0)``, ``servoStop(a=10.0)``, ``speedStop(a=10.0)``,
``moveL(pose, speed=0.25, acceleration=1.2, asynchronous=False)``, ``isProgramRunning``,
``reuploadScript``, ``stopScript``, ``disconnect``; ``RTDEReceiveInterface(hostname,
frequency=-1.0)`` with ``getActualTCPPose`` / ``getActualTCPSpeed`` (poses as ``[x, y, z, rx, ry,
rz]``, rotation vectors), ``isProtectiveStopped``, ``isEmergencyStopped``, ``getSafetyMode``,
``getActualDigitalOutputBits`` (bits 0-7 standard, 16-17 tool); ``RTDEIOInterface(hostname)`` with
``setToolDigitalOut`` / ``setStandardDigitalOut``. Commands return False, as ur_rtde does, while
the control script is not running (after a protective or emergency stop, until ``reuploadScript``).
tests/test_arm_backends.py checks every name here against the real modules when installed.

Each controller address is one :class:`SimulatedUR` (``controller_at(address)``) whose point-mass
TCP moves on the wall clock; it logs what it was told and can be made to refuse:
``refuse_next(False | exception)``, ``protective_stop()``, ``emergency_stop()``, ``unreachable``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from fake_arm import PointMassTcp, quat_from_rotvec, rotvec_from_quat

# ur_rtde's safety modes (getSafetyMode).
SAFETY_MODE_NORMAL = 1
SAFETY_MODE_PROTECTIVE_STOP = 3
SAFETY_MODE_ROBOT_EMERGENCY_STOP = 7


class SimulatedUR:
    """One fake UR controller; see the module docstring."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.lock = threading.RLock()
        # A UR tool-down pose: rotation vector (pi, 0, 0).
        self.tcp = PointMassTcp(xyz=(0.40, -0.10, 0.30), quat=quat_from_rotvec(np.array([np.pi, 0.0, 0.0])))
        self.log: list[tuple] = []
        self.unreachable = False
        self.protective_stopped = False
        self.emergency_stopped = False
        self.program_running = True
        self.output_bits = 0
        self.connect_frequencies: list[float] = []
        self._refusal: Any = None
        self._armed_refusal = False

    # fault injection
    def refuse_next(self, outcome: bool | BaseException = False) -> None:
        """The next servoL / speedL / moveL returns False or raises ``outcome``."""
        with self.lock:
            self._refusal, self._armed_refusal = outcome, True

    def protective_stop(self) -> None:
        with self.lock:
            self.tcp.stop()
            self.protective_stopped = True
            self.program_running = False
            self.log.append(("protective_stop",))

    def clear_protective_stop(self) -> None:
        with self.lock:
            self.protective_stopped = False

    def emergency_stop(self) -> None:
        with self.lock:
            self.tcp.stop()
            self.emergency_stopped = True
            self.program_running = False

    # helpers for the interfaces
    def accept(self, command: str) -> bool:
        """Whether a motion command may run now (consumes an injected refusal)."""
        if self._armed_refusal:
            outcome, self._refusal, self._armed_refusal = self._refusal, None, False
            self.tcp.stop()
            self.log.append(("refused", command))
            if isinstance(outcome, BaseException):
                raise outcome
            return bool(outcome)
        if not self.program_running or self.protective_stopped or self.emergency_stopped:
            self.log.append(("refused", command))
            return False
        return True

    def pose(self) -> list[float]:
        self.tcp.update()
        return [*map(float, self.tcp.xyz), *map(float, rotvec_from_quat(self.tcp.quat))]

    def streamed_targets(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(target_xyz, measured_xyz_when_commanded)`` of every servoL target."""
        return [(np.asarray(entry[1][:3]), entry[-1]) for entry in self.log if entry[0] == "servoL"]


_CONTROLLERS: dict[str, SimulatedUR] = {}
_CONTROLLERS_LOCK = threading.Lock()


def controller_at(address: str) -> SimulatedUR:
    """The simulated controller at ``address`` (created on first use)."""
    with _CONTROLLERS_LOCK:
        if address not in _CONTROLLERS:
            _CONTROLLERS[address] = SimulatedUR(address)
        return _CONTROLLERS[address]


def forget_controllers() -> None:
    with _CONTROLLERS_LOCK:
        _CONTROLLERS.clear()


def _connect(hostname: str) -> SimulatedUR:
    controller = controller_at(hostname)
    if controller.unreachable:
        raise RuntimeError(f"ur_rtde: Failed to connect to the robot at {hostname}: Connection timed out")
    return controller


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"ur_rtde: {name} {value} is outside the valid range [{low}, {high}]")


class RTDEControlInterface:
    """Commands to the (simulated) controller."""

    def __init__(self, hostname: str, frequency: float = -1.0) -> None:
        self._controller = _connect(hostname)
        self._controller.connect_frequencies.append(frequency)
        self._connected = True

    def servoL(self, pose, speed, acceleration, time, lookahead_time, gain, /) -> bool:  # noqa: N802
        controller = self._controller
        _check_range("lookahead_time", lookahead_time, 0.03, 0.2)
        _check_range("gain", gain, 100, 2000)
        with controller.lock:
            if not controller.accept("servoL"):
                return False
            controller.tcp.update()
            controller.log.append(("servoL", list(pose), speed, acceleration, time, lookahead_time, gain,
                                   controller.tcp.xyz.copy()))
            controller.tcp.set_target(pose[:3], quat_from_rotvec(np.asarray(pose[3:], dtype=np.float64)))
            return True

    def speedL(self, xd, acceleration: float = 0.25, time: float = 0.0) -> bool:  # noqa: N802
        controller = self._controller
        with controller.lock:
            if not controller.accept("speedL"):
                return False
            controller.tcp.update()
            controller.log.append(("speedL", list(xd), acceleration, time, controller.tcp.xyz.copy()))
            controller.tcp.set_twist(xd[:3], xd[3:])
            return True

    def _stop(self, name: str, a: float) -> bool:
        controller = self._controller
        with controller.lock:
            controller.log.append((name, a))
            controller.tcp.stop()
            return controller.program_running

    def servoStop(self, a: float = 10.0) -> bool:  # noqa: N802
        return self._stop("servoStop", a)

    def speedStop(self, a: float = 10.0) -> bool:  # noqa: N802
        return self._stop("speedStop", a)

    def moveL(self, pose, speed: float = 0.25, acceleration: float = 1.2, asynchronous: bool = False) -> bool:  # noqa: N802
        controller = self._controller
        with controller.lock:
            if not controller.accept("moveL"):
                return False
            controller.log.append(("moveL", list(pose), speed, acceleration, asynchronous))
            controller.tcp.teleport(pose[:3], quat_from_rotvec(np.asarray(pose[3:], dtype=np.float64)))
            return True

    def isProgramRunning(self) -> bool:  # noqa: N802
        return self._controller.program_running

    def reuploadScript(self) -> bool:  # noqa: N802
        controller = self._controller
        with controller.lock:
            controller.log.append(("reuploadScript",))
            if controller.protective_stopped or controller.emergency_stopped:
                return False
            controller.program_running = True
            return True

    def stopScript(self) -> None:  # noqa: N802
        with self._controller.lock:
            self._controller.log.append(("stopScript",))
            self._controller.program_running = False

    def isConnected(self) -> bool:  # noqa: N802
        return self._connected

    def disconnect(self) -> None:
        self._connected = False


class RTDEReceiveInterface:
    """Readings of the (simulated) controller."""

    def __init__(self, hostname: str, frequency: float = -1.0) -> None:
        self._controller = _connect(hostname)
        self._connected = True

    def getActualTCPPose(self) -> list[float]:  # noqa: N802
        with self._controller.lock:
            return self._controller.pose()

    def getActualTCPSpeed(self) -> list[float]:  # noqa: N802
        controller = self._controller
        with controller.lock:
            controller.tcp.update()
            return [*map(float, controller.tcp.linear_velocity), *map(float, controller.tcp.angular_velocity)]

    def isProtectiveStopped(self) -> bool:  # noqa: N802
        return self._controller.protective_stopped

    def isEmergencyStopped(self) -> bool:  # noqa: N802
        return self._controller.emergency_stopped

    def getSafetyMode(self) -> int:  # noqa: N802
        controller = self._controller
        if controller.emergency_stopped:
            return SAFETY_MODE_ROBOT_EMERGENCY_STOP
        return SAFETY_MODE_PROTECTIVE_STOP if controller.protective_stopped else SAFETY_MODE_NORMAL

    def getActualDigitalOutputBits(self) -> int:  # noqa: N802
        return self._controller.output_bits

    def getDigitalOutState(self, output_id: int, /) -> bool:  # noqa: N802
        return bool((self._controller.output_bits >> output_id) & 1)

    def isConnected(self) -> bool:  # noqa: N802
        return self._connected

    def disconnect(self) -> None:
        self._connected = False


class RTDEIOInterface:
    """Digital outputs of the (simulated) controller."""

    def __init__(self, hostname: str, verbose: bool = False) -> None:
        self._controller = _connect(hostname)

    def _set(self, name: str, bit: int, level: bool) -> bool:
        controller = self._controller
        with controller.lock:
            controller.log.append((name, bit, bool(level)))
            if level:
                controller.output_bits |= 1 << bit
            else:
                controller.output_bits &= ~(1 << bit)
            return True

    def setToolDigitalOut(self, output_id: int, signal_level: bool, /) -> bool:  # noqa: N802
        _check_range("tool output_id", output_id, 0, 1)
        return self._set("setToolDigitalOut", 16 + output_id, signal_level)

    def setStandardDigitalOut(self, output_id: int, signal_level: bool, /) -> bool:  # noqa: N802
        _check_range("standard output_id", output_id, 0, 7)
        return self._set("setStandardDigitalOut", output_id, signal_level)

    def disconnect(self) -> None:
        pass
