"""Cal-QL (learner/calql.py): returns-to-go, the calibrated conservative regulariser, offline
learning against plain SAC, checkpoints that load into SACAgent, the config and the command line."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from gymnasium import spaces

from hardware_configs.loader import ConfigError, load_dataclass
from hardware_configs.schema import GripperCriticConfig, SACConfig
from learner.calql import (
    CalQLAgent,
    CalQLConfig,
    ReturnBatch,
    ReturnSampler,
    buffer_returns_to_go,
    main,
    returns_to_go,
    save_offline_checkpoint,
    train_offline,
)
from learner.replay import Batch, ReplayBuffer
from learner.sac import SACAgent
from policies.base import Policy
from policies.gaussian import GRIPPER_CLOSE, GRIPPER_OPEN, GRIPPER_STAY
from policies.vgps import QCritic, VGPSConfig, VGPSPolicy

torch.set_num_threads(1)

SMALL_SAC = SACConfig(hidden_dims=(32, 32), batch_size=16, discount=0.9)


# ---------------------------------------------------------------------------------------------
# Monte-Carlo returns-to-go
# ---------------------------------------------------------------------------------------------


def test_returns_to_go_by_hand() -> None:
    # terminated: the plain discounted sum, whatever the truncation rule
    for rule in ("zero", "repeat_last"):
        np.testing.assert_allclose(returns_to_go([0, 0, 1], 0.9, True, truncation=rule), [0.81, 0.9, 1.0], rtol=1e-6)
    # truncated, finite horizon: nothing after the last step
    np.testing.assert_allclose(returns_to_go([1, 0, 2], 0.9, False), [1 + 0.9 * 1.8, 1.8, 2.0], rtol=1e-6)
    # truncated, the last reward forever: G_2 = 2 + 0.9 * 2 / 0.1 = 20, G_1 = 18, G_0 = 1 + 0.9 * 18
    np.testing.assert_allclose(returns_to_go([1, 0, 2], 0.9, False, truncation="repeat_last"), [17.2, 18.0, 20.0],
                               rtol=1e-6)
    # a sparse-reward failure: r_fail / (1 - gamma) everywhere, terminated or not
    for terminated in (True, False):
        np.testing.assert_allclose(returns_to_go([-1, -1, -1], 0.9, terminated, failure_reward=-1.0), [-10.0] * 3)
    # one success step: not a failure episode, the usual sum
    np.testing.assert_allclose(returns_to_go([-1, -1, 0], 0.9, True, failure_reward=-1.0), [-1.9, -1.0, 0.0], rtol=1e-6)
    assert returns_to_go([], 0.9, True).shape == (0,)
    with pytest.raises(ValueError, match="truncation"):
        returns_to_go([1.0], 0.9, False, truncation="bootstrap")


STATE = spaces.Dict({"x": spaces.Box(-10.0, 10.0, (1,), np.float32)})


def episode_steps(stream: int, start: float, rewards: list[float], end: str, ids: list[int]) -> list[tuple]:
    """``ReplayBuffer.add`` arguments of one episode (states start, start + 1, ...; ``end``:
    terminated, truncated or open). ``action[0] = id / 100`` finds a row again in a batch."""
    steps = []
    for t, (reward, identifier) in enumerate(zip(rewards, ids)):
        last = t == len(rewards) - 1
        steps.append(({"x": np.array([start + t], np.float32)}, np.array([identifier / 100.0], np.float32), reward,
                      {"x": np.array([start + t + 1], np.float32)}, last and end == "terminated",
                      last and end == "truncated", stream))
    return steps


def fill(buffer: ReplayBuffer, *streams: list[tuple]) -> ReplayBuffer:
    """Add the streams' steps interleaved, as several actors would send them."""
    for index in range(max(len(steps) for steps in streams)):
        for steps in streams:
            if index < len(steps):
                *fields, stream = steps[index]
                buffer.add(*fields, stream_id=stream)
    return buffer


def row_ids(actions: np.ndarray) -> np.ndarray:
    return np.rint(actions[:, 0] * 100).astype(int)


