"""Teleop devices, their YAML mappings, and the intervention wrapper over the real PyBullet cell.

Devices are driven through their real input paths where this machine allows it: key bytes through
an ``os.pipe()`` (and a pseudo-terminal for the cbreak/restore check), real pygame events on SDL's
queue with an injected joystick object, and raw SpaceMouse HID report bytes from an injected
hid.device-like object.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import struct
import termios
import time
from pathlib import Path

import numpy as np
import pytest

from actor.intervention import InterventionWrapper
from actor.simulated_operator import SimulatedOperator
from actor.teleop import (
    GamepadTeleop,
    KeyboardTeleop,
    OperatorEvent,
    SpaceMouseReportParser,
    SpaceMouseTeleop,
    TeleopDevice,
    TeleopError,
    TeleopReading,
    TerminalKeyDecoder,
    apply_deadband,
    make_teleop_device,
)
from hardware_configs.loader import ConfigError
from hardware_configs.schema import load_config
from hardware_configs.teleop import (
    TELEOP_CONFIG_DIR,
    GamepadTeleopConfig,
    KeyboardTeleopConfig,
    SimulatedOperatorConfig,
    SpaceMouseTeleopConfig,
    load_teleop_config,
)

TIMEOUT_S = 3.0


def wait_for(device: TeleopDevice, predicate, timeout_s: float = TIMEOUT_S) -> tuple[TeleopReading, list]:
    """Read until ``predicate(reading)``; returns the last reading and all events seen."""
    events: list[OperatorEvent] = []
    deadline = time.monotonic() + timeout_s
    while True:
        reading = device.read()
        events += reading.events
        if predicate(reading):
            return reading, events
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last reading {reading}, events {events}")
        time.sleep(0.005)


def wait_for_event(device: TeleopDevice, event: OperatorEvent) -> list:
    seen: list[OperatorEvent] = []

    def arrived(reading: TeleopReading) -> bool:
        seen.extend(reading.events)
        return event in seen

    wait_for(device, arrived)
    return seen


# --- keyboard ---------------------------------------------------------------------------------------

def keyboard_config(**changes) -> KeyboardTeleopConfig:
    config = load_teleop_config("keyboard")
    return dataclasses.replace(config, **{"key_hold_s": 0.25, "key_repeat_hold_s": 0.05, **changes})


def test_terminal_key_decoder_handles_split_escape_sequences_and_lone_esc():
    decoder = TerminalKeyDecoder(escape_timeout_s=0.03)
    assert decoder.feed(b"wW\r \x7f", now=0.0) == ["w", "w", "enter", "space", "backspace"]
    assert decoder.feed(b"\x1b[A\x1bOB\x1b[5~", now=0.0) == ["up", "down", "page_up"]
    assert decoder.feed(b"\x1b", now=1.0) == []            # may be the start of a sequence
    assert decoder.feed(b"[", now=1.01) == []
    assert decoder.feed(b"D", now=1.02) == ["left"]
    assert decoder.feed(b"\x1b", now=2.0) == []
    assert decoder.flush(now=2.01) == []
    assert decoder.flush(now=2.05) == ["esc"]              # nothing followed: the Esc key
    assert decoder.feed(b"\x1b[99~x\x01", now=3.0) == ["x"]  # unknown sequence and Ctrl-A ignored


def test_keyboard_keys_move_hold_and_release(key_pipe):
    read_fd, write_fd = key_pipe
    device = KeyboardTeleop(keyboard_config(), action_dim=4, fd=read_fd)
    device.start()
    try:
        reading = device.read()
        assert reading.connected and not reading.active
        os.write(write_fd, b"w")
        reading, _ = wait_for(device, lambda r: r.active)
        np.testing.assert_array_equal(reading.action[:3], [1.0, 0.0, 0.0])
        assert np.isnan(reading.action[3])  # gripper untouched: no command
        # No key-up in a terminal: released once key_hold_s passes without a repeat.
        reading, _ = wait_for(device, lambda r: not r.active)
        np.testing.assert_array_equal(reading.action[:3], 0.0)
        os.write(write_fd, b"fd")  # down and right together
        reading, _ = wait_for(device, lambda r: r.active and r.action[1] != 0 and r.action[2] != 0)
        np.testing.assert_array_equal(reading.action[:3], [0.0, -1.0, -1.0])
        os.write(write_fd, b"c")
        reading, _ = wait_for(device, lambda r: r.action[3] == 1.0)
        wait_for(device, lambda r: not r.active)
        assert device.read().action[3] == 1.0  # the gripper latches
        device.on_episode_start()
        assert np.isnan(device.read().action[3])
    finally:
        device.close()


def test_keyboard_events_arrive_once(key_pipe):
    read_fd, write_fd = key_pipe
    device = KeyboardTeleop(keyboard_config(), action_dim=5, fd=read_fd)
    device.start()
    try:
        os.write(write_fd, b"\r")
        assert wait_for_event(device, OperatorEvent.MARK_SUCCESS) == [OperatorEvent.MARK_SUCCESS]
        assert device.read().events == ()
        os.write(write_fd, b" pz")
        seen = wait_for_event(device, OperatorEvent.RERECORD)
        assert seen == [OperatorEvent.EMERGENCY_STOP, OperatorEvent.PAUSE_TOGGLE, OperatorEvent.RERECORD]
        assert not device.read().active  # events are not motion
    finally:
        device.close()


def test_keyboard_hold_button_and_toggle_modes(key_pipe):
    read_fd, write_fd = key_pipe
    device = KeyboardTeleop(keyboard_config(intervene="hold_button", intervene_key="i"), 4, fd=read_fd)
    device.start()
    try:
        os.write(write_fd, b"w")
        reading, _ = wait_for(device, lambda r: r.action[0] == 1.0)
        assert not reading.active  # motion alone does not take over
        os.write(write_fd, b"i")
        wait_for(device, lambda r: r.active)
        wait_for(device, lambda r: not r.active)
    finally:
        device.close()

    read_fd2, write_fd2 = os.pipe()
    device = KeyboardTeleop(keyboard_config(intervene="toggle", intervene_key="i"), 4, fd=read_fd2)
    device.start()
    try:
        os.write(write_fd2, b"i")
        _, events = wait_for(device, lambda r: r.active)
        assert OperatorEvent.INTERVENE_TOGGLE in events
        time.sleep(0.4)  # well past key_hold_s: a toggle stays on without keys held
        reading = device.read()
        assert reading.active
        np.testing.assert_array_equal(reading.action[:3], 0.0)  # active with no motion: hold still
        os.write(write_fd2, b"i")
        wait_for(device, lambda r: not r.active)
    finally:
        device.close()
        os.close(read_fd2)
        os.close(write_fd2)


def test_keyboard_end_of_input_is_a_fault(key_pipe):
    read_fd, write_fd = key_pipe
    device = KeyboardTeleop(keyboard_config(), 4, fd=read_fd)
    device.start()
    try:
        os.write(write_fd, b"w")
        wait_for(device, lambda r: r.active)
        os.close(write_fd)
        reading, _ = wait_for(device, lambda r: r.fault is not None)
        assert not reading.connected and not reading.active
        assert "end of file" in reading.fault
    finally:
        device.close()


def test_keyboard_on_a_terminal_sets_cbreak_and_restores_it():
    controller, terminal = os.openpty()
    before = termios.tcgetattr(terminal)
    device = KeyboardTeleop(keyboard_config(), 4, fd=terminal)
    try:
        device.start()
        during = termios.tcgetattr(terminal)
        assert not during[3] & termios.ICANON and not during[3] & termios.ECHO
        os.write(controller, b"a")
        reading, _ = wait_for(device, lambda r: r.active)
        assert reading.action[1] == 1.0
        device.close()
        assert termios.tcgetattr(terminal) == before
    finally:
        device.close()
        os.close(controller)
        os.close(terminal)


# --- gamepad ----------------------------------------------------------------------------------------

class FakeJoystick:
    """Stands in for pygame.joystick.JoystickType (same method names and return types)."""

    def __init__(self, instance_id: int = 4242, axes: int = 6, buttons: int = 11, hats: int = 1) -> None:
        self.instance_id = instance_id
        self.axes = [0.0] * axes
        self.buttons = [False] * buttons
        self.hats = [(0, 0)] * hats

    def get_name(self) -> str:
        return "Fake Xbox pad"

    def get_instance_id(self) -> int:
        return self.instance_id

    def get_numaxes(self) -> int:
        return len(self.axes)

    def get_numbuttons(self) -> int:
        return len(self.buttons)

    def get_numhats(self) -> int:
        return len(self.hats)

    def get_axis(self, axis: int) -> float:
        return self.axes[axis]

    def get_button(self, button: int) -> bool:
        return self.buttons[button]

    def get_hat(self, hat: int) -> tuple[int, int]:
        return self.hats[hat]


@pytest.fixture
def pygame():
    return pytest.importorskip("pygame")


def test_gamepad_fake_has_the_joystick_api(pygame):
    wanted = {name for name in dir(FakeJoystick) if name.startswith("get_")}
    assert wanted <= set(dir(pygame.joystick.JoystickType))


def test_gamepad_axes_hats_deadband_buttons_and_removal(pygame):
    pad = FakeJoystick()
    device = GamepadTeleop(load_teleop_config("gamepad_xbox"), 4, joystick=pad)
    device.start()
    try:
        pad.axes[1] = -0.1  # inside the 0.15 dead-band: a resting stick
        time.sleep(0.05)
        assert not device.read().active
        pad.axes[1] = -0.8  # left stick pushed away: +x
        reading, _ = wait_for(device, lambda r: r.active)
        assert reading.action[0] == pytest.approx(apply_deadband(0.8, 0.15))
        assert reading.action[0] == pytest.approx((0.8 - 0.15) / 0.85)
        pad.axes[1] = 0.0
        pad.hats[0] = (0, 1)  # d-pad up: +z at half speed
        reading, _ = wait_for(device, lambda r: r.action[0] == 0.0 and r.action[2] != 0.0)
        assert reading.active and reading.action[2] == pytest.approx(0.5)
        pad.hats[0] = (0, 0)
        wait_for(device, lambda r: not r.active)

        pygame.event.post(pygame.event.Event(pygame.JOYBUTTONDOWN, instance_id=pad.instance_id, button=5, joy=0))
        reading, _ = wait_for(device, lambda r: r.action[3] == 1.0)  # RB closes the gripper
        pygame.event.post(pygame.event.Event(pygame.JOYBUTTONDOWN, instance_id=pad.instance_id, button=0, joy=0))
        wait_for_event(device, OperatorEvent.MARK_SUCCESS)
        # Another pad's button is not ours.
        pygame.event.post(pygame.event.Event(pygame.JOYBUTTONDOWN, instance_id=pad.instance_id + 1, button=1, joy=1))
        time.sleep(0.05)
        assert device.read().events == ()

        pad.axes[0] = 1.0
        wait_for(device, lambda r: r.active)
        pygame.event.post(pygame.event.Event(pygame.JOYDEVICEREMOVED, instance_id=pad.instance_id))
        reading, _ = wait_for(device, lambda r: r.fault is not None)
        assert not reading.connected and not reading.active and "disconnected" in reading.fault
    finally:
        device.close()


def test_gamepad_hold_button_mode_polls_the_held_button(pygame):
    pad = FakeJoystick()
    config = dataclasses.replace(load_teleop_config("gamepad_xbox"), intervene="hold_button", intervene_button=9)
    device = GamepadTeleop(config, 5, joystick=pad)
    device.start()
    try:
        pad.axes[3] = 0.5  # right stick: yaw
        reading, _ = wait_for(device, lambda r: r.action[3] != 0.0)
        assert not reading.active
        pad.buttons[9] = True
        reading, _ = wait_for(device, lambda r: r.active)
        assert reading.action[3] == pytest.approx(-apply_deadband(0.5, 0.15))
        pad.buttons[9] = False
        wait_for(device, lambda r: not r.active)
    finally:
        device.close()


def test_gamepad_checks_the_mapping_against_the_pad(pygame):
    device = GamepadTeleop(load_teleop_config("gamepad_xbox"), 4, joystick=FakeJoystick(axes=2))
    with pytest.raises(TeleopError, match=r"motion\.z\[0\]: axis 4 does not exist"):
        device.start()
    device = GamepadTeleop(load_teleop_config("gamepad_xbox"), 4, joystick=FakeJoystick(buttons=4))
    with pytest.raises(TeleopError, match=r"gripper\.(close|open): button \d does not exist"):
        device.start()


def test_gamepad_without_a_pad_says_so(pygame):
    device = GamepadTeleop(load_teleop_config("gamepad_xbox"), 4)
    try:
        device.start()
    except TeleopError as error:
        assert "no gamepad found" in str(error)
    else:
        device.close()
        pytest.skip("a real gamepad is connected")


# --- SpaceMouse ---------------------------------------------------------------------------------------

def translation_report(x: int, y: int, z: int) -> bytes:
    return struct.pack("<Bhhh", 1, x, y, z)


def rotation_report(rx: int, ry: int, rz: int) -> bytes:
    return struct.pack("<Bhhh", 2, rx, ry, rz)


def button_report(mask: int) -> bytes:
    return bytes([3]) + mask.to_bytes(2, "little")


def test_spacemouse_parser_on_raw_reports():
    parser = SpaceMouseReportParser()
    assert parser.feed(translation_report(100, -200, 350))
    assert parser.feed(rotation_report(-1, 2, -32768))
    np.testing.assert_array_equal(parser.channels, [100, -200, 350, -1, 2, -32768])
    # Wireless models: translation and rotation in one 13-byte report 1.
    assert parser.feed(struct.pack("<Bhhhhhh", 1, 1, 2, 3, 4, 5, 6))
    np.testing.assert_array_equal(parser.channels, [1, 2, 3, 4, 5, 6])
    assert parser.feed(button_report(0b10))
    assert parser.buttons == 2
    for garbage in (b"", b"\x01\x00\x01", b"\x02\x05", b"\x03", [1, 300, 0, 0, 0, 0, 0], [1, -1], None):
        assert not parser.feed(garbage)
    assert not parser.feed(b"\x17\x64")  # battery level: not ours
    assert parser.malformed_reports == 7 and parser.ignored_reports == 1
    np.testing.assert_array_equal(parser.channels, [1, 2, 3, 4, 5, 6])
    assert parser.buttons == 2


class FakeHidDevice:
    """hid.device-like: open_path / read(size, timeout_ms) -> list[int] / close."""

    def __init__(self) -> None:
        self.reports: queue.Queue = queue.Queue()
        self.opened_path: bytes | None = None
        self.unplugged = False
        self.closed = False

    def open_path(self, path: bytes) -> None:
        self.opened_path = path

    def read(self, max_length: int, timeout_ms: int = 0) -> list[int]:
        if self.unplugged:
            raise OSError("read error")
        try:
            report = self.reports.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            return []
        return list(report)[:max_length] if isinstance(report, bytes) else report

    def close(self) -> None:
        self.closed = True


class FakeHidApi:
    """The ``hid`` module's enumerate() and device()."""

    def __init__(self, entries: list[dict], device: FakeHidDevice) -> None:
        self.entries = entries
        self._device = device

    def enumerate(self, vendor_id: int = 0, product_id: int = 0) -> list[dict]:
        return list(self.entries)

    def device(self) -> FakeHidDevice:
        return self._device


