"""V-GPS (policies/vgps.py): selection rules, the action mapping, observation routing, one base and
one critic call per step, random control, critics from agents and checkpoints, save/load."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch import nn

from hardware_configs.loader import to_dict
from hardware_configs.schema import SACConfig
from learner.sac import SACAgent
from policies.base import (
    Policy,
    PolicyInput,
    load_module_weights,
    load_policy,
    observations_to_tensors,
    read_policy_file,
    register_policy,
    save_module_weights,
    write_policy_file,
)
from policies.openvla import ActionMapping
from policies.vgps import QCritic, VGPSConfig, VGPSPolicy, load_critic
from transport.spaces import RobotSpaces

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Test doubles: a base that proposes known actions, a critic whose Q is known
# ---------------------------------------------------------------------------------------------


class KnownCandidates(Policy):
    """Proposes the same K actions (``candidates`` ``[K, A]``) for every observation. Reads an image
    and an instruction, as a VLA would; records every call."""

    def __init__(self, candidates: np.ndarray) -> None:
        self.candidates = torch.as_tensor(candidates, dtype=torch.float32)
        self.action_dim = self.candidates.shape[1]
        self.calls: list[tuple[int, bool, tuple[str, ...]]] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> "KnownCandidates":
        return self

    def sample(self, observations: PolicyInput, num_samples: int, deterministic: bool = False) -> torch.Tensor:
        self.calls.append((num_samples, deterministic, tuple(sorted(observations))))
        assert all(isinstance(text, str) for text in observations["instruction"])
        assert np.asarray(observations["image"]).dtype == np.uint8
        assert num_samples == len(self.candidates)
        return self.candidates[None].expand(len(observations["instruction"]), -1, -1).clone()

    def save(self, directory: str | Path) -> None:  # pragma: no cover - not saved in these tests
        raise NotImplementedError

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "KnownCandidates":  # pragma: no cover
        raise NotImplementedError


class DistanceCritic:
    """Q_i(s, a) = -|a - goal(s)|^2 + offsets[i]: known values. Reads the ``goal`` field only;
    records the observation keys and actions of every call."""

    observation_keys = ("goal",)

    def __init__(self, action_dim: int, offsets: tuple[float, ...] = (0.0, 0.0)) -> None:
        self.action_dim = action_dim
        self.offsets = torch.tensor(offsets)
        self.calls: list[tuple[tuple[str, ...], torch.Tensor]] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> "DistanceCritic":
        return self

    def q_values(self, observations: Mapping[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(sorted(observations)), actions.clone()))
        goal = observations["goal"].float()[:, None, :]
        q = -(actions - goal).square().sum(-1)
        return q[None] + self.offsets[:, None, None]


def observations(goals: np.ndarray) -> dict[str, Any]:
    batch = len(goals)
    return {
        "image": np.zeros((batch, 8, 8, 3), np.uint8),
        "instruction": ["put the cube in the bowl"] * batch,
        "goal": np.asarray(goals, np.float32),
    }


CANDIDATES_2D = np.array([[0.0, 0.0], [0.5, 0.5], [-0.5, 0.2], [0.9, -0.9]], np.float32)


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------


def test_argmax_picks_the_candidate_the_critic_values_most_per_observation() -> None:
    base, critic = KnownCandidates(CANDIDATES_2D), DistanceCritic(2)
    goals = np.array([[0.45, 0.55], [-0.4, 0.1], [1.0, -1.0], [0.05, -0.05]], np.float32)
    policy = VGPSPolicy(base, critic, VGPSConfig(num_samples=4, temperature=0.0))
    step = policy.steer(observations(goals), num_samples=3)
    assert step.indices.tolist() == [[1] * 3, [2] * 3, [3] * 3, [0] * 3]
    assert torch.equal(step.actions, torch.as_tensor(CANDIDATES_2D)[[1, 2, 3, 0]][:, None].expand(-1, 3, -1))
    expected_scores = -((torch.as_tensor(CANDIDATES_2D)[None] - torch.as_tensor(goals)[:, None]) ** 2).sum(-1)
    assert torch.allclose(step.scores, expected_scores)

    # the routing: the base saw every field (and the strings), the critic only its own
    assert base.calls == [(4, False, ("goal", "image", "instruction"))]
    assert [keys for keys, _ in critic.calls] == [("goal",)]

    # deterministic=True is the argmax whatever beta; act() gives one action of the base
    hot = VGPSPolicy(KnownCandidates(CANDIDATES_2D), DistanceCritic(2), VGPSConfig(num_samples=4, temperature=5.0))
    assert hot.steer(observations(goals), 2, deterministic=True).indices.tolist() == [[1, 1], [2, 2], [3, 3], [0, 0]]
    single = {key: value[0] for key, value in observations(goals[:1]).items()}
    np.testing.assert_array_equal(policy.act(single), CANDIDATES_2D[1])


def test_softmax_frequencies_match_exp_q_over_beta() -> None:
    # Q = -|a - 0|^2 = [0, -0.5, -0.29, -1.62]; P(k) = exp(Q_k / beta) / Z
    goals = np.zeros((500, 2), np.float32)
    q = -(CANDIDATES_2D ** 2).sum(-1)
    for beta in (0.25, 1.0):
        policy = VGPSPolicy(KnownCandidates(CANDIDATES_2D), DistanceCritic(2),
                            VGPSConfig(num_samples=4, temperature=beta, seed=1))
        indices = policy.steer(observations(goals), num_samples=40).indices  # 20,000 draws
        frequencies = np.bincount(indices.reshape(-1).numpy(), minlength=4) / indices.numel()
        expected = np.exp(q / beta) / np.exp(q / beta).sum()
        print(f"beta {beta}: frequencies {np.round(frequencies, 4)}, exp(Q/beta)/Z {np.round(expected, 4)}")
        np.testing.assert_allclose(frequencies, expected, atol=0.012)  # > 3.5 standard errors


def test_the_ensemble_reduction_is_min_or_mean() -> None:
    class Disagreeing(DistanceCritic):
        def q_values(self, observations, actions):  # member 1 adds a big bonus to candidate 3 only
            q = super().q_values(observations, actions)
            q[1, :, 3] += 10.0
            return q

    goals = np.zeros((2, 2), np.float32)  # member 0 prefers candidate 0 (Q 0 vs 3's -1.62)
    for reduction, chosen in (("min", 0), ("mean", 3)):
        policy = VGPSPolicy(KnownCandidates(CANDIDATES_2D), Disagreeing(2),
                            VGPSConfig(num_samples=4, temperature=0.0, critic_reduction=reduction))
        assert policy.steer(observations(goals)).indices.tolist() == [[chosen], [chosen]]


def test_the_mapping_feeds_the_critic_and_the_base_action_is_returned() -> None:
    # base: 3-D actions; critic: 2-D, c = ((a[2] - 0.1) / 0.5, a[0] / 2)
    mapping = ActionMapping(source_dims=(2, 0), scales=(0.5, 2.0), offsets=(0.1, 0.0), raw_dim=3)
    raw = np.array([[0.9, 0.0, 0.1], [0.0, 0.0, 0.6], [0.2, 0.9, 0.35]], np.float32)
    mapped = np.array([[0.0, 0.45], [1.0, 0.0], [0.5, 0.1]], np.float32)
    base, critic = KnownCandidates(raw), DistanceCritic(2)
    policy = VGPSPolicy(base, critic, VGPSConfig(num_samples=3, temperature=0.0, mapping=mapping))
    step = policy.steer(observations(np.array([[0.5, 0.1], [0.0, 0.45]], np.float32)))
    (_, seen), = critic.calls
    np.testing.assert_allclose(seen.numpy(), np.broadcast_to(mapped, (2, 3, 2)), atol=1e-6)  # scored after mapping
    assert step.indices.tolist() == [[2], [0]]
    np.testing.assert_array_equal(step.actions[:, 0].numpy(), raw[[2, 0]])  # the base's own actions come back
    # Without the mapping the raw actions (3-D) cannot be scored by this critic at all
    with pytest.raises(ValueError, match="mapping"):
        VGPSPolicy(KnownCandidates(raw), DistanceCritic(2), VGPSConfig(num_samples=3))
    with pytest.raises(ValueError, match="raw_dim"):
        VGPSPolicy(KnownCandidates(CANDIDATES_2D), DistanceCritic(2), VGPSConfig(num_samples=4, mapping=mapping))


def test_random_control_is_uniform_and_never_asks_the_critic() -> None:
    base, critic = KnownCandidates(CANDIDATES_2D), DistanceCritic(2)
    policy = VGPSPolicy(base, critic, VGPSConfig(num_samples=4, temperature=0.0, random_control=True, seed=3))
    step = policy.steer(observations(np.zeros((500, 2), np.float32)), num_samples=40)
    frequencies = np.bincount(step.indices.reshape(-1).numpy(), minlength=4) / step.indices.numel()
    np.testing.assert_allclose(frequencies, 0.25, atol=0.012)
    assert step.scores is None and critic.calls == [] and len(base.calls) == 1
    assert torch.equal(step.actions, torch.as_tensor(CANDIDATES_2D)[step.indices])
    assert policy.steer(observations(np.zeros((3, 2), np.float32)), 2, deterministic=True).indices.eq(0).all()


# ---------------------------------------------------------------------------------------------
# Real critics: one call per step, from agents and checkpoints, save/load
# ---------------------------------------------------------------------------------------------

STATE_SPACE = spaces.Dict({
    "goal": spaces.Box(-1.0, 1.0, (2,), np.float32),
    "position": spaces.Box(-1.0, 1.0, (2,), np.float32),
})
ACTIONS = spaces.Box(-1.0, 1.0, (2,), np.float32)
SMALL = SACConfig(hidden_dims=(16, 16), batch_size=8, num_critics=3, critic_subset=2)


@register_policy("vgps_test_linear")
class LinearBase(Policy):
    """A saveable base policy for the round trip: tanh(W [position] + b + 0.3 noise), seeded."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.module = nn.Linear(2, 2)
        self.seed = seed
        self.action_dim = 2
        self.calls = 0
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    def to(self, device: torch.device | str) -> "LinearBase":
        self.module.to(device)
        return self

    def sample(self, observations: PolicyInput, num_samples: int, deterministic: bool = False) -> torch.Tensor:
        self.calls += 1
        position = observations_to_tensors(observations, ("position",), self.device)["position"]
        with torch.no_grad():
            mean = self.module(position)[:, None].expand(-1, num_samples, -1)
            noise = torch.randn(mean.shape, generator=self._generator)
            return torch.tanh(mean if deterministic else mean + 0.3 * noise)

    def save(self, directory: str | Path) -> None:
        save_module_weights(self.module, write_policy_file(directory, self.kind, seed=self.seed))

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "LinearBase":
        policy = cls(int(read_policy_file(directory)["seed"]))
        load_module_weights(policy.module, directory)
        return policy.to(device)


