"""PA-RL (learner/parl.py): the action optimisation on a critic with a known maximum, the TD target
with optimised next actions, distillation into a diffusion policy, acting, save/load, and one full
PA-RL iteration with a tiny OpenVLA-shaped model (tests/tiny_vla.py) trained through LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch import nn

from hardware_configs.loader import ConfigError
from hardware_configs.schema import GripperCriticConfig, SACConfig
from learner.parl import (
    EnsembleCritic,
    PARLActingPolicy,
    PARLAgent,
    PARLConfig,
    Distiller,
    has_lora,
    load_parl_config,
    optimize_actions,
    reduce_ensemble,
)
from learner.replay import Batch
from learner.sac import SACAgent, TorchBatch
from policies.base import Policy, PolicyInput, load_policy
from policies.diffusion import DiffusionPolicy, DiffusionPolicyConfig
from policies.openvla import OpenVLAConfig, OpenVLAPolicy
from policies.vgps import QCritic

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Test doubles: base policies with known samples, a critic with a known maximum
# ---------------------------------------------------------------------------------------------


class GaussianProposals(Policy):
    """Samples ``clip(center + sigma * noise)`` from its own seeded generator; keeps the last draw."""

    def __init__(self, action_dim: int, center: float = 0.0, sigma: float = 0.5, seed: int = 0) -> None:
        self.action_dim = action_dim
        self.center, self.sigma = center, sigma
        self.generator = torch.Generator().manual_seed(seed)
        self.last: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> "GaussianProposals":
        return self

    def sample(self, observations: PolicyInput, num_samples: int, deterministic: bool = False) -> torch.Tensor:
        batch = len(next(iter(observations.values())))
        noise = torch.randn((batch, num_samples, self.action_dim), generator=self.generator)
        self.last = (self.center + self.sigma * noise).clamp(-1.0, 1.0)
        return self.last.clone()

    def save(self, directory: str | Path) -> None:  # pragma: no cover - never saved
        raise NotImplementedError

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "GaussianProposals":  # pragma: no cover
        raise NotImplementedError


class FixedCandidates(GaussianProposals):
    """Proposes the same candidates ``[N, A]`` (a parameter) for every observation; its supervised
    loss pulls the first candidate towards the mean target action."""

    def __init__(self, candidates: torch.Tensor) -> None:
        super().__init__(candidates.shape[1])
        self.module = nn.Module()
        self.module.candidates = nn.Parameter(candidates.clone())

    def sample(self, observations: PolicyInput, num_samples: int, deterministic: bool = False) -> torch.Tensor:
        batch = len(next(iter(observations.values())))
        assert num_samples == len(self.module.candidates)
        return self.module.candidates.detach()[None].expand(batch, -1, -1).clone()

    def supervised_loss(self, observations: PolicyInput, actions: torch.Tensor,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return (self.module.candidates[0] - actions.mean(dim=0)).square().sum()


class DistanceCritic:
    """Q_i(s, a) = -|a - goal(s)|^2 + offsets[i], the goal read from ``goal_key`` (times ``scale``
    and permuted by ``permutation``, to make it a function of the state)."""

    def __init__(self, goal_key: str = "goal", offsets: tuple[float, ...] = (0.0, -1.0),
                 scale: float = 1.0, permutation: Optional[list[int]] = None, action_dim: int = 3) -> None:
        self.observation_keys = (goal_key,)
        self.action_dim = action_dim
        self.offsets = torch.tensor(offsets)
        self.scale, self.permutation = scale, permutation

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> "DistanceCritic":
        return self

    def goal(self, observations: Mapping[str, Any]) -> torch.Tensor:
        goal = torch.as_tensor(np.asarray(observations[self.observation_keys[0]]), dtype=torch.float32)
        goal = goal * self.scale
        return goal[:, self.permutation] if self.permutation is not None else goal

    def encode(self, observations: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.goal(observations)

    def values(self, features: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        q = -(actions - features[:, None, :]).square().sum(-1)
        return q[None] + self.offsets[:, None, None]

    def q(self, goals: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Reduced (mean) Q of actions ``[B, K, A]`` at goals ``[B, A]``."""
        return reduce_ensemble(self.values(goals, actions), "mean")


