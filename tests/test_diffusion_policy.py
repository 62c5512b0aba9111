"""policies.diffusion: training windows, schedulers, sampling, files, learning, acting, and train-bc."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from gymnasium import spaces

from hardware_configs.loader import ConfigError
from learner.replay import ReplayBuffer
from policies.base import POLICY_FILE, WEIGHTS_FILE, load_policy
from policies.diffusion import (
    DiffusionActor,
    DiffusionPolicy,
    DiffusionPolicyConfig,
    Demonstrations,
    ObservationHistory,
    load_diffusion_config,
    load_demonstrations,
    train_diffusion_policy,
)

torch.set_num_threads(1)

POINT_SPACE = spaces.Dict({"point": spaces.Box(-2.0, 2.0, (2,), np.float32)})
ACTION_2D = spaces.Box(-1.0, 1.0, (2,), np.float32)
# A small, fast network for the tests: the learning tests train it for 500 steps (~3 s of one core).
SMALL = DiffusionPolicyConfig(horizon=8, n_obs=2, action_steps=4, hidden_dim=64, num_blocks=2, batch_size=128,
                              lr=5e-3, lr_warmup_steps=20, ema_decay=0.999)


def _step(observation: dict, action: np.ndarray, next_observation: dict, end: bool = False) -> tuple:
    return observation, np.asarray(action, np.float32), 0.0, next_observation, False, end


def _point_episodes(policy, count: int, length: int, seed: int, start_low=(-0.8, -0.8), start_high=(0.8, 0.8),
                    dt: float = 0.1) -> list[list[tuple]]:
    """Episodes of a 2-D point moved by ``dt * action``; ``policy(point, episode_index) -> action``."""
    rng = np.random.default_rng(seed)
    episodes = []
    for index in range(count):
        point = rng.uniform(start_low, start_high).astype(np.float32)
        steps = []
        for _ in range(length):
            action = policy(point, index)
            after = (point + dt * action).astype(np.float32)
            steps.append(_step({"point": point}, action, {"point": after}, end=len(steps) == length - 1))
            point = after
        episodes.append(steps)
    return episodes


def _numbered_episodes(lengths: tuple[int, ...]) -> list[list[tuple]]:
    """Observations ``{"row": [r], "image": r}`` and actions ``[r / 100, -r / 100]`` numbered by
    global row; each episode's final next observation is ``r + 0.5``."""

    def observation(value: float) -> dict[str, np.ndarray]:
        return {"row": np.array([value], np.float32), "image": np.full((4, 4, 3), int(value), np.uint8)}

    episodes, row = [], 0
    for length in lengths:
        steps = []
        for index in range(length):
            last = index == length - 1
            steps.append(_step(observation(row), [row / 100, -row / 100], observation(row + (0.5 if last else 1)),
                               end=last))
            row += 1
        episodes.append(steps)
    return episodes


# --------------------------------------------------------------------------------------------
# Demonstrations and windows
# --------------------------------------------------------------------------------------------


def test_windows_repeat_the_first_observation_and_the_last_action_at_episode_boundaries() -> None:
    demos = load_demonstrations(_numbered_episodes((3, 5)))
    assert (demos.num_episodes, demos.num_steps, demos.action_dim) == (2, 8, 2)
    np.testing.assert_array_equal(demos.episode_starts, [0, 3])
    history, chunk = demos.window_indices(np.array([0, 1, 2, 3, 7]), n_obs=3, horizon=4)
    np.testing.assert_array_equal(history, [[0, 0, 0], [0, 0, 1], [0, 1, 2], [3, 3, 3], [5, 6, 7]])
    np.testing.assert_array_equal(chunk, [[0, 1, 2, 2], [1, 2, 2, 2], [2, 2, 2, 2], [3, 4, 5, 6], [7, 7, 7, 7]])

    observations, actions = demos.windows(np.array([1, 6]), n_obs=3, horizon=4)
    assert observations["row"].shape == (2, 3, 1) and observations["image"].shape == (2, 3, 4, 4, 3)
    assert observations["image"].dtype == np.uint8
    np.testing.assert_array_equal(observations["row"][:, :, 0], [[0, 0, 1], [4, 5, 6]])
    assert actions.shape == (2, 4, 2) and actions.dtype == np.float32
    np.testing.assert_allclose(actions[:, :, 0], [[0.01, 0.02, 0.02, 0.02], [0.06, 0.07, 0.07, 0.07]])


