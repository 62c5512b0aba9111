"""The learner process end to end over real sockets: learning, checkpoints, resume, bad files."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import tests.point_env  # noqa: F401  (registers PointReach-v0)
from actor.acting import ActingLoop
from actor.env import make_gym_env
from actor.learner_link import LearnerLink
from hardware_configs.schema import load_config, save_config
from learner.replay import ReplayBuffer
from learner.learner import CheckpointError, Learner, latest_checkpoint, load_policy_from_checkpoint
from tools.session import actor_policy_loader
from transport.spaces import RobotSpaces

from conftest import free_tcp_address

ENV_ID = "tests.point_env:PointReach-v0"


def _config(**actor_changes):
    config = load_config("sim_panda_reach")
    sac = dataclasses.replace(config.learner.sac, hidden_dims=(64, 64), batch_size=64, utd_ratio=1, discount=0.9)
    learner = dataclasses.replace(config.learner, address=free_tcp_address(), learning_starts=200,
                                  publish_every_updates=20, checkpoint_every_updates=10**6, observation_keys=(),
                                  replay_capacity=10_000, sac=sac, num_threads=1)
    actor = dataclasses.replace(config.actor, **{"random_steps": 200, "eval_every_episodes": 0, "eval_episodes": 20,
                                                 "max_steps_per_update": 1.0, **actor_changes})
    robot = dataclasses.replace(config.robot, task=dataclasses.replace(config.robot.task, max_episode_steps=30))
    return dataclasses.replace(config, learner=learner, actor=actor, robot=robot)


class LearnerThread:
    def __init__(self, config, run_dir, resume=False) -> None:
        self.learner = Learner(config, run_dir, resume=resume)
        self.thread = threading.Thread(target=self.learner.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.learner.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


def _acting(config, env, actor_id="actor-0"):
    spaces = RobotSpaces.from_gym(env.observation_space, env.action_space)
    link = LearnerLink(config.learner.address, actor_id, spaces, load_policy=actor_policy_loader(config, spaces))
    hello = link.wait_for_hello(60)  # a learner process starting on a loaded 2-core machine takes a while
    assert hello is not None
    first = hello.acked_episode + 1 if hello.has_acked else 0
    return ActingLoop(config, env, link, tuple(spaces.observation), first_episode=first), link


def test_learner_learns_point_reach_through_the_sockets(tmp_path) -> None:
    config = _config()
    env = make_gym_env(ENV_ID, 30)
    random_loop = ActingLoop(config, env, None, ("state",))
    random_returns = [random_loop.run_episode()[0] for _ in range(20)]

    learner = LearnerThread(config, tmp_path / "run")
    loop, link = _acting(config, env)
    loop.run(2500)
    success = loop.evaluate(20)
    trained_returns = [loop.run_episode(deterministic=True)[0] for _ in range(10)]
    link.close()
    learner.stop()
    assert learner.learner.updates >= 2000, "the pacing should have kept updates near env steps"
    assert np.mean(trained_returns) > np.mean(random_returns) + 10.0, (np.mean(trained_returns), np.mean(random_returns))
    print(f"random return {np.mean(random_returns):.2f}, trained {np.mean(trained_returns):.2f}, success {success}")
    # The final checkpoint holds the learner's last policy: what `steerl eval` loads.
    policy, keys = load_policy_from_checkpoint(config, tmp_path / "run")
    assert keys == ("state",)
    observation, _ = env.reset(seed=0)
    np.testing.assert_allclose(policy.act(observation, deterministic=True),
                               learner.learner.agent.policy.act(observation, deterministic=True), atol=1e-5)


def _learner_process(config, run_dir, resume=False) -> subprocess.Popen:
    config_file = save_config(config, run_dir.parent / "learner.yaml")
    command = [sys.executable, "-m", "tools.cli", "learner", "--config", str(config_file), "--run-dir", str(run_dir)]
    return subprocess.Popen(command + (["--resume"] if resume else []), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_learner_killed_mid_run_resumes_without_losing_or_duplicating(tmp_path) -> None:
    config = _config(random_steps=10**6)  # random actions: this test is about bookkeeping
    config = dataclasses.replace(config, learner=dataclasses.replace(
        config.learner, learning_starts=100, checkpoint_every_updates=300))
    env = make_gym_env(ENV_ID, 30)
    run_dir = tmp_path / "run"
    process = _learner_process(config, run_dir)
    try:
        loop, link = _acting(config, env)
        loop.run(900)  # a checkpoint at 300 and 600 updates; the rest only in the transition log
        assert link.flush(20)
        process.send_signal(signal.SIGKILL)  # a crash: no final checkpoint
        process.wait(10)
        assert int(latest_checkpoint(run_dir).name.split("-")[1]) < loop.stats.env_steps
        loop.run(1200)  # the actor acts on while the learner is gone
        process = _learner_process(config, run_dir, resume=True)
        assert link.flush(60)
        link.close()
        loop2, link2 = _acting(config, env, actor_id="actor-0")
        assert loop2._episode == loop._episode  # numbering continues after the acknowledged episode
        link2.close()
        process.send_signal(signal.SIGTERM)  # graceful: final checkpoint
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    online = ReplayBuffer.load(latest_checkpoint(run_dir) / "online")
    assert len(online) == loop.stats.env_steps >= 1200
    assert online.transitions_added == 1200


def test_learner_killed_before_its_first_checkpoint_replays_every_acknowledged_transition(tmp_path) -> None:
    config = _config(random_steps=10**6)
    config = dataclasses.replace(config, learner=dataclasses.replace(config.learner, learning_starts=10**6))
    env = make_gym_env(ENV_ID, 30)
    run_dir = tmp_path / "run"
    process = _learner_process(config, run_dir)
    try:
        loop, link = _acting(config, env)
        loop.run(300)
        assert link.flush(20)
        process.send_signal(signal.SIGKILL)  # no checkpoint at all: only the transition log
        process.wait(10)
        assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
        process = _learner_process(config, run_dir, resume=True)  # rebuilt from the logged spaces
        loop.run(450)
        assert link.flush(60)
        link.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    online = ReplayBuffer.load(latest_checkpoint(run_dir) / "online")
    assert online.transitions_added == len(online) == loop.stats.env_steps == 450


def _act_then_stop_the_learner(config, run_dir, steps: int):
    """A learner thread and an actor that acts ``steps`` random steps, all acknowledged; then the
    learner stops (final checkpoint). Returns the actor's loop and link, still open."""
    learner = LearnerThread(config, run_dir)
    loop, link = _acting(config, make_gym_env(ENV_ID, 30))
    loop.run(steps)
    assert link.flush(20)
    learner.stop()
    return loop, link


