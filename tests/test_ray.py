"""Ray sessions on a real local Ray instance: two simulated actors and the learner as Ray actors,
over the ordinary ZeroMQ data path; an actor and then the learner are killed like a crash."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hardware_configs.loader import ConfigError
from hardware_configs.schema import SessionConfig, save_config
from learner.learner import latest_checkpoint
from learner.replay import ReplayBuffer
from tools.ray_session import RaySession, actor_config

from conftest import configure, free_tcp_address


def _config(**ray_changes) -> SessionConfig:
    config = configure("sim_panda_reach")
    sac = dataclasses.replace(config.learner.sac, hidden_dims=(64, 64), batch_size=64)
    learner = dataclasses.replace(config.learner, address=free_tcp_address(), learning_starts=200,
                                  checkpoint_every_updates=10**6, sac=sac, num_threads=1)
    actor = dataclasses.replace(config.actor, random_steps=200, eval_every_episodes=0, eval_episodes=2,
                                max_steps_per_update=0.0)
    ray = dataclasses.replace(config.ray, **{"enabled": True, "num_actors": 2, "actor_cpus": 0.5, "learner_cpus": 0.5,
                                             **ray_changes})
    return dataclasses.replace(config, learner=learner, actor=actor, ray=ray)


def _wait(session: RaySession, condition, what: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    snapshot = session.poll()
    while not condition(snapshot):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {snapshot}"
        assert all(slot.state != "dead" for slot in session.actors), f"an actor failed while waiting for {what}"
        time.sleep(0.3)
        snapshot = session.poll()
    return snapshot


def test_actors_and_learner_killed_mid_run_are_restarted_without_a_lost_or_duplicated_transition(tmp_path) -> None:
    session = RaySession(_config(), tmp_path / "run")
    session.start(total_steps=10**9)
    try:
        _wait(session, lambda s: s["transitions"] > 600 and all(slot.last.get("env_steps") for slot in session.actors),
              "both actors shipping")
        acked_before = session.learner_status["actors"]["ray-actor-1"]["acked"]
        old_pid = session.actors[1].pid
        session.kill_actor(1)
        _wait(session, lambda s: session.actors[1].state == "running" and session.actors[1].restarts == 1
              and session.actors[1].last.get("env_steps", 0) > 100, "actor 1 back and acting")
        assert session.actors[1].pid != old_pid
        # Its numbering continues after what the learner held from it: no episode number is reused.
        assert session.actors[1].last["episode"] > acked_before[0]

        checkpoint_updates = session.checkpoint_learner()
        held = session.learner_status["transitions"]
        session.kill_learner()
        snapshot = _wait(session, lambda s: s["learner_restarts"] == 1 and s["transitions"] > held + 300,
                         "learner back and ingesting")
        assert session.learner_status["restarted"]
        assert session.learner_status["resumed_updates"] == checkpoint_updates
        assert snapshot["actors_alive"] == 2
    finally:
        summary = session.stop()
    streams = {entry["index"]: entry for entry in summary["actors"]}
    assert all(entry["missing"] == 0 and entry["rejected"] == 0 for entry in streams.values()), streams
    assert streams[1]["restarts"] == 1 and streams[0]["restarts"] == 0
    # Everything acknowledged is held exactly once: the learner's count, the actors' acceptance
    # counts and the final checkpoint's buffer agree (resends after the learner's restart were
    # dropped as duplicates).
    online = ReplayBuffer.load(latest_checkpoint(tmp_path / "run") / "online")
    accepted = sum(entry["accepted"] for entry in streams.values())
    assert online.transitions_added == len(online) == accepted == summary["transitions"]
    # Only the killed actor's steps the learner never acknowledged are gone with its process.
    assert 0 <= summary["env_steps"] - summary["transitions"] <= 300
    assert summary["eval_history"], "actor 0 runs the final evaluation"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["learner_restarts"] == 1


def test_steerl_train_ray_runs_a_session_from_the_command_line(tmp_path) -> None:
    config = _config(actor_env="server")  # each actor behind a robot server child of its own
    config_file = save_config(config, tmp_path / "ray.yaml")
    result = subprocess.run([sys.executable, "-m", "tools.cli", "train", "--config", str(config_file), "--ray",
                             "--actors", "2", "--steps", "600", "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 simulated actors (server)" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["transitions"] >= 600
    assert {entry["index"] for entry in summary["actors"]} == {0, 1}
    assert all(entry["accepted"] > 0 and entry["missing"] == 0 for entry in summary["actors"])


def test_actors_act_through_a_policy_server_run_as_a_ray_actor(tmp_path) -> None:
    from actor.env import make_env
    from policies.sac_policy import SACPolicy
    from transport.spaces import RobotSpaces

    config = _config()
    env = make_env(dataclasses.replace(config, env=dataclasses.replace(config.env, connection="inproc")))
    seen = RobotSpaces.from_gym(env.observation_space, env.action_space).select(config.learner.observation_keys)
    env.close()
    SACPolicy(config.learner.sac, seen.observation_space(), seen.action_space()).save(tmp_path / "policy")
    config = _config(policy_server=str(tmp_path / "policy"))
    config = dataclasses.replace(
        config, actor=dataclasses.replace(config.actor, random_steps=0),
        learner=dataclasses.replace(config.learner, policy_server=dataclasses.replace(
            config.learner.policy_server, address=free_tcp_address())))
    import ray

    # A cluster with one GPU (declared: Ray places by resources, no device is touched here): the
    # learner and the policy server share it, the actors get none.
    ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, object_store_memory=128 * 1024 * 1024)
    session = RaySession(config, tmp_path / "run")
    try:
        session.start(total_steps=10**9)
        assert session.learner_status["gpu_ids"] and ray.get(session.policy_server.gpu_ids.remote())
        _wait(session, lambda s: s["transitions"] > 300 and all(
            slot.last.get("remote_policy", {}).get("answered", 0) > 50 for slot in session.actors),
              "both actors acting through the policy server")
        for slot in session.actors:
            served = slot.last["remote_policy"]
            assert served["name"] == "policy" and served["holds"] <= served["answered"] // 10, served
            assert slot.last["gpu_ids"] == []
    finally:
        summary = session.stop()
        ray.shutdown()
    assert summary["transitions"] > 300 and all(entry["missing"] == 0 for entry in summary["actors"])


def test_steerl_train_joins_a_running_cluster_with_curve_keys_on_the_node_address(tmp_path, monkeypatch) -> None:
    import socket

    from hardware_configs.schema import CurveClientKeys, CurveServerKeys
    from transport.zmq_link import generate_keypair

    learner_public, learner_secret = generate_keypair(tmp_path / "keys" / "learner", "learner")
    generate_keypair(tmp_path / "keys" / "actors", "actor")
    actor_secret = tmp_path / "keys" / "actors" / "actor.key_secret"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # Ray's own token authentication is the cluster owner's business; this test is about ours.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=3", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=120)
    try:
        def train(config: SessionConfig) -> subprocess.CompletedProcess:
            config_file = save_config(config, tmp_path / "cluster.yaml")
            return subprocess.run([sys.executable, "-m", "tools.cli", "train", "--config", str(config_file),
                                   "--ray-address", f"127.0.0.1:{port}", "--steps", "400", "--run-dir",
                                   str(tmp_path / "run")], capture_output=True, text=True, timeout=300)

        refused = train(_config())
        assert refused.returncode == 2 and "set learner.curve, actor.learner_curve" in refused.stderr
        config = _config()
        config = dataclasses.replace(
            config,
            learner=dataclasses.replace(config.learner, curve=CurveServerKeys(str(learner_secret),
                                                                              str(tmp_path / "keys" / "actors"))),
            actor=dataclasses.replace(config.actor, learner_curve=CurveClientKeys(str(actor_secret),
                                                                                  str(learner_public))))
        result = train(config)
        assert result.returncode == 0, result.stderr[-3000:]
        listened = [line for line in result.stdout.splitlines() if line.startswith("learner listened at")]
        assert listened and "127.0.0.1" not in listened[0]  # the node's address, reachable from other nodes
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["transitions"] >= 400
        assert all(entry["accepted"] > 0 and entry["missing"] == 0 for entry in summary["actors"])
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)


def test_each_actor_gets_its_own_seed_share_of_exploration_and_pacing() -> None:
    config = _config(num_actors=4)
    config = dataclasses.replace(config, actor=dataclasses.replace(
        config.actor, random_steps=1000, eval_every_episodes=20, max_steps_per_update=1.0))
    first = actor_config(config, 0, "tcp://127.0.0.1:7000", restarted=False)
    third = actor_config(config, 2, "tcp://127.0.0.1:7000", restarted=False)
    third_again = actor_config(config, 2, "tcp://127.0.0.1:7000", restarted=True)
    assert first.seed != third.seed and third.seed == third_again.seed
    assert first.actor.random_steps == third.actor.random_steps == 250 and third_again.actor.random_steps == 0
    assert first.actor.eval_every_episodes == 20 and third.actor.eval_every_episodes == 0
    assert third.actor.max_steps_per_update == pytest.approx(0.25)
    assert third.env.connection == "inproc" and third.learner.address == "tcp://127.0.0.1:7000"
    served = actor_config(dataclasses.replace(config, ray=dataclasses.replace(config.ray, actor_env="server")), 1,
                          "tcp://127.0.0.1:7000", restarted=False, policy_server_address="tcp://127.0.0.1:7100")
    assert served.env.connection == "zmq" and served.env.address == served.server.address != config.server.address
    assert served.actor.policy_source == "remote" and served.actor.policy_server.address == "tcp://127.0.0.1:7100"


def test_ray_settings_that_cannot_work_are_refused_before_anything_starts(tmp_path) -> None:
    from hardware_configs.loader import load_dataclass, to_dict

    data = to_dict(_config())
    data["ray"]["num_actors"] = 0
    with pytest.raises(ConfigError, match="ray: num_actors must be at least 1"):
        load_dataclass(SessionConfig, data)
    with pytest.raises(ConfigError, match="actor.teleop: a keyboard"):
        RaySession(dataclasses.replace(_config(), actor=dataclasses.replace(_config().actor, teleop="keyboard")),
                   tmp_path)
    with pytest.raises(ConfigError, match="ray.policy_server: .*no such policy directory"):
        RaySession(_config(policy_server=str(tmp_path / "nowhere")), tmp_path)