def spacemouse_entry(product_id: int = 0xC635, **extra) -> dict:
    return {"vendor_id": 0x256F, "product_id": product_id, "path": b"/dev/hidraw7",
            "product_string": "SpaceMouse Compact", "usage_page": 1, "usage": 8, **extra}


def test_spacemouse_device_maps_reports_to_actions_and_buttons():
    hid_device = FakeHidDevice()
    api = FakeHidApi([{"vendor_id": 0x046D, "product_id": 0xC52B, "path": b"/dev/hidraw0"},
                      spacemouse_entry(usage=2), spacemouse_entry(path=b"/dev/hidraw8")], hid_device)
    device = SpaceMouseTeleop(load_teleop_config("spacemouse"), 5, hid_api=api)
    device.start()
    try:
        assert hid_device.opened_path == b"/dev/hidraw8"  # the multi-axis interface
        hid_device.reports.put(translation_report(0, -350, 175))  # pushed away and pressed down
        reading, _ = wait_for(device, lambda r: r.active)
        np.testing.assert_allclose(reading.action[:4], [1.0, 0.0, -apply_deadband(0.5, 0.1), 0.0], atol=1e-6)
        hid_device.reports.put(rotation_report(0, 0, 350))
        reading, _ = wait_for(device, lambda r: r.action[3] != 0.0)
        assert reading.action[3] == pytest.approx(-1.0)
        hid_device.reports.put(translation_report(10, -20, 5))  # within the dead-band
        hid_device.reports.put(rotation_report(0, 0, 0))
        wait_for(device, lambda r: not r.active)

        for garbage in (b"\x01\xff", [7, 1, 2], b"\x03", [3, 256]):  # (an empty read is a timeout)
            hid_device.reports.put(garbage)
        hid_device.reports.put(button_report(0b01))  # left button: close the gripper
        reading, _ = wait_for(device, lambda r: r.action[4] == 1.0)
        assert reading.active and reading.connected  # holding a gripper button is commanding
        assert device.parser.malformed_reports == 3 and device.parser.ignored_reports == 1
        hid_device.reports.put(button_report(0))
        reading, _ = wait_for(device, lambda r: not r.active)
        assert reading.action[4] == 1.0
        hid_device.reports.put(button_report(0b10))
        wait_for(device, lambda r: r.action[4] == -1.0)

        hid_device.unplugged = True
        reading, _ = wait_for(device, lambda r: r.fault is not None)
        assert not reading.connected and not reading.active
        assert "unplugged" in reading.fault and "256f:c635" in reading.fault
    finally:
        device.close()
    assert hid_device.closed