def test_an_actor_retargeted_to_a_learner_restarted_elsewhere_resends_what_it_lacks(tmp_path) -> None:
    config = _config(random_steps=10**6)
    loop, link = _act_then_stop_the_learner(config, tmp_path / "run", 90)  # its final checkpoint holds all 90
    loop.run(150)  # acting on while no learner answers: 60 more wait in the queue
    moved = dataclasses.replace(config, learner=dataclasses.replace(config.learner, address=free_tcp_address()))
    second = LearnerThread(moved, tmp_path / "run", resume=True)
    link.retarget(moved.learner.address)
    assert link.flush(30) and link.address == moved.learner.address
    link.close()
    second.stop()
    online = second.learner.online
    assert online.transitions_added == len(online) == 150
    assert second.learner.service.actors["actor-0"].missing == 0


def test_a_fresh_run_moves_an_earlier_runs_state_aside(tmp_path) -> None:
    config = _config(random_steps=10**6)
    _, link = _act_then_stop_the_learner(config, tmp_path / "run", 60)  # a final checkpoint and a transition log
    link.close()
    fresh = Learner(dataclasses.replace(config, learner=dataclasses.replace(
        config.learner, address=free_tcp_address())), tmp_path / "run")
    try:
        assert fresh.service.transitions_received == 0 and fresh.agent is None
        assert fresh.service.actors == {}  # the earlier run's episode numbers are not held against new actors
    finally:
        fresh.close()
    archived = list((tmp_path / "run" / "earlier_runs").iterdir())
    assert len(archived) == 1
    online = ReplayBuffer.load(latest_checkpoint(archived[0]) / "online")
    assert len(online) == 60


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog) -> None:
    config = _config(random_steps=10**6)
    env = make_gym_env(ENV_ID, 30)
    learner = LearnerThread(config, tmp_path / "run")
    loop, link = _acting(config, env)
    loop.run(300)
    assert link.flush(10)
    learner.learner.request_checkpoint()
    while learner.learner._checkpoint_requested.is_set():
        time.sleep(0.01)
    first = latest_checkpoint(tmp_path / "run")
    loop.run(600)
    assert link.flush(10)
    link.close()
    first_updates = int(first.name.split("-")[1])
    deadline = time.monotonic() + 30
    while learner.learner.updates <= first_updates and time.monotonic() < deadline:
        time.sleep(0.01)
    learner.stop()  # writes the second checkpoint, at a later update count
    newest = latest_checkpoint(tmp_path / "run")
    assert newest != first
    (newest / "agent.safetensors").write_bytes(b"not safetensors")
    resumed = Learner(config, tmp_path / "run", resume=True)
    assert str(newest) in caplog.text and "unreadable" in caplog.text
    assert resumed.updates == int(first.name.split("-")[1])
    resumed.close()


