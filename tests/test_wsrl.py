"""WSRL warm start (learner/wsrl.py): a Cal-QL checkpoint loaded into the online learner, the
warm-up without updates, batches without (or with some) offline data, the Q log, refusals that
name the checkpoint and the field, and ``steerl train --warm-start`` end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import tests.point_env  # noqa: F401  (registers PointReach-v0)
from actor.env import make_gym_env
from actor.learner_link import LearnerLink
from hardware_configs.loader import ConfigError
from hardware_configs.schema import SACConfig, WarmStartConfig, load_config, save_config
from learner.calql import CalQLConfig, save_offline_checkpoint, train_offline
from learner.learner import Learner, latest_checkpoint
from learner.replay import ReplayBuffer
from learner.wsrl import Q_LOG_FILE, WarmStartError, load_warm_start, q_values
from learner.sac import SACAgent
from transport import steerl_pb2 as pb
from transport.codec import encode_transition
from transport.spaces import FieldSpec, RobotSpaces

from conftest import free_tcp_address

torch.set_num_threads(1)

ENV_ID = "tests.point_env:PointReach-v0"
# What the pre-trained policy was taught to do everywhere (uniform random actions average 0).
CONSTANT_ACTION = np.array([0.6, -0.4], np.float32)
SAC = SACConfig(hidden_dims=(32, 32), batch_size=32, discount=0.9, actor_lr=3e-3, init_temperature=0.1)
OFFLINE_REWARD = 5.0  # marks offline rows in a batch (the point env's rewards are <= 0)


def point_env():
    return make_gym_env(ENV_ID, 30)


def point_spaces() -> RobotSpaces:
    env = point_env()
    return RobotSpaces.from_gym(env.observation_space, env.action_space)


def constant_action_episodes(episodes: int, reward: float | None = None) -> ReplayBuffer:
    """Point-env episodes driven by CONSTANT_ACTION (rewards replaced by ``reward`` when given)."""
    env = point_env()
    buffer = ReplayBuffer(env.observation_space, 2, capacity=1000, seed=0)
    for episode in range(episodes):
        observation, _ = env.reset(seed=episode)
        for _ in range(30):
            next_observation, env_reward, terminated, truncated, _ = env.step(CONSTANT_ACTION)
            buffer.add(observation, CONSTANT_ACTION, env_reward if reward is None else reward, next_observation,
                       terminated, truncated)
            observation = next_observation
            if terminated or truncated:
                break
    return buffer


@pytest.fixture(scope="module")
def calql_run(tmp_path_factory) -> Path:
    """A Cal-QL run directory whose policy outputs about CONSTANT_ACTION (behaviour cloning term)."""
    agent = train_offline(CalQLConfig(sac=SAC, bc_weight=10.0, num_action_samples=4), constant_action_episodes(10),
                          steps=300, seed=0, log_every=300)
    run = tmp_path_factory.mktemp("calql")
    save_offline_checkpoint(agent, run)
    return run


def session(warm_start: WarmStartConfig, sac: SACConfig = SAC, **actor_changes):
    config = load_config("sim_panda_reach")
    learner = dataclasses.replace(config.learner, address=free_tcp_address(), observation_keys=(), sac=sac,
                                  replay_capacity=10_000, num_threads=1, learning_starts=10,
                                  publish_every_updates=20, checkpoint_every_updates=10**6, warm_start=warm_start)
    actor = dataclasses.replace(config.actor, **{"random_steps": 1000, "eval_every_episodes": 0, "eval_episodes": 0,
                                                 "max_steps_per_update": 1.0, **actor_changes})
    robot = dataclasses.replace(config.robot, task=dataclasses.replace(config.robot.task, max_episode_steps=30))
    return dataclasses.replace(config, learner=learner, actor=actor, robot=robot)


def feed(learner: Learner, count: int, start: int = 0, episode: int = 0) -> int:
    """Ingest ``count`` random point-env steps as one actor batch; returns the next step number."""
    env = point_env()
    rng = np.random.default_rng(start)
    batch = pb.TransitionBatch(actor_id="actor-test")
    observation, _ = env.reset(seed=start)
    for step in range(start, start + count):
        action = rng.uniform(-1, 1, 2).astype(np.float32)
        next_observation, reward, terminated, truncated, _ = env.step(action)
        encode_transition(batch.transitions.add(), episode, step, observation, action, reward, next_observation,
                          terminated, truncated)
        observation = next_observation if not (terminated or truncated) else env.reset()[0]
    ack = learner.service.ingest(batch)
    assert ack.accepted == count, ack
    return start + count


def train_while_ready(learner: Learner) -> int:
    done = 0
    while learner.ready_to_update():
        learner.train_step()
        done += 1
    return done


def network_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in tensors.items()
            if not name.startswith("optimizer.") and name != "rng_state"}


# ---------------------------------------------------------------------------------------------
# Loading and publishing
# ---------------------------------------------------------------------------------------------


def test_warm_start_loads_every_network_and_publishes_the_pretrained_policy_first(calql_run, tmp_path) -> None:
    checkpoint = latest_checkpoint(calql_run)
    config = session(WarmStartConfig(checkpoint=str(calql_run), warmup_steps=100))
    learner = Learner(config, tmp_path / "run", spaces=point_spaces())
    try:
        stored = safetensors.torch.load_file(str(checkpoint / "agent.safetensors"))
        loaded = learner.agent.checkpoint_tensors()
        for name, tensor in network_tensors(stored).items():  # encoder statistics, actor, critics, targets, alpha
            assert torch.equal(loaded[name], tensor), name
        optimizer_moments = [name for name in stored if name.startswith("optimizer.critic.")]
        assert optimizer_moments and all(torch.equal(loaded[name], stored[name]) for name in optimizer_moments)
        agent_meta = json.loads((checkpoint / "agent.json").read_text())
        assert learner.agent.state_normalized and learner.agent.update_count == 0
        assert learner.agent.critic_optimizer.param_groups[0]["lr"] == SAC.critic_lr
        assert learner.warm_started_from["offline_updates"] == agent_meta["update_count"] == 300
        assert learner.warm_started_from["algorithm"] == "calql"

        # The first weights an actor fetches over the socket are the checkpoint's policy.
        link = LearnerLink(config.learner.address, "actor-0", point_spaces(), load_policy=lambda blob: blob)
        thread = threading.Thread(target=learner.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while (fetched := link.take_policy()) is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            link.close()
            learner.stop()
            thread.join(30)
        assert fetched is not None and fetched[0] == 1
        published = safetensors.torch.load(fetched[1])
        pretrained = safetensors.torch.load_file(str(checkpoint / "policy.safetensors"))
        assert published.keys() == pretrained.keys()
        assert all(torch.equal(published[name], pretrained[name]) for name in pretrained)
    finally:
        learner.close()


def test_load_options_reset_the_temperature_and_the_optimisers(calql_run) -> None:
    spaces = point_spaces()
    agent = SACAgent(SAC, spaces.observation_space(), spaces.action_space(), seed=1)
    summary = load_warm_start(agent, WarmStartConfig(checkpoint=str(calql_run), load_optimizers=False,
                                                     reset_temperature=True))
    assert summary["optimizers"] == "fresh" and agent.temperature == pytest.approx(SAC.init_temperature)
    assert not any(optimizer.state for optimizer in (agent.critic_optimizer, agent.actor_optimizer,
                                                      agent.temperature_optimizer))
    batch = constant_action_episodes(2).sample(SAC.batch_size)
    before = agent.generator.get_state()
    measured = q_values(agent, batch)
    assert torch.equal(agent.generator.get_state(), before)  # measuring moves no random stream
    assert all(np.isfinite(value) for value in measured.values())
    agent.update(batch)  # fresh Adam moments start on the next step


# ---------------------------------------------------------------------------------------------
# Warm-up, batches, Q log, resume
# ---------------------------------------------------------------------------------------------


def test_no_update_during_the_warm_up_then_one_per_env_step_with_the_q_values_logged(calql_run, tmp_path) -> None:
    config = session(WarmStartConfig(checkpoint=str(calql_run), warmup_steps=60, q_log_updates=5, q_log_every=10))
    learner = Learner(config, tmp_path / "run", spaces=point_spaces())
    try:
        pretrained_policy = learner.service._weights
        step = feed(learner, 59)
        assert not learner.ready_to_update()
        step = feed(learner, 1, start=step)  # 60 transitions: the warm-up is complete, nothing to cover yet
        assert train_while_ready(learner) == 0 and learner.service._weights == pretrained_policy
        step = feed(learner, 25, start=step, episode=1)
        assert train_while_ready(learner) == 25 and learner.updates == 25  # never more than env steps since

        q_log = json.loads((tmp_path / "run" / Q_LOG_FILE).read_text())
        assert q_log["warm_started_from"]["checkpoint"] == str(latest_checkpoint(calql_run))
        assert q_log["warmup_steps"] == 60 and q_log["offline_ratio"] == 0.0
        assert [entry["updates"] for entry in q_log["entries"]] == [0, 1, 2, 3, 4, 10, 20]
        first = q_log["entries"][0]
        assert first["transitions"] == 85 and first["rows"] == SAC.batch_size
        assert all(np.isfinite(first[name]) for name in ("q_data", "q_policy", "td_target", "reward"))
        learner.checkpoint()
        own_policy = learner.agent.publish_policy()
    finally:
        learner.close()

    # --resume: the run's own checkpoint wins over the offline one; the Q log goes on.
    resumed = Learner(config, tmp_path / "run", resume=True)
    try:
        assert resumed.updates == 25 and resumed.agent.publish_policy() == own_policy != pretrained_policy
        assert resumed.warm_started_from == q_log["warm_started_from"]
        assert len(resumed.q_log.entries) == 7
        feed(resumed, 10, start=step, episode=2)
        assert train_while_ready(resumed) == 10
        assert resumed.q_log.entries[-1]["updates"] == 30
    finally:
        resumed.close()

    # Any learner checkpoint (here this online run's) is an offline checkpoint to warm-start from.
    spaces = point_spaces()
    agent = SACAgent(SAC, spaces.observation_space(), spaces.action_space(), seed=7)
    summary = load_warm_start(agent, WarmStartConfig(checkpoint=str(tmp_path / "run")))
    assert summary["algorithm"] == "sac" and agent.publish_policy() == own_policy


def test_the_actor_waits_actor_delay_updates_while_the_critics_recalibrate(calql_run, tmp_path) -> None:
    config = session(WarmStartConfig(checkpoint=str(calql_run), warmup_steps=20, actor_delay_updates=6))
    learner = Learner(config, tmp_path / "run", spaces=point_spaces())
    try:
        def actor_and_critic() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
            tensors = network_tensors(learner.agent.checkpoint_tensors())
            return ({name: t.clone() for name, t in tensors.items() if name.startswith("actor.")},
                    {name: t.clone() for name, t in tensors.items() if name.startswith("critic.")})

        pretrained_actor, pretrained_critic = actor_and_critic()
        assert pretrained_actor and pretrained_critic
        temperature = learner.agent.log_alpha.item()
        step = feed(learner, 26)
        assert train_while_ready(learner) == 6
        actor, critic = actor_and_critic()
        assert all(torch.equal(actor[name], pretrained_actor[name]) for name in actor)  # the actor waited
        assert learner.agent.log_alpha.item() == temperature
        assert any(not torch.equal(critic[name], pretrained_critic[name]) for name in critic)
        feed(learner, 1, start=step, episode=1)
        assert train_while_ready(learner) == 1  # the seventh update moves the actor
        actor, _ = actor_and_critic()
        assert any(not torch.equal(actor[name], pretrained_actor[name]) for name in actor)
    finally:
        learner.close()


@pytest.mark.parametrize("offline_ratio", [0.0, 0.5])
def test_the_offline_share_of_each_minibatch_is_offline_ratio(calql_run, tmp_path, offline_ratio) -> None:
    offline = tmp_path / "offline"
    constant_action_episodes(4, reward=OFFLINE_REWARD).save(offline)
    sac = dataclasses.replace(SAC, utd_ratio=2)
    config = session(WarmStartConfig(checkpoint=str(calql_run), warmup_steps=20, offline_ratio=offline_ratio,
                                     offline_data=(str(offline),) if offline_ratio else ()), sac=sac)
    # The demos join the offline sources: with offline_ratio 0 they are not sampled either.
    learner = Learner(config, tmp_path / "run", spaces=point_spaces(), demos=offline)
    try:
        feed(learner, 40)
        for _ in range(10):
            batch, from_offline = learner._sample_with_sources()
            marked = batch.rewards == OFFLINE_REWARD
            np.testing.assert_array_equal(marked, from_offline)
            per_minibatch = marked.reshape(sac.utd_ratio, sac.batch_size).sum(axis=1)
            np.testing.assert_array_equal(per_minibatch, round(sac.batch_size * offline_ratio))
        assert train_while_ready(learner) == 20
    finally:
        learner.close()


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_checkpoint_and_the_field(calql_run, tmp_path) -> None:
    checkpoint = str(latest_checkpoint(calql_run))
    warm = WarmStartConfig(checkpoint=str(calql_run))
    wider = dataclasses.replace(SAC, hidden_dims=(64, 64))
    with pytest.raises(WarmStartError, match=r"learner\.sac\.hidden_dims: the checkpoint has \[32, 32\], this "
                                             r"learner \[64, 64\]") as error:
        Learner(session(warm, sac=wider), tmp_path / "wider", spaces=point_spaces())
    assert checkpoint in str(error.value)
    with pytest.raises(WarmStartError, match="learner.sac.num_critics"):
        Learner(session(warm, sac=dataclasses.replace(SAC, num_critics=4)), tmp_path / "ensemble")

    spaces = point_spaces()
    other_action = RobotSpaces(observation=spaces.observation, action=FieldSpec("float32", (3,), -1.0, 1.0))
    with pytest.raises(WarmStartError, match="action: the checkpoint has 2 dimensions, the robot 3") as error:
        Learner(session(warm), tmp_path / "action", spaces=other_action)
    assert checkpoint in str(error.value)
    other_state = RobotSpaces(observation={"state": FieldSpec("float32", (6,), -1.0, 1.0)}, action=spaces.action)
    with pytest.raises(WarmStartError, match=r"observation field 'state': the checkpoint has float32\(4,\), "
                                             r"the robot float32\(6,\)"):
        Learner(session(warm), tmp_path / "state", spaces=other_state)
    renamed = RobotSpaces(observation={"position": spaces.observation["state"]}, action=spaces.action)
    with pytest.raises(WarmStartError, match=r"learner\.observation_keys: the checkpoint's networks read \['state'\], "
                                             r"this learner's \['position'\]"):
        Learner(session(warm), tmp_path / "keys", spaces=renamed)
    with pytest.raises(WarmStartError, match=f"learner.warm_start.checkpoint: {tmp_path / 'nowhere'} does not exist"):
        Learner(session(WarmStartConfig(checkpoint=str(tmp_path / "nowhere"))), tmp_path / "missing")
    with pytest.raises(WarmStartError, match=r"learner\.warm_start\.offline_data\[0\]"):
        Learner(session(WarmStartConfig(checkpoint=str(calql_run), offline_ratio=0.5,
                                        offline_data=(str(tmp_path / "no_buffer"),))), tmp_path / "data",
                spaces=spaces)


def test_an_actor_in_other_spaces_is_refused_and_the_learner_stops_with_the_reason(calql_run, tmp_path) -> None:
    config = session(WarmStartConfig(checkpoint=str(calql_run)))
    learner = Learner(config, tmp_path / "run")  # the spaces come with the first actor
    failures: list[BaseException] = []

    def run() -> None:
        try:
            learner.run()
        except WarmStartError as error:
            failures.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    spaces = point_spaces()
    wrong = RobotSpaces(observation=spaces.observation, action=FieldSpec("float32", (3,), -1.0, 1.0))
    link = LearnerLink(config.learner.address, "actor-0", wrong, load_policy=lambda blob: blob, timeout_ms=1000)
    try:
        thread.join(20)
    finally:
        link.close(flush_timeout_s=0)
    assert not thread.is_alive() and not link.connected
    assert failures and "action: the checkpoint has 2 dimensions, the robot 3" in str(failures[0])
    assert learner.agent is None and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("text, expected", [
    ("offline_ratio: 0.5", "learner.warm_start: offline_ratio 0.5 needs offline_data"),
    ("offline_ratio: 1.0\n    offline_data: [d]", "offline_ratio must lie in [0, 1)"),
    ("warmup_steps: -1", "warmup_steps must be non-negative"),
    ("actor_delay_updates: -5", "actor_delay_updates must be non-negative"),
    ("warmup_step: 10", "learner.warm_start.warmup_step: unknown field"),
])
def test_warm_start_config_errors_name_the_field(tmp_path, text, expected) -> None:
    path = tmp_path / "cell.yaml"
    path.write_text(f"name: x\nlearner:\n  warm_start:\n    checkpoint: runs/calql\n    {text}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value) and expected in str(error.value)


# ---------------------------------------------------------------------------------------------
# steerl train --warm-start, end to end
# ---------------------------------------------------------------------------------------------


def _steerl(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "120"})


def test_steerl_train_refuses_a_missing_warm_start_before_starting_anything(tmp_path) -> None:
    config_file = save_config(session(WarmStartConfig()), tmp_path / "point.yaml")
    result = _steerl("train", "--config", str(config_file), "--env-id", ENV_ID, "--steps", "10",
                     "--run-dir", str(tmp_path / "run"), "--warm-start", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert f"learner.warm_start.checkpoint: {tmp_path / 'nowhere'} does not exist" in result.stderr
    result = _steerl("learner", "--config", str(config_file), "--warmup-steps", "10")
    assert result.returncode == 2 and "--warmup-steps: needs a warm start" in result.stderr
    assert not (tmp_path / "run").exists()


def test_steerl_train_warm_start_acts_with_the_pretrained_policy_from_the_first_step(calql_run, tmp_path) -> None:
    # random_steps 1000 in the config: a warm-started actor takes none of them.
    config_file = save_config(session(WarmStartConfig(), random_steps=1000), tmp_path / "point.yaml")
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = _steerl("train", "--config", str(config_file), "--env-id", ENV_ID, "--steps", "300",
                     "--run-dir", str(run_dir), "--warm-start", str(calql_run), "--warmup-steps", "150")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"steerl train --warm-start: {time.monotonic() - started:.1f} s")
    assert "warm start (WSRL) from" in result.stdout

    checkpoint = latest_checkpoint(run_dir)
    meta = json.loads((checkpoint / "learner.json").read_text())
    assert meta["warm_start"]["checkpoint"] == str(latest_checkpoint(calql_run))
    assert 0 < meta["updates"] <= meta["transitions_received"] - 150
    table = ReplayBuffer.load(checkpoint / "online").transition_table()
    first = table["actions"][np.argsort(table["add_index"])][:60]  # the first two episodes, before any update
    print("first actions: mean", first.mean(axis=0), "std", first.std(axis=0))
    np.testing.assert_allclose(first.mean(axis=0), CONSTANT_ACTION, atol=0.15)
    assert np.all(first.std(axis=0) < 0.25)  # uniform random actions: mean 0, std 0.58

    q_log = json.loads((run_dir / Q_LOG_FILE).read_text())
    assert q_log["warmup_steps"] == 150 and q_log["entries"][0]["updates"] == 0
    assert q_log["entries"][0]["transitions"] > 150