def trained_agent(updates: int = 3) -> SACAgent:
    agent = SACAgent(SMALL, STATE_SPACE, ACTIONS, seed=0)
    rng = np.random.default_rng(0)

    def fields(rows: int) -> dict[str, np.ndarray]:
        return {key: rng.uniform(-1, 1, (rows, 2)).astype(np.float32) for key in ("goal", "position")}

    agent.fit_state_normalization([fields(64)])
    for _ in range(updates):
        agent.update(SimpleNamespace(observations=fields(8), next_observations=fields(8),
                                     actions=rng.uniform(-1, 1, (8, 2)).astype(np.float32),
                                     rewards=rng.normal(size=8).astype(np.float32), terminated=np.zeros(8, np.float32),
                                     intervened=np.zeros(8, bool)))
    return agent


def state_batch(rows: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: rng.uniform(-1, 1, (rows, 2)).astype(np.float32) for key in ("goal", "position")}


def test_one_base_call_and_one_critic_forward_for_all_candidates() -> None:
    agent = trained_agent()
    critic = QCritic.from_agent(agent)
    forwards = {"critic": 0, "encoder": 0}
    critic.critic.register_forward_hook(lambda *args: forwards.__setitem__("critic", forwards["critic"] + 1))
    critic.encoder.register_forward_hook(lambda *args: forwards.__setitem__("encoder", forwards["encoder"] + 1))
    base = LinearBase()
    policy = VGPSPolicy(base, critic, VGPSConfig(num_samples=7, temperature=0.5))
    batch = state_batch(5)
    step = policy.steer(batch, num_samples=3)
    assert (base.calls, forwards["critic"], forwards["encoder"]) == (1, 1, 1)
    assert step.candidates.shape == (5, 7, 2) and step.actions.shape == (5, 3, 2) and step.scores.shape == (5, 7)

    # the scores are the min over the target ensemble, as the agent's own target critic computes them
    with torch.no_grad():
        tensors = {k: torch.as_tensor(v) for k, v in batch.items()}
        features = agent.target_encoder(tensors).repeat_interleave(7, dim=0)
        direct = agent.target_critic(features, step.candidates.reshape(35, 2)).reshape(3, 5, 7).min(dim=0).values
    assert torch.allclose(step.scores, direct, atol=1e-6)
    assert policy.sample(batch, 2).shape == (5, 2, 2) and base.calls == 2 and forwards["critic"] == 2