def test_eval_of_a_missing_checkpoint_names_the_path(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_policy_from_checkpoint(_config(), tmp_path)


def test_intervened_transitions_go_to_both_buffers_feed_the_demo_share_and_survive_a_checkpoint(tmp_path) -> None:
    config = _config()
    config = dataclasses.replace(config, learner=dataclasses.replace(
        config.learner, learning_starts=10**6, demo_ratio=0.5, intervention_capacity=1000))
    env = make_gym_env(ENV_ID, 30)
    spaces = RobotSpaces.from_gym(env.observation_space, env.action_space)
    learner = Learner(config, tmp_path / "run", spaces=spaces)
    thread = threading.Thread(target=learner.run, daemon=True)
    thread.start()
    link = LearnerLink(config.learner.address, "operator-actor", spaces, load_policy=lambda blob: None)
    try:
        assert link.wait_for_hello(10) is not None
        rng = np.random.default_rng(0)
        observation, _ = env.reset(seed=0)
        intervened_steps = 0
        for step in range(60):
            action = rng.uniform(-1, 1, 2).astype(np.float32)
            next_observation, reward, terminated, truncated, _ = env.step(action)
            intervened = step % 3 == 0
            intervened_steps += intervened
            link.submit(0, step, observation, action, reward, next_observation, terminated, truncated,
                        intervened=intervened)
            observation = next_observation
            if terminated or truncated:
                break
        assert link.flush(20)
        deadline = time.monotonic() + 10
        while len(learner.online or ()) < step + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        link.close()
        learner.stop()
        thread.join(30)
    assert len(learner.online) == step + 1
    assert len(learner.interventions) == intervened_steps
    assert learner.interventions.sample(64).intervened.all()

    # The demo share of every minibatch comes from the interventions (no recorded demos here).
    batch = learner._sample()
    sac = config.learner.sac
    assert len(batch) == sac.batch_size * sac.utd_ratio
    assert batch.intervened.sum() >= sac.batch_size * sac.utd_ratio // 2

    restored = Learner(config, tmp_path / "run", resume=True)
    try:
        assert len(restored.interventions) == intervened_steps
    finally:
        restored.close()


def test_a_learner_binding_beyond_loopback_without_curve_keys_refuses_to_start(tmp_path) -> None:
    from hardware_configs.loader import ConfigError

    config = _config()
    open_address = dataclasses.replace(config, learner=dataclasses.replace(config.learner, address="tcp://0.0.0.0:5999"))
    with pytest.raises(ConfigError, match="learner.address 'tcp://0.0.0.0:5999' binds beyond loopback: set learner.curve"):
        Learner(open_address, tmp_path / "run")
