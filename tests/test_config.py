"""Config loading: bundled files load, and every mistake names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from hardware_configs.loader import ConfigError
from hardware_configs.schema import CONFIG_DIR, SessionConfig, load_config, save_config


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_bundled_configs_load(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, SessionConfig)
    assert config.name == path.stem


def test_bundled_name_resolves_without_path() -> None:
    assert load_config("sim_panda_reach").robot.task.name == "reach"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cell.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, expected", [
    ("name: x\nrobot:\n  safety:\n    watchdog_msec: 10\n", "robot.safety.watchdog_msec: unknown field"),
    ("name: x\nrobot:\n  safety:\n    watchdog_ms: fast\n", "robot.safety.watchdog_ms: expected int, got 'fast'"),
    ("name: x\nrobot:\n  control:\n    mode: turbo\n", "robot.control.mode: expected one of 'sync', 'realtime'"),
    ("name: x\nrobot:\n  reset_xyz: [0.5, 0.0]\n", "robot.reset_xyz: expected 3 values, got 2"),
    ("name: x\nrobot:\n  cameras:\n    - {width: 64}\n", "robot.cameras[0].name: required field is missing"),
    ("seed: 1\n", "name: required field is missing"),
    ("name: x\nrobot:\n  reset_xyz: [0.5, 0.0, 0.9]\n", "robot: reset_xyz (0.5, 0.0, 0.9) lies outside the workspace box"),
    ("name: x\nserver:\n  address: tcp://0.0.0.0:5555\n", "binds beyond loopback: set server.curve keys"),
    ("name: x\nrobot:\n  safety:\n    workspace_low: [0.8, 0, 0]\n", "workspace_low[0]=0.8 must be below"),
    ("name: [unclosed\n", "invalid YAML"),
    ("name: x\nactor:\n  policy_source: gpu\n", "actor.policy_source: expected one of 'local', 'remote'"),
    ("name: x\nactor:\n  policy_server:\n    adress: tcp://10.0.0.2:5570\n", "actor.policy_server.adress: unknown field"),
    ("name: x\nactor:\n  policy_server:\n    timeout_ms: 0\n",
     "actor.policy_server: timeout_ms and connect_timeout_ms must be positive"),
    ("name: x\nactor:\n  policy_server:\n    address: 10.0.0.2:5570\n",
     "actor.policy_server: address '10.0.0.2:5570' must start with tcp://"),
    ("name: x\nlearner:\n  policy_server:\n    address: tcp://0.0.0.0:5570\n",
     "learner.policy_server: address 'tcp://0.0.0.0:5570' binds beyond loopback: set curve keys"),
    ("name: x\nlearner:\n  policy_server:\n    batch_wait_ms: -1\n", "learner.policy_server: batch_wait_ms must lie in"),
])
def test_bad_config_names_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_missing_file_lists_bundled_configs() -> None:
    with pytest.raises(ConfigError, match="no such config file.*sim_panda_reach"):
        load_config("no_such_cell")


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="robot.task.max_episode_steps: expected int, got True"):
        load_config(_write(tmp_path, "name: x\nrobot:\n  task:\n    max_episode_steps: true\n"))


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    config = load_config("sim_panda_pick_cube")
    assert load_config(save_config(config, tmp_path / "copy.yaml")) == config