def test_a_saved_demo_buffer_gives_the_same_episodes_as_the_rollouts(tmp_path) -> None:
    episodes = _numbered_episodes((3, 4, 2, 5))
    space = spaces.Dict({"row": spaces.Box(-100.0, 100.0, (1,), np.float32),
                         "image": spaces.Box(0, 255, (4, 4, 3), np.uint8)})
    buffer = ReplayBuffer(space, 2, capacity=100)
    # Two actor streams, interleaved step by step, as the learner receives them.
    for first, second in zip(episodes[0] + episodes[1], episodes[2] + episodes[3]):
        buffer.add(*first, stream_id=0)
        buffer.add(*second, stream_id=1)
    for step in (episodes[2] + episodes[3])[len(episodes[0] + episodes[1]):]:
        buffer.add(*step, stream_id=1)
    buffer.save(tmp_path / "demos")

    from_buffer = load_demonstrations(tmp_path / "demos")
    from_episodes = load_demonstrations(episodes)
    np.testing.assert_array_equal(from_buffer.episode_starts, from_episodes.episode_starts)
    np.testing.assert_array_equal(from_buffer.actions, from_episodes.actions)
    for key in ("row", "image"):
        np.testing.assert_array_equal(from_buffer.observations[key], from_episodes.observations[key])
    assert from_buffer.observation_space["row"] == space["row"]

    only_state = load_demonstrations(tmp_path / "demos", observation_keys=("row",))
    assert set(only_state.observations) == {"row"} and set(only_state.observation_space.spaces) == {"row"}
    with pytest.raises(KeyError, match="'wrist'"):
        load_demonstrations(tmp_path / "demos", observation_keys=("wrist",))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothing" / "meta.json"))):
        load_demonstrations(tmp_path / "nothing")


def test_demonstrations_refuse_actions_outside_the_normalised_box() -> None:
    episodes = _numbered_episodes((2,))
    episodes[0][1] = _step(episodes[0][1][0], [1.5, 0.0], episodes[0][1][3])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        load_demonstrations(episodes)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("horizon", 0), ("n_obs", -1), ("action_steps", 17), ("inference_steps", 101), ("sampler", "euler"),
    ("ema_decay", 1.0), ("lr", 0.0), ("timestep_dim", 7), ("beta_schedule", "cosine"), ("dropout", 1.0),
])
def test_config_errors_name_the_field(field, value) -> None:
    with pytest.raises(ValueError, match=rf"DiffusionPolicyConfig\.{field}: .*got {value!r}"):
        DiffusionPolicyConfig(**{field: value})


def test_config_files_are_checked_field_by_field(tmp_path) -> None:
    path = tmp_path / "bc.yaml"
    path.write_text("horizon: 8\nn_obs: 2\naction_steps: 4\nsampler: ddpm\n")
    assert load_diffusion_config(path) == DiffusionPolicyConfig(horizon=8, n_obs=2, action_steps=4, sampler="ddpm")
    path.write_text("horizon: 8\naction_steps: 9\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: DiffusionPolicyConfig.action_steps")):
        load_diffusion_config(path)
    path.write_text("horizon: eight\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: horizon: expected int")):
        load_diffusion_config(path)
    path.write_text("horizonn: 8\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: horizonn: unknown field")):
        load_diffusion_config(path)


# --------------------------------------------------------------------------------------------
# Schedulers and sampling
# --------------------------------------------------------------------------------------------


def _untrained(config: DiffusionPolicyConfig = SMALL, seed: int = 0) -> DiffusionPolicy:
    return DiffusionPolicy(config, POINT_SPACE, ACTION_2D, seed=seed)


