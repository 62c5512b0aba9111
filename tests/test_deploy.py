"""``steerl deploy``: a policy (optionally V-GPS-steered) on the robot through the robot server,
with every episode recorded, re-recorded episodes run again, and the operator console's buttons."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from gymnasium import spaces

from conftest import configure, free_tcp_address, running_server
from hardware_configs.schema import SessionConfig, save_config
from learner.replay import ReplayBuffer
from policies.sac_policy import SACPolicy
from policies.vgps import QCritic
from robot_server.cell import RobotCell
from tools.dashboard.hub import TelemetryHub
from tools.deploy import load_deploy_policy, run_deployment


def _config(max_episode_steps: int = 15) -> SessionConfig:
    config = configure("sim_panda_reach")
    config = dataclasses.replace(config, robot=dataclasses.replace(
        config.robot, task=dataclasses.replace(config.robot.task, max_episode_steps=max_episode_steps)))
    return dataclasses.replace(config, dashboard=dataclasses.replace(
        config.dashboard, telemetry_address=free_tcp_address(), command_address=free_tcp_address()))


def _spaces(config: SessionConfig) -> tuple[spaces.Dict, spaces.Box]:
    cell = RobotCell(config)
    try:
        return cell.spaces.observation_space(), cell.spaces.action_space()
    finally:
        cell.close()


def _saved_policy(config: SessionConfig, directory) -> SACPolicy:
    observation_space, action_space = _spaces(config)
    policy = SACPolicy(dataclasses.replace(config.learner.sac, hidden_dims=(32, 32)), observation_space, action_space,
                       seed=1)
    policy.save(directory)
    return policy


def test_steerl_deploy_runs_a_policy_and_records_every_episode(tmp_path) -> None:
    config = _config()
    config_file = save_config(config, tmp_path / "cell.yaml")
    _saved_policy(config, tmp_path / "policy")
    run_dir = tmp_path / "deploy"
    result = subprocess.run([sys.executable, "-m", "tools.cli", "deploy", "--config", str(config_file), "--policy",
                             str(tmp_path / "policy"), "--episodes", "3", "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    episodes = [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()]
    assert [entry["episode"] for entry in episodes] == [0, 1, 2]
    summary = json.loads((run_dir / "deploy_summary.json").read_text())
    assert summary["episodes"] == 3 and summary["policy"] == "sac policy"
    assert summary["success_rate"] == pytest.approx(np.mean([entry["success"] for entry in episodes]))
    buffer = ReplayBuffer.load(run_dir / "transitions")
    assert len(buffer) == sum(entry["length"] for entry in episodes)
    table = buffer.transition_table()
    assert table["rewards"].sum() == pytest.approx(sum(entry["return"] for entry in episodes), abs=1e-3)


def test_deploy_steers_with_a_vgps_critic(tmp_path) -> None:
    config = _config(max_episode_steps=5)
    _saved_policy(config, tmp_path / "policy")
    observation_space, action_space = _spaces(config)
    QCritic(dataclasses.replace(config.learner.sac, hidden_dims=(32, 32)), observation_space, action_space).save(
        tmp_path / "critic")
    policy, name = load_deploy_policy(config, tmp_path / "policy", str(tmp_path / "critic"), num_samples=4, beta=0.0)
    assert name == "sac policy + V-GPS (K=4, beta=0)"
    assert policy.config.num_samples == 4 and policy.config.temperature == 0.0
    with running_server(config):
        summary = run_deployment(config, policy, name, 2, tmp_path / "run", start_server=False)
    assert summary["episodes"] == 2 and "V-GPS" in summary["policy"]
    assert len(ReplayBuffer.load(tmp_path / "run" / "transitions")) == 10


def test_deploy_takes_the_console_buttons_and_runs_a_rerecorded_episode_again(tmp_path) -> None:
    # Long episodes: the sim runs unpaced, and the command socket may still be reconnecting (ZeroMQ
    # retries every 100 ms) when the first telemetry arrives, so the press may land in a later episode.
    max_steps = 300
    config = _config(max_episode_steps=max_steps)
    policy = _saved_policy(config, tmp_path / "policy")
    hub = TelemetryHub(config)
    outcome: dict = {}
    try:
        with running_server(config):
            worker = threading.Thread(target=lambda: outcome.update(run_deployment(
                config, policy, "sac", 2, tmp_path / "run", start_server=False, with_console=True)), daemon=True)
            worker.start()
            deadline = time.monotonic() + 60
            while hub.snapshot()["actor"].get("episode_step", 0) < 5:
                assert time.monotonic() < deadline and worker.is_alive(), "no telemetry from the deployment"
                time.sleep(0.02)
            assert hub.snapshot()["actor"]["mode"] == "deploy"
            hub.send_command("RERECORD")
            worker.join(timeout=120)
            assert not worker.is_alive()
    finally:
        hub.close()
    episodes = [json.loads(line) for line in (tmp_path / "run" / "episodes.jsonl").read_text().splitlines()]
    # The episode running when the press arrived ended there, was discarded and ran again.
    assert sorted(entry["discarded"] for entry in episodes) == [False, False, True]
    assert not episodes[-1]["discarded"]
    assert next(entry["length"] for entry in episodes if entry["discarded"]) < max_steps
    assert outcome["episodes"] == 2 and outcome["discarded"] == 1
    kept_steps = sum(entry["length"] for entry in episodes if not entry["discarded"])
    assert len(ReplayBuffer.load(tmp_path / "run" / "transitions")) == kept_steps


def test_deploy_refuses_bad_arguments_with_a_clear_message(tmp_path) -> None:
    config_file = save_config(_config(), tmp_path / "cell.yaml")
    for arguments, words in ((["--policy", str(tmp_path / "missing")], "does not exist"),
                             (["--policy", str(tmp_path), "--k", "4"], "--vgps-critic"),
                             (["--policy", str(tmp_path), "--episodes", "0"], "--episodes")):
        result = subprocess.run([sys.executable, "-m", "tools.cli", "deploy", "--config", str(config_file), *arguments],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and words in result.stderr, (arguments, result.stderr)
