"""Teleop devices: a person (or a scripted stand-in) steering the robot in the policy's action space.

Every device implements one interface, :class:`TeleopDevice`:

- ``start()`` opens the device (a missing device raises :class:`TeleopError` naming it);
- ``read() -> TeleopReading`` never blocks: the latest action in the policy's normalised action
  space ``[dx, dy, dz, (dyaw,) gripper]`` in [-1, 1], whether the operator is commanding right now,
  the :class:`OperatorEvent` s since the last read, and ``connected`` / ``fault``;
- ``close()`` stops it (and restores whatever it changed, such as the terminal's mode).

Physical devices are read on their own thread; ``read()`` only copies the newest state under a
lock, so a slow or dead device can never stall the control loop. A device that fails (its thread
raises, it is unplugged, a read errors) stops intervening: ``active=False``, ``connected=False``,
``fault`` says why, logged once.

Implementations, each configured by a YAML file under ``hardware_configs/teleop/`` (see
:mod:`hardware_configs.teleop`): :class:`KeyboardTeleop` (the terminal, no X server),
:class:`GamepadTeleop` (pygame's joystick API), :class:`SpaceMouseTeleop` (3Dconnexion, raw HID
through hidapi) and :class:`~actor.simulated_operator.SimulatedOperator` (the scripted expert
intervening like a person would, for the PyBullet cell). :func:`make_teleop_device` builds one from
a config name or path. ``python -m actor.teleop <config>`` prints a device's readings, to check a
mapping.

Intervene modes (``intervene`` in the YAML): ``deadband`` - the operator has control while any
motion input is outside the dead-band or a gripper input is held; ``hold_button`` - while the
intervene button/key is held; ``toggle`` - pressing it takes over / hands back
(:attr:`OperatorEvent.INTERVENE_TOGGLE`).

The gripper latches: close/open/toggle inputs set it, and it stays until the next episode. Until the
operator touches it in an episode, the reading's gripper entry is NaN, meaning "no command": the
policy's gripper value is kept, so taking over the motion never drops a grasped object.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import select
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hardware_configs.loader import ConfigError
from hardware_configs.schema import RobotConfig
from hardware_configs.teleop import (
    MOTION_AXES,
    AnalogMotion,
    AxisBinding,
    ButtonGripper,
    GamepadTeleopConfig,
    KeyboardTeleopConfig,
    OperatorEvent,
    SimulatedOperatorConfig,
    SpaceMouseTeleopConfig,
    TeleopConfig,
    load_teleop_config,
)

__all__ = [
    "OperatorEvent", "TeleopError", "TeleopReading", "TeleopDevice", "ThreadedTeleopDevice",
    "KeyboardTeleop", "TerminalKeyDecoder", "GamepadTeleop", "SpaceMouseTeleop",
    "SpaceMouseReportParser", "action_layout", "apply_deadband", "make_teleop_device",
]

log = logging.getLogger("steerl.teleop")


class TeleopError(RuntimeError):
    """A teleop device could not be found, opened or configured."""


@dataclass(frozen=True)
class TeleopReading:
    """One non-blocking look at a teleop device.

    ``action``: float32, the policy's action shape, in [-1, 1]; a NaN entry means the operator gives
    no command for that dimension (the policy's value is kept). ``active``: the operator is
    commanding now, so ``action`` should override the policy. ``events``: what arrived since the
    previous read, oldest first. ``fault``: why the device stopped (then ``connected`` is False).
    """

    action: np.ndarray
    active: bool
    events: tuple[OperatorEvent, ...] = ()
    connected: bool = True
    fault: str | None = None


def action_layout(action_dim: int) -> dict[str, int]:
    """Index of each named action entry: ``x y z (yaw) gripper`` for a 4- or 5-dim action."""
    if action_dim == 4:
        return {"x": 0, "y": 1, "z": 2, "gripper": 3}
    if action_dim == 5:
        return {"x": 0, "y": 1, "z": 2, "yaw": 3, "gripper": 4}
    raise TeleopError(f"teleop supports the 4-dim [dx, dy, dz, gripper] and 5-dim (with yaw) actions, "
                      f"got action_dim={action_dim}")


def apply_deadband(value: float, deadband: float) -> float:
    """0 inside ``[-deadband, deadband]``; outside, rescaled so the output still spans [-1, 1]."""
    magnitude = abs(value)
    if magnitude <= deadband:
        return 0.0
    return float(np.sign(value) * min(1.0, (magnitude - deadband) / (1.0 - deadband)))


class TeleopDevice(ABC):
    """A source of operator actions and events; see the module docstring.

    Subclasses set ``name`` and ``action_dim``. ``observe`` and ``on_episode_start`` are hooks the
    :class:`~actor.intervention.InterventionWrapper` calls every step / every reset; devices that
    need them (the simulated operator, gripper toggles) override them.
    """

    name: str = "teleop"
    action_dim: int

    @abstractmethod
    def start(self) -> None:
        """Open the device and start reading it. Idempotent. Raises :class:`TeleopError`."""

    @abstractmethod
    def read(self) -> TeleopReading:
        """The newest state; never blocks. Events are handed out once."""

    @abstractmethod
    def close(self) -> None:
        """Stop reading and release the device. Idempotent."""

    @property
    @abstractmethod
    def started(self) -> bool:
        """Whether :meth:`start` has run (and :meth:`close` has not)."""

    def observe(self, observation: dict[str, np.ndarray], policy_action: np.ndarray) -> None:
        """Called before each step with the observation the policy acted on and its action."""

    def on_episode_start(self) -> None:
        """Called after each env reset."""

    def __enter__(self) -> TeleopDevice:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ThreadedTeleopDevice(TeleopDevice):
    """A device read on its own thread: subclasses implement ``_open`` (in ``start``, raising
    :class:`TeleopError`), ``_poll`` (one bounded-time read on the device thread, ending with
    :meth:`_publish`) and ``_release``. Shared here: the latest-state hand-off, events, the gripper
    latch, the intervene modes and fault handling."""

    def __init__(self, name: str, action_dim: int, intervene_mode: str) -> None:
        self.name = name
        self.action_dim = action_dim
        self._layout = action_layout(action_dim)
        self._motion_axes = tuple(axis for axis in MOTION_AXES if axis in self._layout)
        self._intervene_mode = intervene_mode
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._action = self._empty_action()
        self._active = False
        self._connected = False
        self._fault: str | None = None
        self._events: list[OperatorEvent] = []
        # Guarded by _lock: set from the device thread (inputs) and the control thread (hooks).
        self._gripper: float | None = None
        self._policy_gripper: float | None = None
        self._intervene_toggled = False

    # --- the interface ----------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        if self._started:
            return
        self._open()
        with self._lock:
            self._connected, self._fault, self._started = True, None, True
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"teleop-{self.name}", daemon=True)
        self._thread.start()
        log.info("teleop device %s started", self.name)

    def read(self) -> TeleopReading:
        with self._lock:
            events, self._events = tuple(self._events), []
            if not self._started and self._fault is None:
                return TeleopReading(self._empty_action(), False, events, False, "device not started")
            return TeleopReading(self._action.copy(), self._active, events, self._connected, self._fault)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
            if self._thread.is_alive():
                log.warning("teleop device %s: reader thread did not stop within 2 s", self.name)
        self._thread = None
        was_started = self._started
        with self._lock:
            self._started, self._active, self._connected = False, False, False
        self._release()
        if was_started:
            log.info("teleop device %s closed", self.name)

    def observe(self, observation: dict[str, np.ndarray], policy_action: np.ndarray) -> None:
        with self._lock:
            self._policy_gripper = float(np.asarray(policy_action)[self._layout["gripper"]])

    def on_episode_start(self) -> None:
        with self._lock:
            self._gripper = None
            self._action[self._layout["gripper"]] = np.nan

    # --- for subclasses ---------------------------------------------------------------------------

    @abstractmethod
    def _open(self) -> None:
        """Find and open the device (caller's thread); raise TeleopError naming what is missing."""

    @abstractmethod
    def _poll(self) -> None:
        """Read the device once, waiting at most a short poll interval (device thread)."""

    def _release(self) -> None:
        """Release the device (after the thread stopped). Must be idempotent."""

    def _on_thread_exit(self) -> None:
        """Runs on the device thread as it ends, however it ends."""

    def _empty_action(self) -> np.ndarray:
        action = np.zeros(self.action_dim, dtype=np.float32)
        action[self._layout["gripper"]] = np.nan
        return action

    def _emit(self, event: OperatorEvent) -> None:
        with self._lock:
            self._events.append(event)
        log.info("teleop %s: %s", self.name, event.name)

    def _gripper_input(self, kind: str) -> None:
        """A close / open / toggle input was pressed."""
        with self._lock:
            if kind == "close":
                self._gripper = 1.0
            elif kind == "open":
                self._gripper = -1.0
            else:
                # Toggle relative to what the robot would do without the operator.
                current = self._gripper if self._gripper is not None else self._policy_gripper
                self._gripper = -1.0 if current is not None and current > 0.0 else 1.0

    def _intervene_pressed(self) -> None:
        """The intervene input was pressed (acts in toggle mode only)."""
        if self._intervene_mode != "toggle":
            return
        with self._lock:
            self._intervene_toggled = not self._intervene_toggled
        self._emit(OperatorEvent.INTERVENE_TOGGLE)

    def _publish(self, motion: dict[str, float], commanding: bool, intervene_held: bool) -> None:
        """Make a new reading visible: ``motion`` per axis name, ``commanding`` (any motion input out
        of the dead-band or a gripper input held), ``intervene_held`` (the intervene input)."""
        action = np.zeros(self.action_dim, dtype=np.float32)
        for axis in self._motion_axes:
            action[self._layout[axis]] = np.clip(motion.get(axis, 0.0), -1.0, 1.0)
        with self._lock:
            if self._fault is not None:
                return
            action[self._layout["gripper"]] = np.nan if self._gripper is None else self._gripper
            if self._intervene_mode == "deadband":
                active = commanding
            elif self._intervene_mode == "hold_button":
                active = intervene_held
            else:
                active = self._intervene_toggled
            self._action, self._active = action, active

    def _fail(self, message: str) -> None:
        """The device stopped working: stop intervening, report it, log it once."""
        with self._lock:
            first = self._fault is None
            self._fault = message
            self._connected, self._active = False, False
            self._action = self._empty_action()
        if first:
            log.error("teleop device %s: %s; the policy keeps acting", self.name, message)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._poll()
                with self._lock:
                    if self._fault is not None:
                        return
        except Exception as error:  # noqa: BLE001 - any reader failure must become a fault, not a crash
            self._fail(f"reader failed: {type(error).__name__}: {error}")
        finally:
            self._on_thread_exit()


def _analog_motion(motion: AnalogMotion, axes: Sequence[str], deadband: float,
                   value_of: Callable[[AxisBinding], float]) -> dict[str, float]:
    """Sum each axis's bindings (dead-band applied to stick axes; hats are already -1/0/1)."""
    result = {}
    for axis in axes:
        total = 0.0
        for binding in getattr(motion, axis):
            value = value_of(binding)
            if binding.source == "axis":
                value = apply_deadband(value, deadband)
            total += binding.scale * value
        result[axis] = float(np.clip(total, -1.0, 1.0))
    return result


def _button_roles(gripper: ButtonGripper, intervene_button: int | None,
                  events: dict[str, int]) -> dict[int, tuple[str, Any]]:
    """Button number -> ("gripper", kind) | ("intervene", None) | ("event", OperatorEvent)."""
    roles: dict[int, tuple[str, Any]] = {}
    for kind in ("close", "open", "toggle"):
        if getattr(gripper, kind) is not None:
            roles[getattr(gripper, kind)] = ("gripper", kind)
    if intervene_button is not None:
        roles[intervene_button] = ("intervene", None)
    for name, button in events.items():
        roles[button] = ("event", OperatorEvent(name))
    return roles


# --- keyboard ---------------------------------------------------------------------------------------

_ESC = 0x1B
_ESCAPE_SEQUENCES = {
    b"[A": "up", b"[B": "down", b"[C": "right", b"[D": "left",
    b"OA": "up", b"OB": "down", b"OC": "right", b"OD": "left",
    b"[H": "home", b"[F": "end", b"OH": "home", b"OF": "end",
    b"[1~": "home", b"[4~": "end", b"[2~": "insert", b"[3~": "delete",
    b"[5~": "page_up", b"[6~": "page_down",
}
_CONTROL_KEYS = {0x20: "space", 0x0A: "enter", 0x0D: "enter", 0x09: "tab", 0x7F: "backspace", 0x08: "backspace"}


class TerminalKeyDecoder:
    """Turns the bytes a terminal sends into key names (``w``, ``up``, ``esc``, ``enter``...).

    Arrow and page keys arrive as escape sequences (``ESC [ A``) that may be split across reads, so
    a lone ESC is reported as the Esc key only once ``escape_timeout_s`` passed without more bytes.
    Letters are reported in lower case (Shift and Caps Lock do not change a binding).
    """

    def __init__(self, escape_timeout_s: float = 0.03) -> None:
        self._pending = b""
        self._pending_since = 0.0
        self._escape_timeout_s = escape_timeout_s

    def feed(self, data: bytes, now: float) -> list[str]:
        """Keys completed by ``data`` (and any pending ESC that has timed out)."""
        if data and not self._pending:
            self._pending_since = now
        self._pending += data
        keys: list[str] = []
        while self._pending:
            first = self._pending[0]
            if first != _ESC:
                keys.extend(self._plain(first))
                self._pending = self._pending[1:]
                continue
            length = self._escape_length(self._pending)
            if length is None:  # an incomplete sequence: wait for its remaining bytes, briefly
                if now - self._pending_since < self._escape_timeout_s:
                    break
                keys.append("esc")
                self._pending = self._pending[1:]
                continue
            name = _ESCAPE_SEQUENCES.get(self._pending[1:length]) if length > 1 else "esc"
            if name is not None:
                keys.append(name)
            self._pending = self._pending[length:]
            self._pending_since = now
        return keys

    def flush(self, now: float) -> list[str]:
        """Keys whose wait for more bytes has timed out (call when no data arrived)."""
        return self.feed(b"", now) if self._pending else []

    @staticmethod
    def _plain(byte: int) -> list[str]:
        if byte in _CONTROL_KEYS:
            return [_CONTROL_KEYS[byte]]
        if 0x21 <= byte <= 0x7E:
            return [chr(byte).lower()]
        return []  # other control bytes and non-ASCII: not bindable

    @staticmethod
    def _escape_length(buffer: bytes) -> int | None:
        """Length of the escape sequence at the start of ``buffer``; None if it may be incomplete."""
        if len(buffer) == 1:
            return None
        introducer = buffer[1]
        if introducer == ord("O"):  # SS3: ESC O <final>
            return 3 if len(buffer) >= 3 else None
        if introducer == ord("["):  # CSI: ESC [ <parameters> <final byte 0x40-0x7E>
            for position in range(2, len(buffer)):
                if 0x40 <= buffer[position] <= 0x7E:
                    return position + 1
            return None
        return 1  # ESC followed by an ordinary key (Alt+key): report Esc, then the key


class KeyboardTeleop(ThreadedTeleopDevice):
    """Keys in the actor's terminal, read in cbreak mode (no echo, no line buffering; Ctrl-C still
    interrupts) by a thread that ``select``s on the file descriptor. The terminal's mode is restored
    on close, when the thread ends for any reason, and at interpreter exit.

    ``fd``: where the key bytes come from; default stdin, which must then be a terminal. Tests pass
    the read end of an ``os.pipe()``.
    """

    def __init__(self, config: KeyboardTeleopConfig, action_dim: int, fd: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__("keyboard", action_dim, config.intervene)
        self.config = config
        self._fd_given = fd
        self._fd = -1
        self._clock = clock
        self._decoder = TerminalKeyDecoder(config.escape_timeout_s)
        self._saved_terminal: list | None = None
        self._terminal_lock = threading.Lock()
        self._last_press: dict[str, float] = {}
        self._held_until: dict[str, float] = {}
        self._motion_keys: dict[str, tuple[str, float]] = {}  # key -> (axis, +scale / -scale)
        for axis in self._motion_axes:
            keys = getattr(config.motion, axis)
            if keys is not None:
                self._motion_keys[_normal_key(keys.plus)] = (axis, keys.scale)
                self._motion_keys[_normal_key(keys.minus)] = (axis, -keys.scale)
        self._gripper_keys = {_normal_key(getattr(config.gripper, kind)): kind
                              for kind in ("close", "open", "toggle") if getattr(config.gripper, kind) is not None}
        self._event_keys = {_normal_key(key): OperatorEvent(name) for name, key in config.events.items()}
        self._intervene_key = _normal_key(config.intervene_key) if config.intervene_key else None

    def _open(self) -> None:
        import termios
        import tty

        self._fd = sys.stdin.fileno() if self._fd_given is None else self._fd_given
        if os.isatty(self._fd):
            self._saved_terminal = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
            atexit.register(self._restore_terminal)
        elif self._fd_given is None:
            raise TeleopError("keyboard teleop needs a terminal: stdin is not a TTY (run the actor in a "
                              "terminal, not under nohup or a pipe)")

    def _restore_terminal(self) -> None:
        import termios

        with self._terminal_lock:
            if self._saved_terminal is None:
                return
            try:
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved_terminal)
            except termios.error as error:
                log.warning("keyboard teleop: could not restore the terminal mode: %s", error)
            self._saved_terminal = None
        atexit.unregister(self._restore_terminal)

    def _on_thread_exit(self) -> None:
        self._restore_terminal()

    def _release(self) -> None:
        self._restore_terminal()

    def _poll(self) -> None:
        readable, _, _ = select.select([self._fd], [], [], self.config.poll_interval_s)
        now = self._clock()
        if readable:
            data = os.read(self._fd, 256)
            if not data:
                self._fail("keyboard input closed (end of file)")
                return
            keys = self._decoder.feed(data, now)
        else:
            keys = self._decoder.flush(now)
        for key in keys:
            self._press(key, now)
        self._publish_keys(now)

    def _press(self, key: str, now: float) -> None:
        previous = self._last_press.get(key)
        repeat = previous is not None and now - previous < self.config.key_hold_s
        self._last_press[key] = now
        hold = self.config.key_repeat_hold_s if repeat else self.config.key_hold_s
        self._held_until[key] = now + hold
        if key in self._gripper_keys and not (repeat and self._gripper_keys[key] == "toggle"):
            self._gripper_input(self._gripper_keys[key])
        if repeat:
            return  # auto-repeat: keeps a key held, never repeats a one-shot action
        if key == self._intervene_key:
            self._intervene_pressed()
        if key in self._event_keys:
            self._emit(self._event_keys[key])

    def _held(self, key: str, now: float) -> bool:
        return now < self._held_until.get(key, 0.0)

    def _publish_keys(self, now: float) -> None:
        motion = dict.fromkeys(self._motion_axes, 0.0)
        for key, (axis, value) in self._motion_keys.items():
            if self._held(key, now):
                motion[axis] += value
        commanding = (any(self._held(key, now) for key in self._motion_keys)
                      or any(self._held(key, now) for key in self._gripper_keys))
        intervene_held = self._intervene_key is not None and self._held(self._intervene_key, now)
        self._publish(motion, commanding, intervene_held)


def _normal_key(key: str) -> str:
    return key.lower() if len(key) == 1 else key


# --- gamepad (pygame) -------------------------------------------------------------------------------

class JoystickLike(Protocol):
    """The part of ``pygame.joystick.JoystickType`` a gamepad device uses."""

    def get_name(self) -> str: ...
    def get_instance_id(self) -> int: ...
    def get_numaxes(self) -> int: ...
    def get_numbuttons(self) -> int: ...
    def get_numhats(self) -> int: ...
    def get_axis(self, axis: int) -> float: ...
    def get_button(self, button: int) -> bool: ...
    def get_hat(self, hat: int) -> tuple[int, int]: ...


def _import_pygame() -> Any:
    """pygame with SDL's video and audio on dummy drivers (no display needed) and joystick events
    delivered without a focused window."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    os.environ.setdefault("SDL_JOYSTICK_ALLOW_BACKGROUND_EVENTS", "1")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        import pygame
    except ImportError:
        raise TeleopError("gamepad teleop needs pygame: pip install pygame") from None
    return pygame


class GamepadTeleop(ThreadedTeleopDevice):
    """A gamepad through pygame's joystick API. The device thread pumps pygame's event queue (button
    presses, ``JOYDEVICEREMOVED``) and polls the axes, hats and held buttons.

    ``joystick``: an already-open joystick (tests inject a fake with the ``JoystickType`` methods);
    default: the pad the config selects. This device consumes pygame's whole event queue, so the
    process should not use pygame for anything else.
    """

    def __init__(self, config: GamepadTeleopConfig, action_dim: int, joystick: JoystickLike | None = None) -> None:
        super().__init__("gamepad", action_dim, config.intervene)
        self.config = config
        self._joystick = joystick
        self._pygame: Any = None
        self._instance_id = -1
        self._roles = _button_roles(config.gripper, config.intervene_button, config.events)
        self._gripper_buttons = [button for button, (role, _) in self._roles.items() if role == "gripper"]

    def _open(self) -> None:
        pygame = self._pygame = _import_pygame()
        pygame.display.init()  # owns SDL's event queue, which carries the joystick events
        pygame.joystick.init()
        pygame.event.clear()
        if self._joystick is None:
            self._joystick = self._find_joystick(pygame)
        pad = self._joystick
        self._instance_id = pad.get_instance_id()
        self.name = f"gamepad '{pad.get_name()}'"
        self._check_layout(pad)
        log.info("%s: %d axes, %d buttons, %d hats", self.name, pad.get_numaxes(), pad.get_numbuttons(),
                 pad.get_numhats())

    def _find_joystick(self, pygame: Any) -> Any:
        count = pygame.joystick.get_count()
        if count == 0:
            raise TeleopError("no gamepad found: pygame sees 0 joysticks (is it plugged in and readable, "
                              "e.g. /dev/input/js* or event* for your user?)")
        pads = [pygame.joystick.Joystick(index) for index in range(count)]
        if self.config.name_contains:
            wanted = self.config.name_contains.lower()
            for pad in pads:
                if wanted in pad.get_name().lower():
                    return pad
            names = ", ".join(repr(pad.get_name()) for pad in pads)
            raise TeleopError(f"no gamepad named like {self.config.name_contains!r} (name_contains); found {names}")
        if self.config.joystick_index >= count:
            raise TeleopError(f"joystick_index {self.config.joystick_index} but only {count} gamepad(s) found")
        return pads[self.config.joystick_index]

    def _check_layout(self, pad: JoystickLike) -> None:
        """Every configured input exists on this pad (a wrong config fails now, not mid-episode)."""
        counts = {"axis": pad.get_numaxes(), "hat_x": pad.get_numhats(), "hat_y": pad.get_numhats()}
        for axis in MOTION_AXES:
            for position, binding in enumerate(getattr(self.config.motion, axis)):
                if binding.index >= counts[binding.source]:
                    raise TeleopError(f"motion.{axis}[{position}]: {binding.source} {binding.index} does not "
                                      f"exist on {self.name} ({counts[binding.source]} available)")
        for button, (role, what) in self._roles.items():
            if button >= pad.get_numbuttons():
                where = {"gripper": f"gripper.{what}", "intervene": "intervene_button"}.get(
                    role, f"events.{getattr(what, 'value', what)}")
                raise TeleopError(f"{where}: button {button} does not exist on {self.name} "
                                  f"({pad.get_numbuttons()} buttons)")

    def _value(self, binding: AxisBinding) -> float:
        pad = self._joystick
        if binding.source == "axis":
            return float(pad.get_axis(binding.index))
        hat_x, hat_y = pad.get_hat(binding.index)
        return float(hat_x if binding.source == "hat_x" else hat_y)

    def _poll(self) -> None:
        pygame, pad = self._pygame, self._joystick
        presses = []
        for event in pygame.event.get():
            if getattr(event, "instance_id", None) != self._instance_id:
                continue
            if event.type == pygame.JOYDEVICEREMOVED:
                self._fail(f"{self.name} was disconnected")
                return
            if event.type == pygame.JOYBUTTONDOWN:
                presses.append(event.button)
        for button in presses:
            role, what = self._roles.get(button, (None, None))
            if role == "gripper":
                self._gripper_input(what)
            elif role == "intervene":
                self._intervene_pressed()
            elif role == "event":
                self._emit(what)
        motion = _analog_motion(self.config.motion, self._motion_axes, self.config.deadband, self._value)
        gripper_held = any(pad.get_button(button) for button in self._gripper_buttons)
        commanding = any(value != 0.0 for value in motion.values()) or gripper_held or any(
            self._roles.get(button, ("",))[0] == "gripper" for button in presses)
        intervene_held = self.config.intervene_button is not None and bool(pad.get_button(self.config.intervene_button))
        self._publish(motion, commanding, intervene_held)
        self._stop.wait(self.config.poll_interval_s)


# --- SpaceMouse (hidapi) ----------------------------------------------------------------------------

TRANSLATION_REPORT_ID = 1
ROTATION_REPORT_ID = 2
BUTTON_REPORT_ID = 3


class SpaceMouseReportParser:
    """State of a 3Dconnexion SpaceMouse from its raw HID input reports.

    Report layout (first byte: report id; values int16 little-endian):

    - id 1: translation x, y, z (6 bytes); wireless and newer models append rotation x, y, z there
      (12 bytes) and send no report 2;
    - id 2: rotation x, y, z (6 bytes);
    - id 3: button bitmap, bit i = button i (1 or more bytes).

    Other report ids (battery level, LEDs) are counted in ``ignored_reports``; reports too short for
    their id, empty ones and non-byte values in ``malformed_reports``. Neither changes the state.
    """

    def __init__(self) -> None:
        self.translation = np.zeros(3, dtype=np.int16)
        self.rotation = np.zeros(3, dtype=np.int16)
        self.buttons = 0
        self.malformed_reports = 0
        self.ignored_reports = 0

    @property
    def channels(self) -> np.ndarray:
        """Raw translation x, y, z then rotation x, y, z (int16 counts)."""
        return np.concatenate([self.translation, self.rotation])

    def feed(self, report: Sequence[int] | bytes) -> bool:
        """Apply one report; False if it was ignored or malformed."""
        try:
            data = bytes(report)
        except (TypeError, ValueError):
            self.malformed_reports += 1
            return False
        if not data:
            self.malformed_reports += 1
            return False
        report_id, payload = data[0], data[1:]
        if report_id == TRANSLATION_REPORT_ID:
            if len(payload) < 6:
                self.malformed_reports += 1
                return False
            self.translation = np.frombuffer(payload[:6], dtype="<i2").astype(np.int16)
            if len(payload) >= 12:
                self.rotation = np.frombuffer(payload[6:12], dtype="<i2").astype(np.int16)
            return True
        if report_id == ROTATION_REPORT_ID:
            if len(payload) < 6:
                self.malformed_reports += 1
                return False
            self.rotation = np.frombuffer(payload[:6], dtype="<i2").astype(np.int16)
            return True
        if report_id == BUTTON_REPORT_ID:
            if not payload:
                self.malformed_reports += 1
                return False
            self.buttons = int.from_bytes(payload, "little")
            return True
        self.ignored_reports += 1
        return False


class HidApi(Protocol):
    """What a SpaceMouse device needs of the ``hid`` module (pip package hidapi)."""

    def enumerate(self, vendor_id: int = 0, product_id: int = 0) -> list[dict]: ...
    def device(self) -> Any: ...


class SpaceMouseTeleop(ThreadedTeleopDevice):
    """A 3Dconnexion SpaceMouse read as raw HID reports (:class:`SpaceMouseReportParser`) through
    hidapi's ``hid`` module on the device thread.

    ``hid_api``: the ``hid`` module or a stand-in with ``enumerate()`` and ``device()`` (whose
    objects have ``open_path``, ``read(size, timeout_ms)`` and ``close``); tests inject fakes.
    """

    def __init__(self, config: SpaceMouseTeleopConfig, action_dim: int, hid_api: HidApi | None = None) -> None:
        super().__init__("spacemouse", action_dim, config.intervene)
        self.config = config
        self._hid_api = hid_api
        self._device: Any = None
        self.parser = SpaceMouseReportParser()
        self._roles = _button_roles(config.gripper, config.intervene_button, config.events)
        self._gripper_mask = sum(1 << button for button, (role, _) in self._roles.items() if role == "gripper")

    def _open(self) -> None:
        hid_api = self._hid_api
        if hid_api is None:
            try:
                import hid as hid_api
            except ImportError:
                raise TeleopError("SpaceMouse teleop needs hidapi: pip install hidapi") from None
        wanted = ", ".join(f"{vendor:04x}:{product:04x}" for vendor, product in self.config.devices)
        entries = list(hid_api.enumerate())
        match = self._pick(entries)
        if match is None:
            present = ", ".join(sorted({f"{e.get('vendor_id', 0):04x}:{e.get('product_id', 0):04x}" for e in entries}))
            raise TeleopError(f"no SpaceMouse found: no HID device with vendor:product {wanted} "
                              f"(connected HID devices: {present or 'none'}); plug it in, or add its ids "
                              "to devices in the spacemouse config")
        vendor, product = match["vendor_id"], match["product_id"]
        device = hid_api.device()
        try:
            device.open_path(match["path"])
        except (OSError, IOError) as error:
            raise TeleopError(f"SpaceMouse {vendor:04x}:{product:04x} found but cannot be opened ({error}); "
                              "on Linux give your user read access to its hidraw node (udev rule)") from None
        self._device = device
        product_name = match.get("product_string") or "SpaceMouse"
        self.name = f"{product_name} {vendor:04x}:{product:04x}"

    def _pick(self, entries: list[dict]) -> dict | None:
        for vendor, product in self.config.devices:
            candidates = [e for e in entries if e.get("vendor_id") == vendor and e.get("product_id") == product]
            # Multi-interface receivers: prefer the multi-axis controller (Generic Desktop, usage 8).
            candidates.sort(key=lambda e: (e.get("usage_page"), e.get("usage")) != (1, 8))
            if candidates:
                return candidates[0]
        return None

    def _release(self) -> None:
        device, self._device = self._device, None
        if device is not None:
            try:
                device.close()
            except Exception as error:  # noqa: BLE001 - closing an unplugged device may fail; nothing to do
                log.debug("SpaceMouse close: %s", error)

    def _poll(self) -> None:
        try:
            report = self._device.read(64, self.config.read_timeout_ms)
        except (OSError, IOError, ValueError) as error:
            self._fail(f"{self.name} read failed ({error}): unplugged?")
            return
        if not report:
            return
        previous_buttons = self.parser.buttons
        if not self.parser.feed(report):
            return
        pressed = self.parser.buttons & ~previous_buttons
        for button, (role, what) in sorted(self._roles.items()):
            if not pressed & (1 << button):
                continue
            if role == "gripper":
                self._gripper_input(what)
            elif role == "intervene":
                self._intervene_pressed()
            else:
                self._emit(what)
        channels = self.parser.channels.astype(np.float64) / self.config.full_scale
        motion = _analog_motion(self.config.motion, self._motion_axes, self.config.deadband,
                                lambda binding: float(np.clip(channels[binding.index], -1.0, 1.0)))
        commanding = any(value != 0.0 for value in motion.values()) or bool(self.parser.buttons & self._gripper_mask)
        intervene_held = (self.config.intervene_button is not None
                          and bool(self.parser.buttons & (1 << self.config.intervene_button)))
        self._publish(motion, commanding, intervene_held)


# --- factory ----------------------------------------------------------------------------------------

def make_teleop_device(config: TeleopConfig | str | Path, action_dim: int, *, robot: RobotConfig | None = None,
                       fd: int | None = None, joystick: JoystickLike | None = None,
                       hid_api: HidApi | None = None) -> TeleopDevice:
    """The teleop device of ``config``: a loaded config, a bundled name (``keyboard``,
    ``gamepad_xbox``, ``spacemouse``, ``simulated_operator``) or a YAML path. Not started.

    ``robot`` (a :class:`~hardware_configs.schema.RobotConfig`) is needed by the simulated operator
    (its scripted expert); ``fd``, ``joystick`` and ``hid_api`` replace the real input sources
    (tests). Raises :class:`~hardware_configs.loader.ConfigError` for a bad config and
    :class:`TeleopError` for an unsupported action size.
    """
    if isinstance(config, (str, Path)):
        config = load_teleop_config(config)
    action_layout(action_dim)
    if isinstance(config, KeyboardTeleopConfig):
        return KeyboardTeleop(config, action_dim, fd=fd)
    if isinstance(config, GamepadTeleopConfig):
        return GamepadTeleop(config, action_dim, joystick=joystick)
    if isinstance(config, SpaceMouseTeleopConfig):
        return SpaceMouseTeleop(config, action_dim, hid_api=hid_api)
    if isinstance(config, SimulatedOperatorConfig):
        from actor.simulated_operator import SimulatedOperator

        if robot is None:
            raise ConfigError("simulated_operator: needs robot= (the session's RobotConfig) for its scripted expert")
        return SimulatedOperator(config, robot, action_dim)
    raise ConfigError(f"unsupported teleop config {type(config).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m actor.teleop <config> [--action-dim N]``: print a device's readings (Ctrl-C ends)."""
    parser = argparse.ArgumentParser(description="Print a teleop device's readings, to check its mapping.")
    parser.add_argument("config", help="bundled name (keyboard, gamepad_xbox, spacemouse) or YAML path")
    parser.add_argument("--action-dim", type=int, default=5, help="4 (no yaw) or 5 (default)")
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: until Ctrl-C)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        device = make_teleop_device(args.config, args.action_dim)
        device.start()
    except (ConfigError, TeleopError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    events: list[str] = []
    last_line = ""
    deadline = time.monotonic() + args.seconds if args.seconds > 0 else float("inf")
    try:
        while time.monotonic() < deadline:
            reading = device.read()
            events += [event.name for event in reading.events]
            line = (f"active={int(reading.active)} action={np.array2string(reading.action, precision=2)} "
                    f"events={events[-3:]} connected={reading.connected}"
                    + (f" fault={reading.fault}" if reading.fault else ""))
            if line != last_line:
                print(line, end="\r\n", flush=True)  # \r: the terminal may be in cbreak mode
                last_line = line
            if reading.fault:
                return 1
            time.sleep(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        device.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
