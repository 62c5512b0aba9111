"""Teleop device configs: one YAML file per device under ``hardware_configs/teleop/``.

A file names its ``device`` kind and maps the device's inputs onto the policy's normalised action
``[dx, dy, dz, (dyaw,) gripper]`` (see :class:`~hardware_configs.schema.ActionConfig`) and onto
operator events, so that a new gamepad or key layout is a new file, not new code::

    device: gamepad
    deadband: 0.15
    intervene: deadband            # deadband | hold_button | toggle
    motion:                        # action dimension -> the inputs summed into it
      x: [{axis: 1, scale: -1.0}]
      z: [{hat_y: 0, scale: 1.0}]
    gripper: {close: 5, open: 4}   # button numbers
    events: {mark_success: 7, emergency_stop: 6}

Motion dimensions are named (``x``, ``y``, ``z``, ``yaw``) rather than numbered, so one file fits
both the 4-dim and the 5-dim (yaw) action; a ``yaw`` binding is ignored by a task without yaw.
Every mistake raises :class:`~hardware_configs.loader.ConfigError` naming the file and the field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from hardware_configs.loader import ConfigError, load_dataclass

TELEOP_CONFIG_DIR = Path(__file__).resolve().parent / "teleop"

MOTION_AXES = ("x", "y", "z", "yaw")
InterveneMode = Literal["deadband", "hold_button", "toggle"]


class OperatorEvent(enum.Enum):
    """Discrete things an operator signals besides motion. The value is the YAML spelling."""

    MARK_SUCCESS = "mark_success"        # the task is done: label the episode a success and end it
    MARK_FAILURE = "mark_failure"        # the episode failed: label it and end it
    RERECORD = "rerecord"                # discard this episode and record it again
    PAUSE_TOGGLE = "pause_toggle"        # pause / unpause the acting loop (arm held)
    EMERGENCY_STOP = "emergency_stop"    # stop commanding the robot now
    RESUME = "resume"                    # leave a pause or an emergency stop
    INTERVENE_TOGGLE = "intervene_toggle"  # the operator took over / handed back (toggle mode)


def _check_events(events: dict, expect: type) -> None:
    known = {event.value for event in OperatorEvent}
    for name, binding in events.items():
        if name not in known:
            raise ValueError(f"events.{name}: unknown operator event (known: {', '.join(sorted(known))})")
        if name == OperatorEvent.INTERVENE_TOGGLE.value:
            raise ValueError(f"events.{name}: set by the device itself in intervene: toggle mode; "
                             "bind the toggle input with intervene_button / intervene_key")
        if expect is int and binding < 0:
            raise ValueError(f"events.{name}: button number must be non-negative, got {binding}")


def _check_unique_inputs(bindings: list[tuple[str, object]]) -> None:
    """No input may drive two things (e.g. one key both moving the arm and marking success)."""
    seen: dict[object, str] = {}
    for where, value in bindings:
        if value is None:
            continue
        if value in seen:
            raise ValueError(f"{where}: {value!r} is already bound to {seen[value]}")
        seen[value] = where


def _check_intervene(mode: str, button: object, field_name: str) -> None:
    if mode in ("hold_button", "toggle") and button is None:
        raise ValueError(f"{field_name}: required with intervene: {mode}")


# --- keyboard -------------------------------------------------------------------------------------

# Names of the non-printing keys a terminal reports (arrows etc. arrive as escape sequences).
KEY_NAMES = ("up", "down", "left", "right", "page_up", "page_down", "home", "end", "insert",
             "delete", "space", "enter", "tab", "backspace", "esc")


def _check_key(key: str, where: str) -> None:
    if len(key) == 1 and key.isprintable() and key != " ":
        return
    if key not in KEY_NAMES:
        raise ValueError(f"{where}: {key!r} is not a key (a single printable character or one of "
                         f"{', '.join(KEY_NAMES)})")


@dataclass(frozen=True)
class KeyAxis:
    """Two keys driving one motion dimension: ``plus`` commands +scale, ``minus`` -scale."""

    plus: str
    minus: str
    scale: float = 1.0

    def validate(self) -> None:
        _check_key(self.plus, "plus")
        _check_key(self.minus, "minus")
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"scale must lie in (0, 1], got {self.scale}")


@dataclass(frozen=True)
class KeyboardMotion:
    x: Optional[KeyAxis] = None
    y: Optional[KeyAxis] = None
    z: Optional[KeyAxis] = None
    yaw: Optional[KeyAxis] = None


@dataclass(frozen=True)
class KeyboardGripper:
    """Keys that latch the gripper closed or open, or toggle it."""

    close: Optional[str] = None
    open: Optional[str] = None
    toggle: Optional[str] = None

    def validate(self) -> None:
        for name in ("close", "open", "toggle"):
            if getattr(self, name) is not None:
                _check_key(getattr(self, name), name)


@dataclass(frozen=True)
class KeyboardTeleopConfig:
    """Keys in the terminal the actor runs in (no X server needed).

    A terminal reports key presses only, never releases: a key counts as held for ``key_hold_s``
    after a single press (long enough to bridge the terminal's auto-repeat delay) and for
    ``key_repeat_hold_s`` after an auto-repeated press, so letting go stops the arm that much later.
    """

    device: Literal["keyboard"] = "keyboard"
    intervene: InterveneMode = "deadband"
    intervene_key: Optional[str] = None
    key_hold_s: float = 0.5
    key_repeat_hold_s: float = 0.1
    # A lone ESC byte is the Esc key only once no escape-sequence byte follows within this time.
    escape_timeout_s: float = 0.03
    poll_interval_s: float = 0.01
    motion: KeyboardMotion = field(default_factory=KeyboardMotion)
    gripper: KeyboardGripper = field(default_factory=KeyboardGripper)
    # event name (OperatorEvent value) -> key
    events: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        _check_intervene(self.intervene, self.intervene_key, "intervene_key")
        if self.intervene_key is not None:
            _check_key(self.intervene_key, "intervene_key")
        for name, key in self.events.items():
            _check_key(key, f"events.{name}")
        _check_events(self.events, str)
        for name in ("key_hold_s", "key_repeat_hold_s", "escape_timeout_s", "poll_interval_s"):
            if not 0.0 < getattr(self, name) <= 5.0:
                raise ValueError(f"{name} must lie in (0, 5] s, got {getattr(self, name)}")
        bindings: list[tuple[str, object]] = []
        for axis in MOTION_AXES:
            keys = getattr(self.motion, axis)
            if keys is not None:
                bindings += [(f"motion.{axis}.plus", keys.plus), (f"motion.{axis}.minus", keys.minus)]
        bindings += [(f"gripper.{name}", getattr(self.gripper, name)) for name in ("close", "open", "toggle")]
        bindings += [("intervene_key", self.intervene_key)]
        bindings += [(f"events.{name}", key) for name, key in self.events.items()]
        _check_unique_inputs([(where, key.lower() if isinstance(key, str) and len(key) == 1 else key)
                              for where, key in bindings])


# --- analogue devices (gamepad, SpaceMouse) -------------------------------------------------------

@dataclass(frozen=True)
class AxisBinding:
    """One analogue input feeding a motion dimension: ``scale * value`` (value in [-1, 1] after the
    dead-band). Set exactly one of ``axis`` (a stick or trigger axis, a SpaceMouse channel) or
    ``hat_x`` / ``hat_y`` (one direction of that hat, the d-pad)."""

    axis: Optional[int] = None
    hat_x: Optional[int] = None
    hat_y: Optional[int] = None
    scale: float = 1.0

    def validate(self) -> None:
        chosen = [name for name in ("axis", "hat_x", "hat_y") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one of axis, hat_x, hat_y (got {', '.join(chosen) or 'none'})")
        if self.index < 0:
            raise ValueError(f"{self.source}: must be non-negative, got {self.index}")
        if not -1.0 <= self.scale <= 1.0 or self.scale == 0.0:
            raise ValueError(f"scale must lie in [-1, 1] and not be 0 (its sign is the direction), got {self.scale}")

    @property
    def source(self) -> str:
        """``axis``, ``hat_x`` or ``hat_y``."""
        return next(name for name in ("axis", "hat_x", "hat_y") if getattr(self, name) is not None)

    @property
    def index(self) -> int:
        """The axis or hat number."""
        return getattr(self, self.source)


@dataclass(frozen=True)
class AnalogMotion:
    """Per motion dimension, the inputs summed into it (clipped to [-1, 1])."""

    x: tuple[AxisBinding, ...] = ()
    y: tuple[AxisBinding, ...] = ()
    z: tuple[AxisBinding, ...] = ()
    yaw: tuple[AxisBinding, ...] = ()


@dataclass(frozen=True)
class ButtonGripper:
    """Buttons that latch the gripper closed or open, or toggle it."""

    close: Optional[int] = None
    open: Optional[int] = None
    toggle: Optional[int] = None

    def validate(self) -> None:
        for name in ("close", "open", "toggle"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}: button number must be non-negative, got {value}")


def _button_bindings(gripper: ButtonGripper, intervene_button: Optional[int],
                     events: dict[str, int]) -> list[tuple[str, object]]:
    return ([(f"gripper.{name}", getattr(gripper, name)) for name in ("close", "open", "toggle")]
            + [("intervene_button", intervene_button)]
            + [(f"events.{name}", button) for name, button in events.items()])


def _check_deadband(deadband: float) -> None:
    if not 0.0 <= deadband < 1.0:
        raise ValueError(f"deadband must lie in [0, 1), got {deadband}")


@dataclass(frozen=True)
class GamepadTeleopConfig:
    """A gamepad through pygame's joystick API (SDL2). Axis, button and hat numbers depend on the
    pad and the OS driver: check yours with ``python -m actor.teleop <config>``."""

    device: Literal["gamepad"] = "gamepad"
    # Which pad: the first whose name contains name_contains (case-insensitive), else this index.
    joystick_index: int = 0
    name_contains: str = ""
    deadband: float = 0.15
    intervene: InterveneMode = "deadband"
    intervene_button: Optional[int] = None
    poll_interval_s: float = 0.01
    motion: AnalogMotion = field(default_factory=AnalogMotion)
    gripper: ButtonGripper = field(default_factory=ButtonGripper)
    # event name (OperatorEvent value) -> button number
    events: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        _check_deadband(self.deadband)
        _check_intervene(self.intervene, self.intervene_button, "intervene_button")
        _check_events(self.events, int)
        if self.joystick_index < 0:
            raise ValueError(f"joystick_index must be non-negative, got {self.joystick_index}")
        if not 0.0 < self.poll_interval_s <= 1.0:
            raise ValueError(f"poll_interval_s must lie in (0, 1] s, got {self.poll_interval_s}")
        _check_unique_inputs(_button_bindings(self.gripper, self.intervene_button, self.events))


SPACEMOUSE_CHANNELS = 6  # translation x, y, z, rotation x, y, z


@dataclass(frozen=True)
class SpaceMouseTeleopConfig:
    """A 3Dconnexion SpaceMouse read as raw HID reports through hidapi (no 3Dconnexion driver).

    Channels 0-2 are the raw translation x, y, z and 3-5 the raw rotation x, y, z of the HID
    reports; a full push reads about ``full_scale`` counts.
    """

    device: Literal["spacemouse"] = "spacemouse"
    # Accepted (vendor id, product id) pairs, tried in order.
    devices: tuple[tuple[int, int], ...] = ()
    full_scale: float = 350.0
    deadband: float = 0.1
    intervene: InterveneMode = "deadband"
    intervene_button: Optional[int] = None
    read_timeout_ms: int = 20
    motion: AnalogMotion = field(default_factory=AnalogMotion)
    gripper: ButtonGripper = field(default_factory=ButtonGripper)
    events: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.devices:
            raise ValueError("devices: list at least one [vendor_id, product_id] pair")
        for index, (vendor, product) in enumerate(self.devices):
            if not (0 <= vendor <= 0xFFFF and 0 <= product <= 0xFFFF):
                raise ValueError(f"devices[{index}]: vendor and product ids are 16-bit, got {vendor}, {product}")
        _check_deadband(self.deadband)
        _check_intervene(self.intervene, self.intervene_button, "intervene_button")
        _check_events(self.events, int)
        if self.full_scale <= 0:
            raise ValueError(f"full_scale must be positive, got {self.full_scale}")
        if not 1 <= self.read_timeout_ms <= 1000:
            raise ValueError(f"read_timeout_ms must lie in [1, 1000], got {self.read_timeout_ms}")
        for axis in MOTION_AXES:
            for position, binding in enumerate(getattr(self.motion, axis)):
                if binding.source != "axis" or binding.index >= SPACEMOUSE_CHANNELS:
                    raise ValueError(f"motion.{axis}[{position}]: a SpaceMouse has axis channels "
                                     f"0..{SPACEMOUSE_CHANNELS - 1} only, got {binding.source} {binding.index}")
        _check_unique_inputs(_button_bindings(self.gripper, self.intervene_button, self.events))


# --- simulated operator ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SimulatedOperatorConfig:
    """A scripted stand-in for a person watching the policy in the PyBullet cell.

    It watches whether the task moves forward (the scripted expert's progress score: the hand closing
    in on the cube, the cube rising); after ``patience_steps`` steps without a gain of
    ``min_progress_m`` it reacts ``reaction_delay_steps`` later and steers with the expert (plus
    Gaussian noise on the motion) for ``hold_steps``, then watches again. It never exceeds
    ``max_episode_share`` of an episode's steps so far nor ``max_total_share`` of all steps so far.
    """

    device: Literal["simulated_operator"] = "simulated_operator"
    # The least gain in the task's progress score (metres) that counts as the task moving forward.
    min_progress_m: float = 0.005
    # Steps without progress before the operator decides to step in; long enough for a grasp to close.
    patience_steps: int = 6
    reaction_delay_steps: int = 2
    hold_steps: int = 10
    noise_std: float = 0.05
    max_episode_share: float = 0.5
    max_total_share: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        if self.min_progress_m <= 0:
            raise ValueError(f"min_progress_m must be positive, got {self.min_progress_m}")
        if self.patience_steps < 1 or self.hold_steps < 1:
            raise ValueError("patience_steps and hold_steps must be at least 1")
        if self.reaction_delay_steps < 0:
            raise ValueError(f"reaction_delay_steps must be non-negative, got {self.reaction_delay_steps}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be non-negative, got {self.noise_std}")
        for name in ("max_episode_share", "max_total_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


TeleopConfig = Union[KeyboardTeleopConfig, GamepadTeleopConfig, SpaceMouseTeleopConfig, SimulatedOperatorConfig]

TELEOP_CONFIG_CLASSES: dict[str, type] = {
    "keyboard": KeyboardTeleopConfig,
    "gamepad": GamepadTeleopConfig,
    "spacemouse": SpaceMouseTeleopConfig,
    "simulated_operator": SimulatedOperatorConfig,
}


def teleop_config_path(path_or_name: Union[str, Path]) -> Path:
    """A bundled device name (``keyboard``, ``gamepad_xbox``...) or a path to a YAML file."""
    candidate = Path(path_or_name)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate
    return TELEOP_CONFIG_DIR / f"{path_or_name}.yaml"


def teleop_config_from_dict(data: object, source: str = "") -> TeleopConfig:
    """Build the config class its ``device`` field names; errors name ``source`` and the field."""
    prefix = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}top level: expected a mapping with a device field, got {type(data).__name__}")
    kinds = ", ".join(TELEOP_CONFIG_CLASSES)
    if "device" not in data:
        raise ConfigError(f"{prefix}device: required field is missing (one of {kinds})")
    cls = TELEOP_CONFIG_CLASSES.get(data["device"]) if isinstance(data["device"], str) else None
    if cls is None:
        raise ConfigError(f"{prefix}device: expected one of {kinds}, got {data['device']!r}")
    return load_dataclass(cls, data, source)


def load_teleop_config(path_or_name: Union[str, Path]) -> TeleopConfig:
    """Read a teleop YAML (see :func:`teleop_config_path`) into its typed config."""
    path = teleop_config_path(path_or_name)
    try:
        text = path.read_text()
    except OSError as error:
        bundled = ", ".join(sorted(p.stem for p in TELEOP_CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"{path}: cannot read teleop config: {error.strerror} "
                          f"(bundled devices: {bundled})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    return teleop_config_from_dict(data, str(path))