def _count_denoiser_calls(policy: DiffusionPolicy) -> list[int]:
    calls = [0]
    policy.network.denoiser.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_noise_schedules_are_diffusers_ddpm_and_ddim_from_one_config() -> None:
    policy = _untrained()
    training = policy.noise_scheduler
    assert isinstance(training, DDPMScheduler)
    assert training.config.num_train_timesteps == 100 and training.config.beta_schedule == "squaredcos_cap_v2"
    assert training.config.prediction_type == "epsilon" and training.config.clip_sample
    ddim, ddpm = policy._samplers["ddim"], policy._samplers["ddpm"]
    assert isinstance(ddim, DDIMScheduler) and isinstance(ddpm, DDPMScheduler)
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "clip_sample"):
        assert ddim.config[key] == training.config[key] == ddpm.config[key], key
    torch.testing.assert_close(ddim.alphas_cumprod, training.alphas_cumprod)

    # DDIM runs inference_steps denoiser evaluations; DDPM all 100 train timesteps.
    calls = _count_denoiser_calls(policy)
    observations = {"point": np.zeros((2, 2), np.float32)}
    policy.sample(observations, 3)
    assert calls[0] == 10
    policy.sample(observations, 3, sampler="ddim", inference_steps=8)
    assert calls[0] == 18
    policy.sample(observations, 3, sampler="ddpm")
    assert calls[0] == 118


def test_sample_and_sample_chunks_shapes_bounds_and_determinism() -> None:
    policy = _untrained()
    rng = np.random.default_rng(0)
    history = {"point": rng.uniform(-1, 1, (3, 2, 2)).astype(np.float32)}  # [B, n_obs, 2]
    chunks = policy.sample_chunks(history, 5)
    assert chunks.shape == (3, 5, 8, 2) and chunks.dtype == torch.float32
    assert torch.all(chunks.abs() <= 1.0)
    assert not torch.allclose(chunks[:, 0], chunks[:, 1]), "stochastic chunks of one observation should differ"
    first = policy.sample(history, 5)
    assert first.shape == (3, 5, 2) and torch.all(first.abs() <= 1.0)

    for sampler in ("ddim", "ddpm"):
        deterministic = policy.sample_chunks(history, 4, deterministic=True, sampler=sampler)
        assert torch.equal(deterministic, deterministic[:, :1].expand_as(deterministic))
        assert torch.equal(deterministic, policy.sample_chunks(history, 4, deterministic=True, sampler=sampler))
    assert torch.equal(policy.sample(history, 2, deterministic=True),
                       policy.sample_chunks(history, 2, deterministic=True)[:, :, 0])

    # One observation without a history axis stands for a history of n_obs copies of it.
    current = {"point": history["point"][:, -1]}
    repeated = {"point": np.repeat(current["point"][:, None], 2, axis=1)}
    assert torch.equal(policy.sample(current, 2, deterministic=True), policy.sample(repeated, 2, deterministic=True))
    torch.testing.assert_close(torch.from_numpy(policy.act({"point": current["point"][0]}, deterministic=True)),
                               policy.sample(current, 1, deterministic=True)[0, 0], rtol=0, atol=1e-5)
    assert policy.sample({"point": torch.from_numpy(history["point"])}, 2).shape == (3, 2, 2)
    with pytest.raises(ValueError, match=r"'point': expected \[B, 2, \*\(2,\)\]"):
        policy.sample({"point": np.zeros((3, 3, 2), np.float32)}, 1)