def test_buffer_returns_follow_episodes_of_interleaved_streams_and_come_with_each_sampled_row() -> None:
    # stream 0: A terminated, then B truncated; stream 1: C cut off (the next step starts elsewhere:
    # a reset the buffer never heard of), then D still running.
    stream0 = (episode_steps(0, 0.0, [0.0, 0.0, 1.0], "terminated", [1, 2, 3])
               + episode_steps(0, 5.0, [1.0, 2.0], "truncated", [4, 5]))
    stream1 = (episode_steps(1, -5.0, [1.0, 1.0, 1.0], "open", [6, 7, 8])
               + episode_steps(1, 3.0, [0.5, 0.5], "open", [9, 10]))
    buffer = fill(ReplayBuffer(STATE, 1, capacity=64, seed=0), stream0, stream1)
    expected = {1: 0.81, 2: 0.9, 3: 1.0, 4: 2.8, 5: 2.0, 6: 2.71, 7: 1.9, 8: 1.0, 9: 0.95, 10: 0.5}

    returns = buffer_returns_to_go(buffer, 0.9)
    counts = (returns.episodes, returns.terminated_episodes, returns.truncated_episodes, returns.open_episodes)
    assert counts == (4, 1, 1, 2)
    table = buffer.transition_table()
    for row, identifier in enumerate(row_ids(table["actions"])):
        assert returns.values[row] == pytest.approx(expected[identifier], rel=1e-6), identifier

    # sample_with_rows: the rows index the transition table, and the batch is sample()'s
    batch, rows = buffer.sample_with_rows(32)
    np.testing.assert_array_equal(batch.actions, table["actions"][rows])
    np.testing.assert_array_equal(batch.rewards, table["rewards"][rows])
    twin = fill(ReplayBuffer(STATE, 1, capacity=64, seed=0), stream0, stream1)
    np.testing.assert_array_equal(twin.sample(32).actions, batch.actions)

    # the sampler hands each row its own return, from both buffers
    other = fill(ReplayBuffer(STATE, 1, capacity=64, seed=1), episode_steps(0, 0.0, [2.0, 2.0], "terminated", [11, 12]))
    expected.update({11: 3.8, 12: 2.0})
    sampler = ReturnSampler.from_buffers([buffer, other], 0.9, seed=0)
    sampled = sampler.sample(batch_size=50, minibatches=2)
    assert isinstance(sampled, ReturnBatch) and len(sampled) == 100 and sampled.mc_returns.shape == (100,)
    sampled_ids = row_ids(sampled.actions)
    np.testing.assert_allclose(sampled.mc_returns, [expected[i] for i in sampled_ids], rtol=1e-6)
    assert {11, 12} & set(sampled_ids.tolist()) and set(range(1, 11)) & set(sampled_ids.tolist())

    # a buffer that changed since its returns were computed is refused
    buffer.add({"x": np.zeros(1, np.float32)}, np.zeros(1, np.float32), 0.0, {"x": np.ones(1, np.float32)},
               True, False)
    with pytest.raises(ValueError, match="compute them again"):
        sampler.sample(8)


# ---------------------------------------------------------------------------------------------
# The calibrated regulariser
# ---------------------------------------------------------------------------------------------


def point_batch(rows: int, mc_returns: np.ndarray, seed: int = 0) -> ReturnBatch:
    rng = np.random.default_rng(seed)
    return ReturnBatch(
        observations={"x": rng.uniform(-1, 1, (rows, 1)).astype(np.float32)},
        actions=rng.uniform(-1, 1, (rows, 2)).astype(np.float32),
        rewards=np.zeros(rows, np.float32),
        next_observations={"x": rng.uniform(-1, 1, (rows, 1)).astype(np.float32)},
        terminated=np.zeros(rows, np.float32),
        intervened=np.zeros(rows, bool),
        mc_returns=mc_returns.astype(np.float32),
    )


POINT = spaces.Dict({"x": spaces.Box(-1.0, 1.0, (1,), np.float32)})
ACTION_2D = spaces.Box(-1.0, 1.0, (2,), np.float32)


def test_calibration_lower_bounds_the_policy_action_values_by_the_mc_return() -> None:
    # Half the rows have a return far above the fresh critic's values (|Q| << 1), half far below.
    mc = np.where(np.arange(32) % 2 == 0, 3.0, -100.0)
    batch = point_batch(32, mc)
    terms = {}
    for calibrated in (True, False):
        agent = CalQLAgent(CalQLConfig(sac=SMALL_SAC, calibrated=calibrated, num_action_samples=6), POINT, ACTION_2D,
                           seed=0)
        terms[calibrated] = agent.conservative_terms(batch)
    high = torch.as_tensor(mc > 0)
    bound = torch.as_tensor(mc, dtype=torch.float32).reshape(1, -1, 1)

    cal = terms[True]
    assert cal.q_policy.shape == cal.q_next_policy.shape == cal.q_random.shape == (2, 32, 6)
    for bounded, raw in ((cal.q_policy, cal.q_policy_raw), (cal.q_next_policy, cal.q_next_policy_raw)):
        assert torch.all(bounded >= bound)  # never below the MC return
        assert torch.all(bounded[:, high] == 3.0) and torch.all(raw[:, high] < 3.0)  # active where Q < G(s)
        assert torch.equal(bounded[:, ~high], raw[:, ~high])  # inactive where Q > G(s)
    assert cal.bound_rate.item() == pytest.approx(0.5)

    plain = terms[False]
    assert torch.equal(plain.q_policy_raw, cal.q_policy_raw)  # same seed: same networks and draws
    assert torch.all(plain.q_policy[:, high] < 3.0) and torch.equal(plain.q_policy, plain.q_policy_raw)
    # the bound raises the policy terms inside the logsumexp, so the calibrated estimate is larger
    assert torch.all(cal.ood_value[:, high] > plain.ood_value[:, high] + 1.0)
    assert torch.allclose(cal.ood_value[:, ~high], plain.ood_value[:, ~high])