def test_spacemouse_buttons_can_carry_events():
    hid_device = FakeHidDevice()
    config = dataclasses.replace(load_teleop_config("spacemouse"), events={"mark_success": 2, "emergency_stop": 3})
    device = SpaceMouseTeleop(config, 4, hid_api=FakeHidApi([spacemouse_entry()], hid_device))
    device.start()
    try:
        hid_device.reports.put(button_report(0b1100))
        seen = wait_for_event(device, OperatorEvent.EMERGENCY_STOP)
        assert seen == [OperatorEvent.MARK_SUCCESS, OperatorEvent.EMERGENCY_STOP]
        hid_device.reports.put(button_report(0b1100))  # still held: no new press
        hid_device.reports.put(button_report(0))
        time.sleep(0.1)
        assert device.read().events == ()
    finally:
        device.close()


def test_spacemouse_missing_device_names_vendor_and_product():
    api = FakeHidApi([{"vendor_id": 0x046D, "product_id": 0xC52B, "path": b"/dev/hidraw0"}], FakeHidDevice())
    device = SpaceMouseTeleop(load_teleop_config("spacemouse"), 4, hid_api=api)
    with pytest.raises(TeleopError, match=r"no SpaceMouse found.*256f:c635.*connected HID devices: 046d:c52b"):
        device.start()