def test_save_load_round_trip_and_a_policy_json_pointing_at_a_checkpoint(tmp_path: Path) -> None:
    from learner.learner import save_agent  # (importing policies.vgps above registered "vgps")

    agent = trained_agent()
    config = VGPSConfig(num_samples=6, temperature=0.3, critic_reduction="mean", seed=4,
                        mapping=ActionMapping(source_dims=(1, 0), scales=(1.0, 1.0), offsets=(0.0, 0.0), raw_dim=2))
    policy = VGPSPolicy(LinearBase(seed=2), QCritic.from_agent(agent), config)
    policy.save(tmp_path / "steered")
    assert json.loads((tmp_path / "steered" / "policy.json").read_text())["kind"] == "vgps"
    loaded = load_policy(tmp_path / "steered")
    assert isinstance(loaded, VGPSPolicy) and loaded.config == config
    fresh = VGPSPolicy(LinearBase(seed=2), QCritic.from_agent(agent), config)  # same state as the saved one
    batch = state_batch(4)
    original, again = fresh.steer(batch, 5), loaded.steer(batch, 5)
    assert torch.equal(original.candidates, again.candidates)
    assert torch.allclose(original.scores, again.scores) and torch.equal(original.indices, again.indices)

    # A hand-written policy.json may point at an existing base directory and a learner checkpoint.
    checkpoint = tmp_path / "run" / "checkpoints" / "ckpt-000000003"
    checkpoint.mkdir(parents=True)
    save_agent(agent, checkpoint)
    (checkpoint / "learner.json").write_text(json.dumps({
        "spaces": RobotSpaces.from_gym(STATE_SPACE, ACTIONS).to_json(), "observation_keys": [], "sac": to_dict(SMALL)}))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("ckpt-000000003")
    write_policy_file(tmp_path / "pointing", "vgps", config=config.to_dict(), base=str(tmp_path / "steered" / "base"),
                      critic=str(tmp_path / "run"))
    pointing = load_policy(tmp_path / "pointing")
    reference = VGPSPolicy(LinearBase(seed=2), QCritic.from_agent(agent), config)
    assert torch.allclose(pointing.steer(batch, 5).scores, reference.steer(batch, 5).scores)

    # target (default) and online critics of a checkpoint are the agent's own
    tensors = {k: torch.as_tensor(v) for k, v in batch.items()}
    actions = torch.rand(4, 3, 2) * 2 - 1
    for network, (encoder, ensemble) in (("target", (agent.target_encoder, agent.target_critic)),
                                         ("online", (agent.encoder, agent.critic))):
        critic = load_critic(tmp_path / "run", network=network)
        with torch.no_grad():
            direct = ensemble(encoder(tensors).repeat_interleave(3, dim=0), actions.reshape(12, 2)).reshape(3, 4, 3)
        assert torch.allclose(critic.q_values(tensors, actions), direct, atol=1e-6)
    assert not torch.allclose(load_critic(tmp_path / "run", network="online").q_values(tensors, actions),
                              load_critic(tmp_path / "run").q_values(tensors, actions))


def test_config_errors_name_the_field() -> None:
    for field, value in (("num_samples", 0), ("temperature", -1.0), ("temperature", float("nan")),
                         ("critic_reduction", "max"), ("random_control", "yes"), ("seed", 1.5)):
        with pytest.raises(ValueError, match=f"VGPSConfig.{field}"):
            VGPSConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown VGPSConfig field.*beta"):
        VGPSConfig.from_dict({"beta": 1.0}, "policy.json: config")
    with pytest.raises(ValueError, match="policy.json: config: VGPSConfig.num_samples"):
        VGPSConfig.from_dict({"num_samples": -3}, "policy.json: config")
    mapping = {"source_dims": [0], "scales": [2.0], "offsets": [0.0], "raw_dim": 2}
    config = VGPSConfig.from_dict({"num_samples": 3, "mapping": mapping})
    assert isinstance(config.mapping, ActionMapping) and VGPSConfig.from_dict(config.to_dict()) == config