def test_plain_cql_needs_no_returns_but_cal_ql_does() -> None:
    batch = point_batch(16, np.zeros(16))
    bare = Batch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)})  # no mc_returns
    plain = CalQLAgent(CalQLConfig(sac=SMALL_SAC, calibrated=False), POINT, ACTION_2D, seed=0)
    metrics = plain.update(bare)
    assert math.isfinite(metrics["cql_regularizer"]) and metrics["calql_bound_rate"] == 0.0
    calibrated = CalQLAgent(CalQLConfig(sac=SMALL_SAC), POINT, ACTION_2D, seed=0)
    with pytest.raises(ValueError, match="mc_returns"):
        calibrated.update(bare)


# ---------------------------------------------------------------------------------------------
# Offline learning: a 1-D point with 2-D actions, data a 50/50 mix of a good and a bad action
# ---------------------------------------------------------------------------------------------

GOOD = np.array([0.5, 0.0], np.float32)
BAD = np.array([-0.5, 0.0], np.float32)
FAR = np.array([[0, 1], [0, -1], [1, 1], [-1, -1], [1, -1], [-1, 1]], np.float32)  # never in the data


def point_reward(action: np.ndarray) -> float:
    """0 for the good action, -1 for the bad one; every reward is <= 0, so every true Q-value is too."""
    return float(-(action[..., 0] - 0.5) ** 2 - action[..., 1] ** 2)


def point_dataset(episodes: int = 100, length: int = 10, seed: int = 0) -> ReplayBuffer:
    rng = np.random.default_rng(seed)
    buffer = ReplayBuffer(POINT, 2, capacity=2 * episodes * length, seed=seed)
    for _ in range(episodes):
        x = rng.uniform(-1, 1, 1).astype(np.float32)
        for t in range(length):
            action = (GOOD if rng.uniform() < 0.5 else BAD) + rng.normal(0.0, 0.05, 2).astype(np.float32)
            action = np.clip(action, -1, 1).astype(np.float32)
            next_x = np.clip(x + 0.1 * action[:1], -1, 1).astype(np.float32)
            buffer.add({"x": x}, action, point_reward(action), {"x": next_x}, False, t == length - 1)
            x = next_x
    return buffer


def mean_q(agent: SACAgent, states: np.ndarray, action: np.ndarray) -> float:
    with torch.no_grad():
        features = agent.encoder({"x": torch.as_tensor(states)})
        return agent.critic(features, torch.as_tensor(np.repeat(action[None], len(states), 0))).mean().item()