def goals(batch: int, seed: int = 0, low: float = -0.6, high: float = 0.6) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, (batch, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, field", [
    ({"top_k": 40}, "top_k"),
    ({"num_samples": 0}, "num_samples"),
    ({"local_steps": -1}, "local_steps"),
    ({"local_step_size": float("nan")}, "local_step_size"),
    ({"critic_reduction": "max"}, "critic_reduction"),
    ({"optimize_with": "best"}, "optimize_with"),
    ({"action_temperature": -1.0}, "action_temperature"),
    ({"distill_batch": 0}, "distill_batch"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"distill_every_updates": 0}, "distill_every_updates"),
])
def test_config_errors_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"PARLConfig.{field}"):
        PARLConfig(**changes)


def test_the_discrete_gripper_head_is_refused() -> None:
    with pytest.raises(ValueError, match="sac.gripper_critic.enabled: PA-RL"):
        PARLAgent(PARLConfig(num_samples=4, top_k=2), FixedCandidates(CANDIDATES), STATE_SPACE, ACTIONS_2D,
                  sac=SACConfig(gripper_critic=GripperCriticConfig(enabled=True)))


def test_config_file_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "parl.yaml"
    path.write_text("num_samples: 8\ntop_k: 4\ndistill_every_updates: 3\n")
    config = load_parl_config(path)
    assert (config.num_samples, config.top_k, config.distill_every_updates) == (8, 4, 3)
    path.write_text("num_samples: 8\ntop_k: 16\n")
    with pytest.raises(ConfigError, match=r"parl\.yaml: PARLConfig\.top_k: must not exceed num_samples"):
        load_parl_config(path)
    path.write_text("num_sample: 8\n")
    with pytest.raises(ConfigError, match=r"parl\.yaml: num_sample: unknown field"):
        load_parl_config(path)


# ---------------------------------------------------------------------------------------------
# Action optimisation on Q = -|a - a*|^2
# ---------------------------------------------------------------------------------------------


def test_optimisation_moves_actions_towards_the_maximum_and_reports_the_measured_gain() -> None:
    critic, base = DistanceCritic(), GaussianProposals(3)
    observations = {"goal": goals(16)}
    target = torch.from_numpy(observations["goal"])
    config = PARLConfig(num_samples=16, top_k=4, local_steps=5, local_step_size=0.1)
    with torch.inference_mode():  # as a policy server calls it
        actions, values, info = optimize_actions(base, critic, observations, config)

    assert actions.shape == (16, 4, 3) and values.shape == (16, 4)
    assert torch.allclose(values, critic.q(target, actions), atol=1e-6)  # the values are the actions' Q
    assert torch.all(values[:, :-1] >= values[:, 1:])  # best first
    base_q = critic.q(target, base.last)
    assert info["critic_gain"] == pytest.approx(float(values.mean() - base_q.mean()), abs=1e-5)
    assert info["q_base"] == pytest.approx(float(base_q.mean()), abs=1e-5)
    assert info["critic_gain"] > 0 and info["global_gain"] > 0 and info["local_gain"] > 0
    assert info["critic_gain"] == pytest.approx(info["global_gain"] + info["local_gain"], abs=1e-5)
    base_error = (base.last - target[:, None]).norm(dim=-1).mean()
    error = (actions - target[:, None]).norm(dim=-1).mean()
    # five steps a <- a - 0.2 (a - a*) leave 0.8^5 = 33% of each kept sample's distance
    assert error < 0.4 * base_error


def test_the_global_stage_keeps_the_k_samples_the_critic_values_most() -> None:
    critic, base = DistanceCritic(), GaussianProposals(3, seed=3)
    observations = {"goal": goals(5, seed=1)}
    actions, values, info = optimize_actions(base, critic, observations,
                                             PARLConfig(num_samples=12, top_k=3, local_steps=0))
    q = critic.q(torch.from_numpy(observations["goal"]), base.last)
    expected_values, order = q.sort(dim=1, descending=True)
    expected = base.last.gather(1, order[:, :3, None].expand(-1, -1, 3))
    assert torch.equal(actions, expected)
    assert torch.allclose(values, expected_values[:, :3])
    assert info["local_gain"] == 0.0 and info["best_step"] == 0.0


def test_the_ensemble_is_reduced_by_mean_or_min() -> None:
    values = torch.tensor([[[1.0, 4.0]], [[3.0, 0.0]]])
    assert torch.equal(reduce_ensemble(values, "mean"), torch.tensor([[2.0, 2.0]]))
    assert torch.equal(reduce_ensemble(values, "min"), torch.tensor([[1.0, 0.0]]))