# --- configs ------------------------------------------------------------------------------------------

def test_bundled_teleop_configs_load_and_build(pygame):
    robot = load_config("sim_panda_pick_cube").robot
    kinds = {"keyboard": KeyboardTeleopConfig, "gamepad_xbox": GamepadTeleopConfig,
             "spacemouse": SpaceMouseTeleopConfig, "simulated_operator": SimulatedOperatorConfig}
    assert {path.stem for path in TELEOP_CONFIG_DIR.glob("*.yaml")} == set(kinds)
    for name, cls in kinds.items():
        assert isinstance(load_teleop_config(name), cls)
        assert isinstance(load_teleop_config(TELEOP_CONFIG_DIR / f"{name}.yaml"), cls)
    assert isinstance(make_teleop_device("keyboard", 4, fd=0), KeyboardTeleop)
    assert isinstance(make_teleop_device("gamepad_xbox", 5, joystick=FakeJoystick()), GamepadTeleop)
    assert isinstance(make_teleop_device("spacemouse", 4, hid_api=FakeHidApi([], FakeHidDevice())), SpaceMouseTeleop)
    assert isinstance(make_teleop_device("simulated_operator", 4, robot=robot), SimulatedOperator)
    with pytest.raises(TeleopError, match="action_dim=7"):
        make_teleop_device("keyboard", 7)
    with pytest.raises(ConfigError, match="needs robot="):
        make_teleop_device("simulated_operator", 4)


