"""PA-RL in a training session: ``learner.algorithm: parl`` over the real actor <-> learner sockets.

The learner fine-tunes a diffusion policy with PA-RL, publishes the steered policy as a packed
bundle, the actor loads and acts with it; checkpoints hold the distilled base policy and the
distillation's optimiser; a resumed learner and ``steerl eval`` load them.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import tests.point_env  # noqa: F401  (registers PointReach-v0)
from actor.env import make_gym_env
from hardware_configs.loader import ConfigError, load_dataclass, to_dict
from hardware_configs.schema import PARLConfig, SessionConfig, load_config, save_config
from learner.learner import BASE_POLICY_DIR, Learner, latest_checkpoint, load_policy_from_checkpoint
from learner.parl import PARLActingPolicy, PARLAgent
from policies.base import load_policy, policy_from_bytes, policy_to_bytes
from policies.diffusion import DiffusionPolicy, DiffusionPolicyConfig
from tools.session import start_acting
from transport.spaces import RobotSpaces

from conftest import free_tcp_address

ENV_ID = "tests.point_env:PointReach-v0"
SMALL_DIFFUSION = DiffusionPolicyConfig(horizon=1, n_obs=1, action_steps=1, hidden_dim=32, num_blocks=1,
                                        timestep_dim=16, train_timesteps=20, inference_steps=3)


def _base_policy(directory, env) -> DiffusionPolicy:
    spaces = RobotSpaces.from_gym(env.observation_space, env.action_space)
    policy = DiffusionPolicy(SMALL_DIFFUSION, spaces.observation_space(), spaces.action_space(), seed=0)
    policy.save(directory)
    return policy


def _config(base_dir, **parl_changes) -> SessionConfig:
    config = load_config("sim_panda_reach")
    sac = dataclasses.replace(config.learner.sac, hidden_dims=(32, 32), batch_size=32, utd_ratio=1)
    parl = PARLConfig(base_policy=str(base_dir), num_samples=4, top_k=2, local_steps=2, local_step_size=0.05,
                      distill_batch=16, distill_lr=1e-3, **parl_changes)
    learner = dataclasses.replace(config.learner, algorithm="parl", parl=parl, sac=sac, address=free_tcp_address(),
                                  learning_starts=100, publish_every_updates=20, checkpoint_every_updates=10**6,
                                  observation_keys=(), num_threads=1)
    actor = dataclasses.replace(config.actor, random_steps=100, eval_every_episodes=0, max_steps_per_update=1.0)
    robot = dataclasses.replace(config.robot, task=dataclasses.replace(config.robot.task, max_episode_steps=30))
    return dataclasses.replace(config, learner=learner, actor=actor, robot=robot)


def _base_weights(policy) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in policy.network.state_dict().items()}


def test_a_pa_rl_session_distils_publishes_acts_checkpoints_and_resumes(tmp_path) -> None:
    env = make_gym_env(ENV_ID, 30)
    initial = _base_weights(_base_policy(tmp_path / "base", env))
    config = _config(tmp_path / "base")
    learner = Learner(config, tmp_path / "run")
    thread = threading.Thread(target=learner.run, daemon=True)
    thread.start()
    spaces = RobotSpaces.from_gym(env.observation_space, env.action_space)
    loop, link = start_acting(config, env, "actor-0", spaces)
    try:
        loop.run(300)
        assert isinstance(loop.policy, PARLActingPolicy), "the actor acts with the published PA-RL bundle"
        assert loop.stats.policy_version > 1
        loop.evaluate(2)
        assert loop.stats.best_policy_weights == loop.policy.published_bytes
        assert link.flush(20)
    finally:
        link.close()
        learner.stop()
        thread.join(60)
    agent = learner.agent
    assert isinstance(agent, PARLAgent) and learner.updates >= 150
    assert agent.distiller.steps == learner.updates  # one distillation iteration per update by default
    assert any(not torch.equal(initial[name], tensor) for name, tensor in _base_weights(agent.base_policy).items())

    checkpoint = latest_checkpoint(tmp_path / "run")
    meta = json.loads((checkpoint / "agent.json").read_text())
    assert meta["algorithm"] == "parl" and meta["distill_steps"] == agent.distiller.steps
    saved_base = load_policy(checkpoint / BASE_POLICY_DIR)
    assert all(torch.equal(tensor, _base_weights(agent.base_policy)[name])
               for name, tensor in _base_weights(saved_base).items())
    # steerl eval's loader gives the steered policy, deterministic: the optimised argmax
    policy, keys = load_policy_from_checkpoint(config, tmp_path / "run")
    assert isinstance(policy, PARLActingPolicy) and keys == ("state",)
    observation, _ = env.reset(seed=3)
    action = policy.act(observation, deterministic=True)
    assert action.shape == (2,) and np.all(np.abs(action) <= 1.0)

    resumed = Learner(dataclasses.replace(config, learner=dataclasses.replace(
        config.learner, address=free_tcp_address())), tmp_path / "run", resume=True)
    try:
        assert isinstance(resumed.agent, PARLAgent) and resumed.updates == learner.updates
        assert resumed.agent.distiller.steps == agent.distiller.steps
        assert all(torch.equal(tensor, _base_weights(agent.base_policy)[name])
                   for name, tensor in _base_weights(resumed.agent.base_policy).items())
        moments = resumed.agent.distiller.optimizer.state_dict()["state"]
        assert moments and all(torch.equal(moments[i]["exp_avg"], state["exp_avg"]) for i, state in
                               agent.distiller.optimizer.state_dict()["state"].items())
    finally:
        resumed.close()


def test_a_policy_bundle_round_trips_any_kind_and_refuses_paths_outside_it(tmp_path) -> None:
    env = make_gym_env(ENV_ID, 30)
    base = _base_policy(tmp_path / "base", env)
    restored = policy_from_bytes(policy_to_bytes(base))
    observation = {"state": np.zeros((3, 4), np.float32)}
    torch.manual_seed(0)
    assert torch.equal(restored.sample(observation, 2, deterministic=True), base.sample(observation, 2, deterministic=True))
    import safetensors.torch

    evil = safetensors.torch.save({"../escape.json": torch.zeros(3, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="not a file of the policy directory"):
        policy_from_bytes(evil)
    with pytest.raises(ValueError, match="not a policy bundle"):
        policy_from_bytes(b"garbage")


def test_pa_rl_settings_are_checked_at_load_naming_the_field(tmp_path) -> None:
    data = to_dict(load_config("sim_panda_reach"))
    data["learner"]["algorithm"] = "parl"
    with pytest.raises(ConfigError, match="parl.base_policy: algorithm parl fine-tunes a base policy"):
        load_dataclass(SessionConfig, data)
    data["learner"]["parl"] = {"base_policy": "somewhere", "top_k": 64}
    with pytest.raises(ConfigError, match=r"learner.parl: PARLConfig.top_k: must not exceed num_samples"):
        load_dataclass(SessionConfig, data)
    data["learner"]["parl"] = {"base_policy": str(tmp_path / "nowhere")}
    config = load_dataclass(SessionConfig, data)
    env = make_gym_env(ENV_ID, 30)
    point = dataclasses.replace(config, learner=dataclasses.replace(config.learner, address=free_tcp_address(),
                                                                     observation_keys=()))
    with pytest.raises(ConfigError, match="learner.parl.base_policy: .*nowhere: cannot load the base policy"):
        Learner(point, tmp_path / "run", spaces=RobotSpaces.from_gym(env.observation_space, env.action_space))


def test_steerl_train_runs_a_pa_rl_session(tmp_path) -> None:
    env = make_gym_env(ENV_ID, 30)
    _base_policy(tmp_path / "base", env)
    config_file = save_config(_config(tmp_path / "base"), tmp_path / "parl.yaml")
    result = subprocess.run([sys.executable, "-m", "tools.cli", "train", "--config", str(config_file), "--env-id",
                             ENV_ID, "--steps", "250", "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((latest_checkpoint(tmp_path / "run") / "learner.json").read_text())
    assert meta["algorithm"] == "parl" and meta["updates"] > 50
    assert (latest_checkpoint(tmp_path / "run") / BASE_POLICY_DIR / "policy.json").exists()


def test_an_operator_intervenes_during_pa_rl_fine_tuning(tmp_path) -> None:
    """The teleop path is the algorithm's business as little as the robot server's: a simulated
    operator steers a PA-RL actor, and what it executed reaches the intervention buffer."""
    from actor.env import make_env
    from actor.intervention import InterventionWrapper
    from actor.simulated_operator import SimulatedOperator
    from hardware_configs.teleop import load_teleop_config
    from test_hil import LearnerThread, pick_cube_config, wait_for_rows

    config = pick_cube_config()
    env = make_env(config)
    seen = RobotSpaces.from_gym(env.observation_space, env.action_space).select(config.learner.observation_keys)
    DiffusionPolicy(SMALL_DIFFUSION, seen.observation_space(), seen.action_space(), seed=0).save(tmp_path / "base")
    parl = PARLConfig(base_policy=str(tmp_path / "base"), num_samples=4, top_k=2, local_steps=1)
    config = dataclasses.replace(config, learner=dataclasses.replace(config.learner, algorithm="parl", parl=parl))
    learner = LearnerThread(config, tmp_path / "run")
    operator = SimulatedOperator(load_teleop_config("simulated_operator"), config.robot)
    wrapped = InterventionWrapper(env, operator)
    loop, link = start_acting(config, wrapped, "actor-hil", RobotSpaces.from_gym(
        wrapped.observation_space, wrapped.action_space).select(config.learner.observation_keys))
    try:
        loop.run(150)
        assert link.flush(60)
        wait_for_rows(learner.learner, loop.stats.env_steps)
        assert isinstance(loop.policy, PARLActingPolicy)  # the steered base acted, from the first step
    finally:
        link.close()
        learner.stop()
        env.close()
    assert operator.total_interventions > 0
    assert len(learner.learner.interventions) == operator.total_interventions
    assert len(learner.learner.online) == loop.stats.env_steps