def test_optimised_actions_stay_inside_the_action_bounds() -> None:
    critic, base = DistanceCritic(), GaussianProposals(3)
    outside = np.tile(np.array([[1.5, -2.0, 0.3]], np.float32), (6, 1))  # a* beyond the box on two axes
    actions, _, _ = optimize_actions(base, critic, {"goal": outside},
                                     PARLConfig(num_samples=8, top_k=4, local_steps=20, local_step_size=0.25))
    assert actions.min() >= -1.0 and actions.max() <= 1.0
    # the constrained maximum: the box's corner on the clipped axes, a* on the free one
    assert torch.allclose(actions, torch.tensor([1.0, -1.0, 0.3]).expand_as(actions), atol=1e-3)


def test_the_best_iterate_is_kept_when_a_large_step_overshoots() -> None:
    critic = DistanceCritic()
    observations = {"goal": goals(8, seed=2, low=-0.3, high=0.3)}
    target = torch.from_numpy(observations["goal"])
    step_size, steps = 1.2, 6  # a <- a - 2.4 (a - a*) = a* - 1.4 (a - a*): overshoots further every step
    start, start_values, _ = optimize_actions(GaussianProposals(3, seed=5), critic, observations,
                                              PARLConfig(num_samples=8, top_k=4, local_steps=0))
    actions, values, info = optimize_actions(GaussianProposals(3, seed=5), critic, observations,
                                             PARLConfig(num_samples=8, top_k=4, local_steps=steps,
                                                        local_step_size=step_size))
    # per slot the value never drops below the base sample's (so neither do the sorted values)
    assert torch.all(values >= start_values - 1e-6)
    # the plain iterates, by hand: the last one is worse than what was kept
    iterate = start.clone()
    for _ in range(steps):
        iterate = (iterate - step_size * 2.0 * (iterate - target[:, None])).clamp(-1.0, 1.0)
    last_values = critic.q(target, iterate).sort(dim=1, descending=True).values
    assert torch.all(values >= last_values + 0.1)
    # every step moved away from a*, so the base samples themselves were kept
    assert torch.equal(actions, start) and info["best_step"] == 0 and info["local_gain"] == 0


# ---------------------------------------------------------------------------------------------
# Distillation into a diffusion policy
# ---------------------------------------------------------------------------------------------


def tiny_diffusion_policy(state_dim: int = 2, action_dim: int = 2, seed: int = 0) -> DiffusionPolicy:
    config = DiffusionPolicyConfig(horizon=1, n_obs=1, action_steps=1, hidden_dim=64, num_blocks=2,
                                   timestep_dim=16, train_timesteps=20, inference_steps=5, lr_warmup_steps=0)
    observation_space = spaces.Dict({"state": spaces.Box(-1.0, 1.0, (state_dim,), np.float32)})
    return DiffusionPolicy(config, observation_space, spaces.Box(-1.0, 1.0, (action_dim,), np.float32), seed=seed)


def test_distilling_optimised_actions_moves_a_diffusion_policy_towards_the_maximum() -> None:
    torch.manual_seed(0)
    policy = tiny_diffusion_policy()
    # a*(s) = 0.8 (s_1, s_0): a function of the state the untrained policy knows nothing of
    critic = DistanceCritic("state", scale=0.8, permutation=[1, 0], action_dim=2)
    rng = np.random.default_rng(0)
    train = {"state": rng.uniform(-1, 1, (512, 2)).astype(np.float32)}
    test = {"state": rng.uniform(-1, 1, (64, 2)).astype(np.float32)}
    config = PARLConfig(num_samples=8, top_k=2, local_steps=20, local_step_size=0.2, distill_lr=2e-3,
                        distill_batch=128)

    def error(observations: dict) -> float:
        actions = policy.sample(observations, 4)
        return float((actions - critic.goal(observations)[:, None]).norm(dim=-1).mean())

    untrained = error(test)
    optimized, _, info = optimize_actions(policy, critic, train, config)
    assert info["critic_gain"] > 0
    assert float((optimized[:, 0] - critic.goal(train)).norm(dim=-1).mean()) < 0.01
    losses = Distiller(policy, config).distill(train, optimized[:, 0], steps=200)
    trained = error(test)
    assert losses["distill_loss_last"] < losses["distill_loss_first"]
    assert untrained > 0.5 and trained < 0.1, (untrained, trained)