@pytest.mark.parametrize("text, message", [
    ("device: keyboard\nevents: {mark_sucess: k}\n", r"events\.mark_sucess: unknown operator event"),
    ("device: keyboard\nmotion: {x: {plus: w, minus: s}}\nevents: {mark_success: W}\n",
     r"events\.mark_success: 'w' is already bound to motion\.x\.plus"),
    ("device: keyboard\nmotion: {z: {plus: up, minus: pgdown}}\n", r"motion\.z: minus: 'pgdown' is not a key"),
    ("device: keyboard\nintervene: hold_button\n", r"intervene_key: required with intervene: hold_button"),
    ("device: gamepad\nmotion: {x: [{axis: 1, hat_y: 0}]}\n", r"motion\.x\[0\]: set exactly one of axis, hat_x, hat_y"),
    ("device: gamepad\nmotion: {y: [{axis: 1, scale: -2}]}\n", r"motion\.y\[0\]: scale must lie in \[-1, 1\]"),
    ("device: gamepad\ndeadband: 1.5\n", r"deadband must lie in \[0, 1\)"),
    ("device: gamepad\nmotion: {yaw: [{axis: one}]}\n", r"motion\.yaw\[0\]\.axis: expected int, got 'one'"),
    ("device: gamepad\ngripper: {close: 3}\nevents: {resume: 3}\n", r"events\.resume: 3 is already bound to gripper\.close"),
    ("device: spacemouse\ndevices: [[0x256F, 0xC635]]\nmotion: {x: [{axis: 7}]}\n",
     r"motion\.x\[0\]: a SpaceMouse has axis channels 0\.\.5"),
    ("device: spacemouse\n", r"devices: list at least one"),
    ("device: simulated_operator\nmax_episode_share: 1.5\n", r"max_episode_share must lie in \[0, 1\]"),
    ("device: simulated_operator\nhold_step: 3\n", r"hold_step: unknown field"),
    ("device: trackball\n", r"device: expected one of keyboard, gamepad, spacemouse, simulated_operator"),
    ("motion: {}\n", r"device: required field is missing"),
])
def test_bad_teleop_mappings_fail_naming_file_and_field(tmp_path: Path, text: str, message: str):
    path = tmp_path / "my_device.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as raised:
        load_teleop_config(path)
    assert str(raised.value).startswith(str(path))