def test_calql_ranks_data_actions_and_is_conservative_where_sac_overestimates() -> None:
    buffer = point_dataset()
    sac = SACConfig(hidden_dims=(64, 64), batch_size=64, discount=0.9, init_temperature=1.0,
                    actor_lr=1e-3, critic_lr=1e-3, temperature_lr=1e-3)
    steps = 300
    calql = train_offline(CalQLConfig(sac=sac, alpha_cql=5.0, num_action_samples=10), buffer, steps, seed=0,
                          log_every=steps)
    plain = SACAgent(sac, POINT, ACTION_2D, seed=0)  # the same networks and data, no regulariser
    plain.fit_state_normalization([buffer.observations()])
    sampler = ReturnSampler.from_buffers([buffer], sac.discount, seed=0)
    for _ in range(steps):
        plain.update(sampler.sample(sac.batch_size))

    states = np.linspace(-0.9, 0.9, 32, dtype=np.float32)[:, None]
    # True values: the good action forever is worth 0, so Q*(s, a) = r(a) for every action.
    true_far = np.array([point_reward(a) for a in FAR])
    measured = {}
    for name, agent in (("calql", calql), ("sac", plain)):
        good, bad = mean_q(agent, states, GOOD), mean_q(agent, states, BAD)
        far = np.array([mean_q(agent, states, a) for a in FAR])
        measured[name] = (good, bad, far)
        print(f"{name}: Q good {good:.2f}, bad {bad:.2f}, far {np.round(far, 2)} (true {np.round(true_far, 2)})")
    good, bad, far = measured["calql"]
    assert good > bad + 0.3  # true gap 1
    assert far.max() < min(good, bad) - 2.0  # conservative off the data
    assert np.all(far < true_far)  # below the truth there
    sac_good, sac_bad, sac_far = measured["sac"]
    assert sac_far.max() > 0.0  # above any achievable value
    # SAC's far-off values sit much closer to (or above) its data values than Cal-QL's do
    assert (sac_far.mean() - (sac_good + sac_bad) / 2) > (far.mean() - (good + bad) / 2) + 3.0

    # As the V-GPS critic (its target networks): among the good, the bad and the far actions it
    # picks the good one at every state.
    class Proposals(Policy):
        action_dim = 2
        device = torch.device("cpu")
        candidates = torch.as_tensor(np.concatenate([GOOD[None], BAD[None], FAR]))

        def sample(self, observations, num_samples, deterministic=False):
            return self.candidates[None].expand(len(observations["x"]), -1, -1)

        def to(self, device):
            return self

        def save(self, directory):  # pragma: no cover
            raise NotImplementedError

        @classmethod
        def load(cls, directory, device="cpu"):  # pragma: no cover
            raise NotImplementedError

    steered = VGPSPolicy(Proposals(), QCritic.from_agent(calql), VGPSConfig(num_samples=8, temperature=0.0))
    assert steered.steer({"x": states}).indices.eq(0).all()


def test_the_gripper_critic_is_conservative_about_classes_the_data_never_took() -> None:
    """Offline data that always keeps the gripper open (class "stay" on an open gripper) at a cost of
    -1 a step: a plain double-DQN gripper head leaves "close" near its initial value, far above the
    data's; Cal-QL's term pushes both unseen classes below the data's class."""
    space = spaces.Dict({"x": spaces.Box(-1, 1, (1,), np.float32),
                         "gripper_width": spaces.Box(0.0, 0.1, (1,), np.float32)})
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(space, 2, capacity=1000, seed=0)
    for _ in range(50):
        x = rng.uniform(-1, 1, 1).astype(np.float32)
        for t in range(10):
            action = np.array([rng.uniform(-1, 1), -1.0], np.float32)
            next_x = np.clip(x + 0.1 * action[:1], -1, 1).astype(np.float32)
            open_width = np.array([0.08], np.float32)
            buffer.add({"x": x, "gripper_width": open_width}, action, -1.0,
                       {"x": next_x, "gripper_width": open_width}, False, t == 9)
            x = next_x
    sac = SACConfig(hidden_dims=(32, 32), batch_size=64, discount=0.8, critic_lr=3e-3,
                    gripper_critic=GripperCriticConfig(enabled=True, toggle_penalty=0.0))
    states = {"x": torch.linspace(-0.9, 0.9, 16)[:, None],
              "gripper_width": torch.full((16, 1), 0.08)}

    def gripper_values(alpha_cql: float) -> np.ndarray:
        agent = train_offline(CalQLConfig(sac=sac, alpha_cql=alpha_cql, num_action_samples=2), buffer, 400,
                              seed=0, log_every=400)
        with torch.no_grad():
            return agent.policy.gripper_head(agent.encoder(states)).mean(dim=0).numpy()  # open, stay, close

    plain, conservative = gripper_values(0.0), gripper_values(5.0)
    assert plain[GRIPPER_STAY] < -0.5  # the data's class learns its cost (true value -1 / (1 - 0.8) = -5)
    assert plain[GRIPPER_CLOSE] > plain[GRIPPER_STAY] + 0.5  # unseen and over-estimated: greedy would close
    assert conservative[GRIPPER_CLOSE] < conservative[GRIPPER_STAY] - 1.0
    assert conservative[GRIPPER_OPEN] < conservative[GRIPPER_STAY] - 1.0
    assert conservative.argmax() == GRIPPER_STAY


# ---------------------------------------------------------------------------------------------
# Checkpoints, config, command line
# ---------------------------------------------------------------------------------------------


