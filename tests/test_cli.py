"""The steerl command line, run as a user would: help texts, keys, and an end-to-end rollout."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hardware_configs.schema import save_config

from conftest import configure


def _steerl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "120"})


@pytest.mark.parametrize("command", [[], ["robot-server"], ["rollout"], ["keys"], ["keys", "generate"],
                                     ["train-calql"], ["train-bc"], ["policy-server"]])
def test_every_command_explains_itself(command) -> None:
    result = _steerl(*command, "--help")
    assert result.returncode == 0
    assert "usage: steerl" in result.stdout and len(result.stdout.splitlines()) > 3


def test_keys_generate_writes_a_usable_pair(tmp_path: Path) -> None:
    result = _steerl("keys", "generate", "--dir", str(tmp_path), "--name", "robot")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "robot.key").exists() and (tmp_path / "robot.key_secret").exists()
    assert oct((tmp_path / "robot.key_secret").stat().st_mode & 0o777) == "0o600"


def test_bad_config_is_reported_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nrobot:\n  control:\n    rate_hz: fast\n")
    result = _steerl("robot-server", "--config", str(path))
    assert result.returncode == 2
    assert f"{path}: robot.control.rate_hz: expected a number, got 'fast'" in result.stderr
    assert "Traceback" not in result.stderr


def test_rollout_drives_a_robot_server_process_end_to_end(tmp_path: Path) -> None:
    config = configure("sim_panda_pick_cube", cameras=(("front", 32, 32),))
    config_file = save_config(config, tmp_path / "cell.yaml")
    result = _steerl("rollout", "--config", str(config_file), "--episodes", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "success rate 100% over 3 episodes" in result.stdout
    assert "serving sim_panda_pick_cube (pybullet backend)" in result.stdout + result.stderr


def test_train_then_eval_on_a_third_party_gym_env(tmp_path: Path) -> None:
    import dataclasses
    import json

    from conftest import free_tcp_address
    from hardware_configs.schema import load_config

    config = load_config("sim_panda_reach")
    config = dataclasses.replace(
        config,
        learner=dataclasses.replace(config.learner, address=free_tcp_address(), learning_starts=100,
                                    observation_keys=(), num_threads=1,
                                    sac=dataclasses.replace(config.learner.sac, hidden_dims=(32, 32), batch_size=32)),
        actor=dataclasses.replace(config.actor, random_steps=100, eval_every_episodes=10, eval_episodes=2),
        robot=dataclasses.replace(config.robot, task=dataclasses.replace(config.robot.task, max_episode_steps=30)))
    config_file = save_config(config, tmp_path / "point.yaml")
    run_dir = tmp_path / "run"
    result = _steerl("train", "--config", str(config_file), "--env-id", "tests.point_env:PointReach-v0",
                     "--steps", "600", "--run-dir", str(run_dir), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] >= 600 and summary["eval_history"]
    assert (run_dir / "checkpoints" / "latest").exists() and list((run_dir / "tensorboard").iterdir())
    evaluation = _steerl("eval", "--config", str(config_file), "--env-id", "tests.point_env:PointReach-v0",
                         "--checkpoint", str(run_dir), "--episodes", "3")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "over 3 episodes" in evaluation.stdout
    # The policy of the best periodic evaluation (the latest among equals) is kept and loadable.
    rates = [point["success_rate"] for point in summary["eval_history"]]
    best = summary["best_eval"]
    assert best["success_rate"] == max(rates)
    assert best["env_steps"] == [p["env_steps"] for p in summary["eval_history"] if p["success_rate"] == max(rates)][-1]
    stored = json.loads((run_dir / "best_policy" / "learner.json").read_text())
    assert stored["best_eval"] == best and stored["spaces"]
    held_out = _steerl("eval", "--config", str(config_file), "--env-id", "tests.point_env:PointReach-v0",
                       "--checkpoint", str(run_dir / "best_policy"), "--episodes", "2", "--seed", "7919")
    assert held_out.returncode == 0, held_out.stderr[-3000:]
    assert "over 2 episodes" in held_out.stdout


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(child) for child in path.read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc")
def test_sigterm_to_train_stops_its_robot_server_and_learner(tmp_path: Path) -> None:
    import signal
    import time

    from conftest import free_tcp_address
    from hardware_configs.schema import load_config

    config = load_config("sim_panda_reach")
    address = free_tcp_address()
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, address=address),
        env=dataclasses.replace(config.env, address=address),
        learner=dataclasses.replace(config.learner, address=free_tcp_address(), num_threads=1))
    config_file = save_config(config, tmp_path / "reach.yaml")
    train = subprocess.Popen([sys.executable, "-m", "tools.cli", "train", "--config", str(config_file), "--steps",
                              "1000000", "--run-dir", str(tmp_path / "run")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_children(train.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        children = _children(train.pid)
        assert len(children) == 2, "train did not start a robot server and a learner"
        time.sleep(3)  # let the session get going
        train.send_signal(signal.SIGTERM)
        assert train.wait(timeout=180) != 0
        for child in children:
            assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text(), \
                f"child {child} outlived its session"
    finally:
        if train.poll() is None:
            train.kill()


def test_record_demos_mixes_clean_episodes_into_a_noisy_buffer(tmp_path) -> None:
    from learner.replay import ReplayBuffer
    from tools.session import record_demos

    config = configure("sim_panda_pick_cube")
    result = record_demos(config, 2, tmp_path / "mixed", keep_failures=True, noise_std=1.0, clean_episodes=2)
    assert result["episodes"] == 4
    table = ReplayBuffer.load(tmp_path / "mixed").transition_table()
    assert len(table["rewards"]) == result["transitions"]
    assert table["terminated"].sum() >= 2  # the two clean episodes end in success