def test_the_denoiser_conditions_k_chunks_per_row_as_if_each_had_its_own_copy() -> None:
    from policies.diffusion import ConditionalResidualMLP

    torch.manual_seed(0)
    denoiser = ConditionalResidualMLP(horizon=4, action_dim=2, condition_dim=6, hidden_dim=16, num_blocks=2,
                                      timestep_dim=8, dropout=0.0)
    for block in denoiser.blocks:  # FiLM starts as the identity; give it weights so the condition matters
        torch.nn.init.normal_(block.film.weight)
    condition, timesteps, noisy = torch.randn(3, 6), torch.tensor([5, 40, 90]), torch.randn(3 * 4, 4, 2)
    grouped = denoiser(noisy, timesteps, condition)
    copied = denoiser(noisy, timesteps.repeat_interleave(4), condition.repeat_interleave(4, dim=0))
    torch.testing.assert_close(grouped, copied)
    assert not torch.allclose(grouped[:4], denoiser(noisy[:4], timesteps[:1], condition[1:2]))
    with pytest.raises(ValueError, match="expected K chunks per"):
        denoiser(noisy[:5], timesteps, condition)


def test_stochastic_samples_are_reproducible_from_a_generator() -> None:
    policy = _untrained()
    observations = {"point": np.zeros((2, 2), np.float32)}
    first = policy.sample_chunks(observations, 3, generator=torch.Generator().manual_seed(5))
    again = policy.sample_chunks(observations, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_save_then_load_policy_gives_identical_samples(tmp_path) -> None:
    demos = load_demonstrations(_point_episodes(lambda p, i: np.clip(-p, -1, 1), 4, 6, seed=0),
                                observation_space=POINT_SPACE)
    policy = train_diffusion_policy(SMALL, demos, steps=3, seed=1)
    policy.save(tmp_path / "bc")
    description = json.loads((tmp_path / "bc" / POLICY_FILE).read_text())
    assert description["kind"] == "diffusion" and description["observation_keys"] == ["point"]
    assert description["info"]["demo_episodes"] == 4

    loaded = load_policy(tmp_path / "bc")
    assert isinstance(loaded, DiffusionPolicy) and loaded.config == SMALL and loaded.info == policy.info
    assert torch.equal(loaded.network.encoder.state_std, policy.network.encoder.state_std)
    history = {"point": np.random.default_rng(1).uniform(-1, 1, (3, 2, 2)).astype(np.float32)}
    assert torch.equal(loaded.sample_chunks(history, 2, deterministic=True),
                       policy.sample_chunks(history, 2, deterministic=True))
    generator_seed = 11
    assert torch.equal(loaded.sample_chunks(history, 4, generator=torch.Generator().manual_seed(generator_seed)),
                       policy.sample_chunks(history, 4, generator=torch.Generator().manual_seed(generator_seed)))
    for sampler in ("ddim", "ddpm"):
        fresh = DiffusionPolicy.load(tmp_path / "bc")  # the same seed -> the same own generator
        assert torch.equal(fresh.sample(history, 3, sampler=sampler), load_policy(tmp_path / "bc").sample(
            history, 3, sampler=sampler))


def test_a_policy_for_another_action_size_is_refused_naming_the_file(tmp_path) -> None:
    _untrained().save(tmp_path)
    path, weights = tmp_path / POLICY_FILE, tmp_path / WEIGHTS_FILE
    content = json.loads(path.read_text())

    edited = json.loads(json.dumps(content))
    edited["spaces"]["action"]["shape"] = [3]
    edited["action_dim"] = 3
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=re.escape(f"{weights}: tensor shapes do not match") + ".*denoiser"):
        load_policy(tmp_path)

    edited["action_dim"] = 2
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=re.escape(f"{path}: action_dim 2 disagrees with the action space shape [3]")):
        load_policy(tmp_path)

    path.write_text(json.dumps({**content, "kind": "sac"}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: kind 'sac' is not 'diffusion'")):
        DiffusionPolicy.load(tmp_path)

    path.write_text(json.dumps({**content, "config": {**content["config"], "horizon": 0}}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: config: DiffusionPolicyConfig.horizon")):
        load_policy(tmp_path)

    path.write_text(json.dumps(content))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{weights}: missing")):
        load_policy(tmp_path)


# --------------------------------------------------------------------------------------------
# Learning (measured outcomes)
# --------------------------------------------------------------------------------------------

GOAL = np.array([0.3, -0.2], np.float32)


def _reach_expert(point: np.ndarray, _episode: int = 0) -> np.ndarray:
    return np.clip(2.0 * (GOAL - point), -0.9, 0.9).astype(np.float32)


def _mean_first_action_error(policy: DiffusionPolicy, demos: Demonstrations, deterministic: bool) -> float:
    history, chunks = demos.windows(np.arange(demos.num_steps), policy.n_obs, policy.horizon)
    samples = policy.sample_chunks(history, 4, deterministic=deterministic, sampler="ddim").numpy()
    return float(np.abs(samples[:, :, 0] - chunks[:, None, 0]).mean())


def test_behaviour_cloning_learns_a_state_feedback_expert() -> None:
    """40 demos of ``a = clip(2 (goal - p))``; DDIM's first actions on 10 new episodes must match the
    expert's to 0.1 on average, both deterministic and stochastic; the untrained policy is far off."""
    train = load_demonstrations(_point_episodes(_reach_expert, 40, 20, seed=0), observation_space=POINT_SPACE)
    held_out = load_demonstrations(_point_episodes(_reach_expert, 10, 20, seed=1), observation_space=POINT_SPACE)
    losses: list[float] = []
    policy = train_diffusion_policy(SMALL, train, steps=500, seed=0, log_every=100,
                                    progress=lambda step, loss: losses.append(loss))
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0]

    untrained = _untrained()
    for deterministic in (True, False):
        trained_error = _mean_first_action_error(policy, held_out, deterministic)
        untrained_error = _mean_first_action_error(untrained, held_out, deterministic)
        assert trained_error < 0.1, (deterministic, trained_error)
        assert untrained_error > 0.3, (deterministic, untrained_error)


def test_behaviour_cloning_keeps_two_modes_apart_and_follows_one_per_chunk() -> None:
    """Half the demos go up (a_y = +0.8), half down (-0.8), from the same start region, while a_x
    steers x to 0. At the start the history cannot tell the modes apart: the first action must be
    close to one of the two expert actions (not to their average, where a regressor would land),
    both modes must be drawn, and each chunk must stay in one mode."""

    def expert(point: np.ndarray, episode: int) -> np.ndarray:
        return np.array([np.clip(-2.0 * point[0], -0.8, 0.8), 0.8 if episode % 2 else -0.8], np.float32)

    def episodes(count: int, seed: int) -> Demonstrations:
        return load_demonstrations(_point_episodes(expert, count, 10, seed, start_low=(-0.5, -0.2),
                                                   start_high=(0.5, 0.2)), observation_space=POINT_SPACE)

    starts = episodes(10, seed=1)
    history, truth = starts.windows(starts.episode_starts, 2, 8)
    policy = train_diffusion_policy(SMALL, episodes(40, seed=0), steps=500, seed=0, log_every=500)
    for name, model in (("trained", policy), ("untrained", _untrained())):
        for sampler in ("ddim", "ddpm"):
            chunks = model.sample_chunks(history, 32, sampler=sampler).numpy()  # [10, 32, 8, 2]
            vertical = chunks[..., 1]
            # Mean distance of the first action to the nearer of the two expert actions.
            error = float((np.abs(chunks[:, :, 0, 0] - truth[:, None, 0, 0])
                           + np.abs(np.abs(vertical[:, :, 0]) - 0.8)).mean() / 2)
            up_share = float((vertical[:, :, 0] > 0).mean())
            one_mode_per_chunk = float((np.sign(vertical) == np.sign(vertical[:, :, :1])).all(axis=-1).mean())
            outcome = (name, sampler, error, up_share, one_mode_per_chunk)
            if name == "trained":
                assert error < 0.2 and 0.3 < up_share < 0.7 and one_mode_per_chunk > 0.85, outcome
            else:
                assert error > 0.3 and one_mode_per_chunk < 0.5, outcome


# --------------------------------------------------------------------------------------------
# Acting step by step
# --------------------------------------------------------------------------------------------


def test_observation_history_pads_with_the_first_observation_after_a_reset() -> None:
    history = ObservationHistory(3)
    np.testing.assert_array_equal(history.push({"x": np.array([1.0])})["x"][:, 0], [1, 1, 1])
    np.testing.assert_array_equal(history.push({"x": np.array([2.0])})["x"][:, 0], [1, 1, 2])
    np.testing.assert_array_equal(history.push({"x": np.array([3.0])})["x"][:, 0], [1, 2, 3])
    np.testing.assert_array_equal(history.push({"x": np.array([4.0])})["x"][:, 0], [2, 3, 4])
    history.reset()
    np.testing.assert_array_equal(history.push({"x": np.array([5.0])})["x"][:, 0], [5, 5, 5])


def test_the_actor_drives_the_pybullet_reach_env_and_replans_every_action_steps() -> None:
    from actor.env import make_env
    from actor.rollout import record_episodes
    from policies.scripted import ScriptedExpert

    from conftest import configure

    config = configure("sim_panda_reach", cameras=())
    config = dataclasses.replace(config, env=dataclasses.replace(config.env, connection="inproc"))
    env = make_env(config)
    try:
        episodes, _ = record_episodes(env, ScriptedExpert(config.robot).act, 3, first_seed=0)
        bc = dataclasses.replace(SMALL, observation_keys=("tcp_pose", "task/goal_xyz"))
        policy = train_diffusion_policy(bc, load_demonstrations(episodes, observation_space=env.observation_space),
                                        steps=20, seed=0)
        actor = DiffusionActor(policy, action_steps=4)
        observation, _ = env.reset(seed=10)
        actor.reset()
        expected_plans, episode_step = 0, 0
        for _ in range(9):
            expected_plans += episode_step % 4 == 0  # a fresh chunk every 4 steps of an episode
            action = actor.act(observation)
            assert action.shape == (4,) and action.dtype == np.float32 and np.all(np.abs(action) <= 1.0)
            observation, _, terminated, truncated, _ = env.step(action)
            episode_step += 1
            if terminated or truncated:
                observation, _ = env.reset()
                actor.reset()
                episode_step = 0
        assert actor.plans == expected_plans >= 3
    finally:
        env.close()


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_train_bc_trains_on_a_demo_buffer_and_saves_a_loadable_policy(tmp_path, capsys) -> None:
    from tools.cli import main

    buffer = ReplayBuffer(POINT_SPACE, 2, capacity=200)
    for episode in _point_episodes(_reach_expert, 5, 8, seed=0):
        for step in episode:
            buffer.add(*step)
    buffer.save(tmp_path / "demos")
    config = tmp_path / "bc.yaml"
    config.write_text("horizon: 4\nn_obs: 2\naction_steps: 2\nhidden_dim: 32\nnum_blocks: 1\nbatch_size: 16\n")

    code = main(["train-bc", "--config", str(config), "--demos", str(tmp_path / "demos"), "--out",
                 str(tmp_path / "policy"), "--steps", "6", "--log-every", "3", "--device", "cpu"])
    output = capsys.readouterr().out
    assert code == 0, output
    assert "step 3/6  loss" in output and "step 6/6  loss" in output and "saved the diffusion policy" in output
    policy = load_policy(tmp_path / "policy")
    assert isinstance(policy, DiffusionPolicy) and policy.horizon == 4
    assert policy.info["demos"] == str(tmp_path / "demos") and policy.info["demo_episodes"] == 5
    assert policy.sample({"point": np.zeros((1, 2), np.float32)}, 2).shape == (1, 2, 2)

    config.write_text("horizon: 4\naction_steps: 5\n")
    assert main(["train-bc", "--config", str(config), "--demos", str(tmp_path / "demos"),
                 "--out", str(tmp_path / "other")]) == 2
    assert f"{config}: DiffusionPolicyConfig.action_steps" in capsys.readouterr().err
    assert main(["train-bc", "--demos", str(tmp_path / "missing"), "--out", str(tmp_path / "other"),
                 "--steps", "1"]) == 2
    assert "meta.json: missing" in capsys.readouterr().err