def test_calql_checkpoint_loads_into_a_plain_sac_agent(tmp_path: Path) -> None:
    from learner.learner import latest_checkpoint, load_agent

    buffer = point_dataset(episodes=6, length=5)
    config = CalQLConfig(sac=SMALL_SAC, bc_weight=0.5, num_action_samples=4)
    seen = []
    agent = train_offline(config, buffer, steps=4, seed=3, log_every=2, progress=lambda step, m: seen.append((step, m)))
    assert [step for step, _ in seen] == [2, 4]
    assert {"cql_regularizer", "calql_bound_rate", "bc_loss", "critic_loss", "actor_loss"} <= set(seen[-1][1])

    batch = point_batch(8, np.zeros(8))
    sac = SACAgent(SMALL_SAC, POINT, ACTION_2D, seed=99)
    sac.load_checkpoint(agent.checkpoint_tensors(), agent.checkpoint_meta())
    assert sac.update_count == agent.update_count == 4 and sac.state_normalized
    with torch.no_grad():
        observations = {"x": torch.as_tensor(batch.observations["x"])}
        actions = torch.as_tensor(batch.actions)
        assert torch.equal(sac.critic(sac.encoder(observations), actions),
                           agent.critic(agent.encoder(observations), actions))
        assert torch.equal(sac.target_critic(sac.target_encoder(observations), actions),
                           agent.target_critic(agent.target_encoder(observations), actions))
        assert torch.equal(sac.policy(observations, deterministic=True)[0],
                           agent.policy(observations, deterministic=True)[0])
    assert sac.temperature == agent.temperature
    sac.update(batch)  # the online learner carries on from it

    run = save_offline_checkpoint(agent, tmp_path / "run", extra={"note": "test"})
    assert latest_checkpoint(tmp_path / "run") == run
    from_disk = SACAgent(SMALL_SAC, POINT, ACTION_2D, seed=5)
    load_agent(from_disk, run)
    with torch.no_grad():
        assert torch.equal(from_disk.critic(from_disk.encoder(observations), actions),
                           agent.critic(agent.encoder(observations), actions))


def test_config_errors_name_the_field() -> None:
    for field, value in (("alpha_cql", -1.0), ("num_action_samples", 0), ("cql_temperature", 0.0),
                         ("bc_weight", float("nan")), ("offline_steps", 0), ("mc_truncation", "bootstrap"),
                         ("mc_failure_reward", float("inf")), ("calibrated", 1)):
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(CalQLConfig(), **{field: value}).validate()
    with pytest.raises(ConfigError, match="num_action_samples"):
        load_dataclass(CalQLConfig, {"num_action_samples": "ten"}, "calql.yaml")
    with pytest.raises(ConfigError, match="alpha_cq"):
        load_dataclass(CalQLConfig, {"alpha_cq": 5.0}, "calql.yaml")
    with pytest.raises(ConfigError, match="sac: discount"):
        load_dataclass(CalQLConfig, {"sac": {"discount": 1.5}}, "calql.yaml")
    loaded = load_dataclass(CalQLConfig, {"alpha_cql": 2, "calibrated": False, "sac": {"hidden_dims": [8]}})
    assert loaded.alpha_cql == 2 and not loaded.calibrated and loaded.sac.hidden_dims == (8,)


def test_main_trains_from_saved_buffers_and_writes_a_checkpoint_sac_loads(tmp_path: Path, capsys) -> None:
    from learner.learner import latest_checkpoint, load_agent

    point_dataset(episodes=6, length=5).save(tmp_path / "demos")
    config_file = tmp_path / "calql.yaml"
    config_file.write_text(yaml.safe_dump({"sac": {"hidden_dims": [16], "batch_size": 8}, "num_action_samples": 3}))
    assert main(["--data", str(tmp_path / "demos"), "--out", str(tmp_path / "run"), "--config", str(config_file),
                 "--steps", "3", "--log-every", "1", "--device", "cpu"]) == 0
    output = capsys.readouterr().out
    assert "step 3/3" in output and "saved the Cal-QL agent" in output
    checkpoint = latest_checkpoint(tmp_path / "run")
    agent = SACAgent(SACConfig(hidden_dims=(16,), batch_size=8), POINT, ACTION_2D)
    load_agent(agent, checkpoint)
    assert agent.update_count == 3

    config_file.write_text(yaml.safe_dump({"alpha_cql": -2.0}))
    assert main(["--data", str(tmp_path / "demos"), "--out", str(tmp_path / "bad"), "--config", str(config_file)]) == 2
    assert "alpha_cql" in capsys.readouterr().err
    config_file.write_text(yaml.safe_dump({"sac": {"hidden_dims": [16]}}))
    assert main(["--data", str(tmp_path / "demos"), "--out", str(tmp_path / "bad"), "--config", str(config_file),
                 "--session", "sim_panda_reach"]) == 2
    assert "both --config and --session" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "bad")]) == 2
    assert "missing" in capsys.readouterr().err