def test_missing_teleop_config_lists_the_bundled_ones():
    with pytest.raises(ConfigError, match=r"cannot read teleop config.*gamepad_xbox, keyboard"):
        load_teleop_config("joystick_of_doom")


# --- the intervention wrapper over the PyBullet cell --------------------------------------------------

@pytest.fixture
def pick_cube():
    from actor.env import make_env

    config = load_config("sim_panda_pick_cube")
    config = dataclasses.replace(config, env=dataclasses.replace(config.env, connection="inproc"))
    env = make_env(config)
    yield config, env
    env.close()


def run_episodes(env, policy, seeds, record=None) -> list[dict]:
    """Episodes with ``policy(observation) -> action``; per episode: success, length, rate."""
    results = []
    for seed in seeds:
        observation, _ = env.reset(seed=seed)
        steps = 0
        while True:
            action = policy(observation)
            observation, _, terminated, truncated, info = env.step(action)
            steps += 1
            if record is not None:
                record.append((action, info))
            if terminated or truncated:
                break
        results.append({"success": bool(info["success"]), "length": steps,
                        "intervention_rate": info.get("intervention_rate")})
    return results


def test_simulated_operator_rescues_a_random_policy_within_its_budget(pick_cube):
    config, env = pick_cube
    seeds = range(300, 306)
    rng = np.random.default_rng(0)

    def random_policy(_observation):
        return rng.uniform(-1.0, 1.0, 4).astype(np.float32)

    alone = run_episodes(env, random_policy, seeds)

    operator_config = load_teleop_config("simulated_operator")
    operator = SimulatedOperator(operator_config, config.robot)
    wrapped = InterventionWrapper(env, operator)
    record: list = []
    helped = run_episodes(wrapped, random_policy, seeds, record)

    successes_alone = sum(r["success"] for r in alone)
    successes_helped = sum(r["success"] for r in helped)
    assert successes_alone == 0
    assert successes_helped >= 2 and successes_helped > successes_alone, (alone, helped)

    intervened = np.array([info["intervened"] for _, info in record])
    assert set(np.unique(intervened)) == {0.0, 1.0}
    assert operator.takeovers >= len(seeds)
    for result in helped:
        assert 0.0 < result["intervention_rate"] <= operator_config.max_episode_share
    assert intervened.mean() <= operator_config.max_total_share
    assert wrapped.total_intervention_rate == pytest.approx(intervened.mean())
    assert operator.total_interventions == intervened.sum()
    for policy_action, info in record:
        executed = info["executed_action"]
        assert executed.dtype == np.float32 and executed.shape == (4,)
        if info["intervened"]:
            assert not np.array_equal(executed, policy_action)
        else:
            np.testing.assert_array_equal(executed, policy_action)
        assert info["operator_events"] == ()