# ---------------------------------------------------------------------------------------------
# The learner: TD target, update, acting, files
# ---------------------------------------------------------------------------------------------


STATE_SPACE = spaces.Dict({"state": spaces.Box(-1.0, 1.0, (3,), np.float32)})
ACTIONS_2D = spaces.Box(-1.0, 1.0, (2,), np.float32)
CANDIDATES = torch.tensor([[0.0, 0.0], [0.5, -0.5], [-0.8, 0.3], [0.2, 0.9]])


def state_batch(rows: int, seed: int = 0) -> TorchBatch:
    rng = np.random.default_rng(seed)
    return TorchBatch(
        observations={"state": torch.from_numpy(rng.uniform(-1, 1, (rows, 3)).astype(np.float32))},
        actions=torch.from_numpy(rng.uniform(-1, 1, (rows, 2)).astype(np.float32)),
        rewards=torch.from_numpy(rng.uniform(0, 1, rows).astype(np.float32)),
        next_observations={"state": torch.from_numpy(rng.uniform(-1, 1, (rows, 3)).astype(np.float32))},
        terminated=torch.tensor([0.0, 1.0] * (rows // 2)),
        intervened=torch.zeros(rows, dtype=torch.bool),
    )


def small_agent(**changes: Any) -> tuple[PARLAgent, FixedCandidates]:
    base = FixedCandidates(CANDIDATES)
    sac = SACConfig(hidden_dims=(32, 32), num_critics=4, critic_subset=2, discount=0.9, utd_ratio=2)
    config = PARLConfig(num_samples=4, top_k=2, local_steps=3, local_step_size=0.2, distill_batch=4, **changes)
    return PARLAgent(config, base, STATE_SPACE, ACTIONS_2D, sac=sac, seed=0, distill_module=base.module), base


def test_the_td_target_uses_the_optimised_next_actions() -> None:
    agent, base = small_agent()
    batch = state_batch(6)
    rng_state = agent.generator.get_state()
    target, best, info = agent.optimized_td_target(batch, augment=False)

    # by hand: the best optimised action of the online critic, scored by a random pair of the
    # four target critics (the subset drawn from the agent's generator, as SACAgent.td_target does)
    optimized, _, _ = optimize_actions(base, EnsembleCritic.from_agent(agent, "online"), batch.next_observations,
                                       agent.parl_config)
    assert torch.equal(best, optimized[:, 0])
    assert not any(torch.allclose(best, candidate.expand_as(best), atol=1e-3) for candidate in CANDIDATES)
    with torch.no_grad():
        next_q = agent.target_critic(agent.target_encoder(batch.next_observations), best)
    chosen = torch.randperm(4, generator=torch.Generator().set_state(rng_state))[:2]
    expected = batch.rewards + 0.9 * (1.0 - batch.terminated) * next_q[chosen].min(dim=0).values
    assert torch.allclose(target, expected, atol=1e-6)
    assert info["critic_gain"] >= 0


def test_an_update_trains_the_critic_and_stores_the_optimised_actions_for_distillation() -> None:
    agent, base = small_agent()
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    actor_before = [p.detach().clone() for p in agent.policy.head.parameters()]
    log_alpha = float(agent.log_alpha.detach())
    metrics = agent.update(state_batch(8))

    assert metrics["next_critic_gain"] >= 0 and metrics["critic_gain"] >= 0 and metrics["update_count"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, agent.critic.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(actor_before, agent.policy.head.parameters()))
    assert float(agent.log_alpha.detach()) == log_alpha
    assert len(agent.pairs) == 4  # the last of the utd_ratio = 2 minibatches
    candidates = base.module.candidates.detach().clone()
    assert agent.distill(steps=2)["distill_steps"] == 2
    assert not torch.equal(candidates, base.module.candidates)
    # SAC's checkpoint format: a plain SACAgent reads it
    meta = agent.checkpoint_meta()
    assert meta["algorithm"] == "parl" and meta["parl"]["top_k"] == 2
    reader = SACAgent(agent.config, STATE_SPACE, ACTIONS_2D)
    reader.load_checkpoint(agent.checkpoint_tensors(), meta)
    assert all(torch.equal(a, b) for a, b in zip(reader.critic.parameters(), agent.critic.parameters()))
    # ... and the other way round: an offline (SAC / Cal-QL) critic warm-starts PA-RL
    warm, _ = small_agent()
    warm.load_checkpoint(reader.checkpoint_tensors(), reader.checkpoint_meta())
    assert all(torch.equal(a, b) for a, b in zip(warm.target_critic.parameters(), agent.target_critic.parameters()))


def test_acting_takes_the_best_optimised_action_or_draws_among_the_k() -> None:
    critic = DistanceCritic(action_dim=2, offsets=(0.0,))
    observations = {"goal": np.array([[0.45, -0.4], [-0.7, 0.2]], np.float32)}
    config = PARLConfig(num_samples=4, top_k=3, local_steps=0)
    base = FixedCandidates(CANDIDATES)
    ranked, _, _ = optimize_actions(base, critic, observations, config)
    policy = PARLActingPolicy(base, critic, config)
    best = policy.sample(observations, 5, deterministic=True)
    assert torch.equal(best, ranked[:, :1].expand(-1, 5, -1))
    greedy = PARLActingPolicy(base, critic, PARLConfig(num_samples=4, top_k=3, local_steps=0, action_temperature=0.0))
    assert torch.equal(greedy.sample(observations, 5), best)
    draws = PARLActingPolicy(base, critic, PARLConfig(num_samples=4, top_k=3, local_steps=0,
                                                      action_temperature=100.0)).sample(observations, 200)
    for row in range(2):  # every draw is one of the k, and a flat softmax reaches all of them
        kept = {tuple(action) for action in ranked[row].tolist()}
        drawn = {tuple(action) for action in draws[row].tolist()}
        assert drawn == kept
    assert policy.last_info["critic_gain"] > 0


def test_an_acting_policy_saves_and_loads_with_its_base_and_critic(tmp_path: Path) -> None:
    agent = SACAgent(SACConfig(hidden_dims=(16, 16)), STATE_SPACE, ACTIONS_2D, seed=1)
    config = PARLConfig(num_samples=6, top_k=2, local_steps=3, local_step_size=0.1)
    observations = {"state": np.random.default_rng(0).uniform(-1, 1, (3, 3)).astype(np.float32)}
    policy = PARLActingPolicy(tiny_diffusion_policy(state_dim=3), QCritic.from_agent(agent, "online"), config)
    policy.save(tmp_path / "parl")
    loaded = load_policy(tmp_path / "parl")
    assert isinstance(loaded, PARLActingPolicy) and loaded.config == config
    assert torch.equal(loaded.sample(observations, 1, deterministic=True),
                       policy.sample(observations, 1, deterministic=True))


# ---------------------------------------------------------------------------------------------
# One full PA-RL iteration with an OpenVLA-shaped model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vla_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_vla import TinyVLASpec, build_tiny_vla

    return build_tiny_vla(tmp_path_factory.mktemp("parl-openvla") / "tiny-openvla", TinyVLASpec(initializer_range=0.1))


def tiny_vla_policy(checkpoint: Path) -> OpenVLAPolicy:
    return OpenVLAPolicy(OpenVLAConfig(checkpoint=str(checkpoint), unnorm_key="bridge_orig", device="cpu",
                                       instruction="pick up the red cube"))


def test_openvla_action_tokens_decode_back_to_the_action_within_half_a_bin(vla_checkpoint: Path) -> None:
    vla = tiny_vla_policy(vla_checkpoint)
    actions = torch.from_numpy(np.random.default_rng(0).uniform(-0.7, 0.7, (32, 4)).astype(np.float32))
    tokens = vla.action_tokens(actions)
    assert tokens.shape == (32, 7) and tokens.min() >= vla.layout.first_token_id
    # half a bin over the mapping's scale: (q99 - q01) / 255 / 2 / 0.03 for xyz (bridge's statistics),
    # the un-normalised gripper's (2 / 255) / 2 / 0.5
    half_bin = torch.tensor([0.06 / 510 / 0.03, 0.08 / 510 / 0.03, 0.065 / 510 / 0.03, 1 / 255 / 0.5])
    assert torch.all((vla.config.mapping(vla.decode_raw(tokens)) - actions).abs() <= half_bin + 1e-5)


def test_openvla_teacher_forced_log_likelihood_is_that_of_generation(vla_checkpoint: Path) -> None:
    from transformers import GenerationConfig, LogitsProcessorList

    from policies.openvla import action_token_sampler

    vla = tiny_vla_policy(vla_checkpoint)
    # prompts of different lengths: left padding and positions must line up with generation's
    observations = {"image": np.random.default_rng(1).integers(0, 256, (3, 24, 40, 3), dtype=np.uint8),
                    "instruction": ["pick up the red cube", "open the drawer", "put the blue block in the green bowl"]}
    with torch.no_grad():
        prefix, mask = vla.prefix_embeddings(vla.prompts(observations, 3), vla.images(observations))
        generated = vla.model.language_model.generate(
            inputs_embeds=prefix, attention_mask=mask,
            logits_processor=LogitsProcessorList([action_token_sampler(vla.layout, None)]),
            generation_config=GenerationConfig(max_new_tokens=7, do_sample=False, output_logits=True,
                                               return_dict_in_generate=True, pad_token_id=32000))
        tokens = generated.sequences[:, -7:]
        expected = torch.stack(generated.logits, dim=1).float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        assert torch.allclose(vla.token_log_likelihood(observations, tokens), expected, atol=1e-4)


def test_one_pa_rl_iteration_with_a_tiny_openvla_trains_its_lora_adapters(vla_checkpoint: Path,
                                                                           tmp_path: Path) -> None:
    torch.manual_seed(0)
    vla = tiny_vla_policy(vla_checkpoint)
    image_shape = (24, 40, 3)
    observation_space = spaces.Dict({"image": spaces.Box(0, 255, image_shape, np.uint8),
                                     "state": spaces.Box(-1.0, 1.0, (3,), np.float32)})
    config = PARLConfig(num_samples=4, top_k=2, local_steps=2, local_step_size=0.1, distill_batch=4, distill_lr=5e-3,
                        lora_rank=4, lora_alpha=8.0)
    agent = PARLAgent(config, vla, observation_space, spaces.Box(-1.0, 1.0, (4,), np.float32),
                      sac=SACConfig(hidden_dims=(32, 32)), observation_keys=("state",))
    assert has_lora(vla.model)
    adapters = {name: p.detach().clone() for name, p in vla.model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach().clone() for name, p in vla.model.named_parameters() if not p.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)

    rng = np.random.default_rng(0)
    rows = 4

    def fields() -> dict[str, np.ndarray]:
        return {"image": rng.integers(0, 256, (rows, *image_shape), dtype=np.uint8),
                "state": rng.uniform(-1, 1, (rows, 3)).astype(np.float32)}

    batch = Batch(fields(), rng.uniform(-1, 1, (rows, 4)).astype(np.float32), np.ones(rows, np.float32), fields(),
                  np.zeros(rows, np.float32), np.zeros(rows, bool))
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]

    metrics = agent.update(batch)  # optimise (next and current states) -> critic step -> store pairs
    assert metrics["next_critic_gain"] >= 0 and metrics["critic_gain"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, agent.critic.parameters()))
    assert len(agent.pairs) == rows
    observations, actions = agent.pairs.contents()
    with torch.no_grad():
        before = vla.action_token_log_likelihood(observations, actions).sum(dim=1)

    agent.distill(steps=5)  # distil the optimised actions' tokens through the adapters
    with torch.no_grad():
        after = vla.action_token_log_likelihood(observations, actions).sum(dim=1)
    changed = {name for name, p in vla.model.named_parameters()
               if name in adapters and not torch.equal(p, adapters[name])}
    # every adapter of the language model, and those of the vision layers whose features are used
    # (not the towers' last layers: the model reads their second-to-last layer)
    assert {name for name in adapters if name.startswith("language_model.") and "lora_B" in name} <= changed
    assert any(name.startswith("vision_backbone.") for name in changed)
    assert any(name.startswith("projector.") for name in changed)
    assert all(torch.equal(p, frozen[name]) for name, p in vla.model.named_parameters() if name in frozen)
    assert torch.all(after > before + 3.0), (before, after)

    # acting with the fine-tuned VLA, and its adapters through save / load
    acting = agent.acting_policy()
    chosen = acting.sample(observations, 1, deterministic=True)
    assert chosen.shape == (rows, 1, 4) and chosen.abs().max() <= 1.0
    acting.save(tmp_path / "parl-vla")
    loaded = load_policy(tmp_path / "parl-vla")
    with torch.no_grad():
        reloaded = loaded.base.action_token_log_likelihood(observations, actions).sum(dim=1)
    assert torch.allclose(reloaded, after, atol=1e-4)