def test_simulated_operator_leaves_a_good_policy_alone_and_is_deterministic(pick_cube):
    from policies.scripted import ScriptedExpert

    config, env = pick_cube
    expert = ScriptedExpert(config.robot)
    operator = SimulatedOperator(load_teleop_config("simulated_operator"), config.robot)
    results = run_episodes(InterventionWrapper(env, operator), expert.act, [7, 8])
    assert all(r["success"] and r["intervention_rate"] == 0.0 for r in results)
    assert operator.total_interventions == 0 and operator.total_steps == sum(r["length"] for r in results)

    def zero_policy(_observation):
        return np.zeros(4, np.float32)

    traces = []
    for _ in range(2):
        operator = SimulatedOperator(load_teleop_config("simulated_operator"), config.robot)
        record: list = []
        run_episodes(InterventionWrapper(env, operator), zero_policy, [11], record)
        traces.append(np.stack([info["executed_action"] for _, info in record]))
    np.testing.assert_array_equal(traces[0], traces[1])


def direct_grasp_policy(observation) -> np.ndarray:
    """Solves pick_cube unlike the expert: straight at the cube (no hover), slower, then grasp and lift."""
    offset = np.asarray(observation["task/cube_pose"][:3]) - np.asarray(observation["tcp_pose"][:3])
    width = float(observation["gripper_width"][0])
    if np.linalg.norm(offset) > 0.012:
        return np.append(np.clip(offset / 0.03, -0.4, 0.4), -1.0).astype(np.float32)
    if width > 0.062:
        return np.array([0.0, 0.0, 0.0, 1.0], np.float32)
    return np.array([0.0, 0.0, 1.0, 1.0], np.float32)


def test_simulated_operator_judges_progress_not_resemblance_to_the_expert(pick_cube):
    from policies.scripted import ScriptedExpert

    config, env = pick_cube
    expert = ScriptedExpert(config.robot)
    operator_config = load_teleop_config("simulated_operator")
    operator = SimulatedOperator(operator_config, config.robot)
    record: list = []
    results = run_episodes(InterventionWrapper(env, operator), direct_grasp_policy, [21, 22, 23], record)
    assert all(r["success"] for r in results), results
    assert operator.total_interventions == 0 and operator.takeovers == 0
    # Its actions are far from the expert's most of the way: a resemblance test would have stepped in.
    observation, _ = env.reset(seed=21)
    gaps = []
    for _ in range(results[0]["length"]):
        action = direct_grasp_policy(observation)
        gaps.append(float(np.max(np.abs(action - expert.act(observation)))))
        observation, *_ = env.step(action)
    assert sum(gap > 0.5 for gap in gaps) >= operator_config.patience_steps, gaps

    # A policy that holds still makes no progress: the operator steps in after patience + reaction delay.
    operator = SimulatedOperator(operator_config, config.robot)
    record = []
    run_episodes(InterventionWrapper(env, operator), lambda _obs: np.zeros(4, np.float32), [21], record)
    flags = [info["intervened"] for _, info in record]
    first = flags.index(1.0)
    assert first == operator_config.patience_steps + operator_config.reaction_delay_steps, flags[:20]
    # It steers for hold_steps, or until its 50 % share of the episode so far is used up.
    held = min(operator_config.hold_steps, first)
    assert flags[first:first + held] == [1.0] * held and flags[first + held] == 0.0


def test_wrapper_with_keyboard_merges_the_untouched_gripper_and_reports_events(pick_cube, key_pipe):
    _, env = pick_cube
    read_fd, write_fd = key_pipe
    device = KeyboardTeleop(keyboard_config(key_hold_s=2.0), 4, fd=read_fd)
    wrapped = InterventionWrapper(env, device)  # starts the device
    try:
        wrapped.reset(seed=1)
        policy_action = np.array([0.0, 0.5, 0.0, 0.7], np.float32)
        _, _, _, _, info = wrapped.step(policy_action)
        assert info["intervened"] == 0.0 and "teleop_fault" not in info
        os.write(write_fd, b"w\r")
        events: list[str] = []
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # the reader thread picks the keys up within a poll interval; the wrapper never waits
            _, _, _, _, info = wrapped.step(policy_action)
            events += info["operator_events"]
            if info["intervened"] or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert info["intervened"] == 1.0
        # Motion from the keys; the untouched gripper keeps the policy's command.
        np.testing.assert_array_equal(info["executed_action"], np.array([1.0, 0.0, 0.0, 0.7], np.float32))
        assert events == ["MARK_SUCCESS"]
        assert OperatorEvent[events[0]] is OperatorEvent.MARK_SUCCESS
        assert wrapped.episode_interventions == 1
        assert wrapped.episode_intervention_rate == pytest.approx(1 / wrapped.episode_steps)
    finally:
        device.close()


class BrokenDevice(TeleopDevice):
    """A device whose read raises: the wrapper must keep the policy acting."""

    name = "broken"
    action_dim = 4

    def __init__(self) -> None:
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        self._started = True

    def read(self) -> TeleopReading:
        raise RuntimeError("driver crashed")

    def close(self) -> None:
        self._started = False


def test_wrapper_falls_back_to_the_policy_on_device_faults(pick_cube, key_pipe):
    _, env = pick_cube
    wrapped = InterventionWrapper(env, BrokenDevice())
    wrapped.reset(seed=2)
    policy_action = np.array([0.2, 0.0, -0.2, -1.0], np.float32)
    _, _, _, _, info = wrapped.step(policy_action)
    assert info["intervened"] == 0.0 and "driver crashed" in info["teleop_fault"]
    np.testing.assert_array_equal(info["executed_action"], policy_action)

    read_fd, write_fd = key_pipe
    device = KeyboardTeleop(keyboard_config(key_hold_s=2.0), 4, fd=read_fd)
    wrapped = InterventionWrapper(env, device)
    try:
        wrapped.reset(seed=2)
        os.write(write_fd, b"w")
        wait_for(device, lambda r: r.active)
        os.close(write_fd)  # the keyboard goes away mid-intervention
        wait_for(device, lambda r: r.fault is not None)
        _, _, _, _, info = wrapped.step(policy_action)
        assert info["intervened"] == 0.0 and "end of file" in info["teleop_fault"]
        np.testing.assert_array_equal(info["executed_action"], policy_action)
    finally:
        device.close()


def test_wrapper_rejects_a_device_of_the_wrong_action_size(pick_cube, key_pipe):
    _, env = pick_cube
    with pytest.raises(ValueError, match="5-dim actions"):
        InterventionWrapper(env, KeyboardTeleop(keyboard_config(), 5, fd=key_pipe[0]))
