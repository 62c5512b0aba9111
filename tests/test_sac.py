"""SAC/RLPD learner core: tanh-Gaussian policy, encoders, TD targets, checkpoints, gripper critic, learning."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import safetensors.torch
import torch
from gymnasium import spaces
from torch import nn
from torch.nn import functional as F

from hardware_configs.schema import GripperCriticConfig, ImageEncoderConfig, SACConfig
from learner.sac import CriticEnsemble, SACAgent, batch_to_torch, gripper_labels
from policies import encoders as encoders_module
from policies.encoders import ObservationEncoder, random_shift
from policies.gaussian import (
    GRIPPER_CLOSE,
    GRIPPER_OPEN,
    GRIPPER_STAY,
    GaussianHead,
    TanhGaussianPolicy,
    load_policy_bytes,
)

SMALL = dict(hidden_dims=(32, 32), batch_size=16)


# ---------------------------------------------------------------------------------------------
# Helpers: spaces, random batches
# ---------------------------------------------------------------------------------------------


def robot_spaces(cameras: tuple[str, ...] = (), image_size: int = 32, action_dim: int = 4) -> tuple[spaces.Dict, spaces.Box]:
    fields = {
        "tcp_pose": spaces.Box(-1.0, 1.0, (7,), np.float32),
        "tcp_velocity": spaces.Box(-1.0, 1.0, (6,), np.float32),
        "gripper_width": spaces.Box(0.0, 0.08, (1,), np.float32),
        "task/cube_pose": spaces.Box(-1.0, 1.0, (7,), np.float32),
    }
    for camera in cameras:
        fields[f"images/{camera}"] = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
    return spaces.Dict(fields), spaces.Box(-1.0, 1.0, (action_dim,), np.float32)


def random_observations(space: spaces.Dict, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    observation = {}
    for key, box in space.spaces.items():
        if box.dtype == np.uint8:
            observation[key] = rng.integers(0, 256, (rows, *box.shape), dtype=np.uint8)
        else:
            observation[key] = rng.uniform(box.low, box.high, (rows, *box.shape)).astype(np.float32)
    return observation


def random_batch(space: spaces.Dict, action_dim: int, rows: int, seed: int = 0) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    return SimpleNamespace(
        observations=random_observations(space, rows, rng),
        actions=rng.uniform(-1, 1, (rows, action_dim)).astype(np.float32),
        rewards=rng.normal(size=rows).astype(np.float32),
        next_observations=random_observations(space, rows, rng),
        terminated=(rng.uniform(size=rows) < 0.1).astype(np.float32),
        intervened=rng.uniform(size=rows) < 0.2,
    )


def single(observations: dict[str, np.ndarray], row: int) -> dict[str, np.ndarray]:
    return {key: value[row] for key, value in observations.items()}


# ---------------------------------------------------------------------------------------------
# Tanh-Gaussian policy
# ---------------------------------------------------------------------------------------------


def test_tanh_log_prob_matches_change_of_variables_and_histogram() -> None:
    mean, std = 0.4, 0.8
    head = GaussianHead(feature_dim=3, hidden_dims=(16,), action_dim=1)
    with torch.no_grad():  # a fixed distribution: pre-tanh N(0.4, 0.8^2) whatever the features
        head.net[-1].weight.zero_()
        raw_log_std = math.atanh((math.log(std) + 5.0) / 3.5 - 1.0)  # inverse of the log-std squashing
        head.net[-1].bias.copy_(torch.tensor([mean, raw_log_std]))
    samples = 200_000
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        actions, log_prob = head(torch.randn(samples, 3), generator=generator)
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))

    # Analytic density of a = tanh(u), u ~ N(mean, std^2): N(atanh a) / (1 - a^2).
    inner = actions.double()[:, 0]
    well_inside = inner.abs() < 0.999
    analytic = normal.log_prob(torch.atanh(inner[well_inside])) - torch.log1p(-inner[well_inside].square())
    assert torch.allclose(log_prob.double()[well_inside], analytic, atol=2e-3)

    # Monte-Carlo: bin frequencies of the samples match the probability mass of exp(log_prob).
    edges = torch.linspace(-0.98, 0.98, 21, dtype=torch.float64)
    frequency = torch.histogram(inner, bins=edges).hist / samples
    mass = normal.cdf(torch.atanh(edges[1:])) - normal.cdf(torch.atanh(edges[:-1]))
    assert (frequency - mass).abs().max() < 4 * math.sqrt(0.25 / samples)
    assert torch.isfinite(log_prob).all()


def test_log_prob_is_finite_for_saturated_actions_and_deterministic_is_tanh_mean() -> None:
    torch.manual_seed(0)
    head = GaussianHead(feature_dim=2, hidden_dims=(8,), action_dim=3)
    with torch.no_grad():
        head.net[-1].bias[:3] = 30.0  # pre-tanh means far out: tanh saturates to 1.0 in float32
        features = torch.randn(5, 2)
        mean, _ = head.distribution(features)
        action, log_prob = head(features, deterministic=True)
    assert torch.equal(action, torch.tanh(mean))
    assert torch.isfinite(log_prob).all()


def test_policy_act_and_sample_actions_shapes() -> None:
    observation_space, action_space = robot_spaces(cameras=("front",))
    policy = TanhGaussianPolicy(SACConfig(**SMALL), observation_space, action_space)
    observation = single(random_observations(observation_space, 1, np.random.default_rng(0)), 0)
    action = policy.act(observation, deterministic=True)
    assert action.shape == (4,) and action.dtype == np.float32 and np.all(np.abs(action) < 1)
    np.testing.assert_array_equal(action, policy.act(observation, deterministic=True))
    assert not np.array_equal(policy.act(observation), policy.act(observation))

    batch = {k: torch.from_numpy(v) for k, v in random_observations(observation_space, 3, np.random.default_rng(1)).items()}
    samples = policy.sample_actions(batch, num_samples=5)
    assert samples.shape == (3, 5, 4)
    action, log_prob = policy(batch)
    assert action.shape == (3, 4) and log_prob.shape == (3,)


# ---------------------------------------------------------------------------------------------
# Encoders and DrQ
# ---------------------------------------------------------------------------------------------


def test_random_shift_is_a_replicate_pad_crop_per_sample() -> None:
    pad = 3
    image = torch.randint(0, 256, (1, 12, 10, 3), dtype=torch.uint8)
    images = image.expand(16, -1, -1, -1).contiguous()
    shifted = random_shift(images, pad, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8

    padded = F.pad(image.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="replicate")[0].permute(1, 2, 0)
    crops = {(dy, dx): padded[dy:dy + 12, dx:dx + 10] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}
    offsets = []
    for sample in shifted.float():
        matches = [offset for offset, crop in crops.items() if torch.equal(crop, sample)]
        assert matches, "a shifted image is not a crop of the replicate-padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 4, "the offsets should differ between samples"
    assert torch.equal(random_shift(images, 0), images)


def test_encoder_layout_keys_and_no_augmentation_at_act_time(monkeypatch: pytest.MonkeyPatch) -> None:
    observation_space, action_space = robot_spaces(cameras=("front", "wrist"))
    config = SACConfig(**SMALL, image_encoder=ImageEncoderConfig(latent_dim=8, channels=4))
    encoder = ObservationEncoder(observation_space, (), config.image_encoder)
    assert encoder.image_keys == ("images/front", "images/wrist")
    assert encoder.state_dim == 7 + 6 + 1 + 7 and encoder.output_dim == 21 + 2 * 8
    state_only = ObservationEncoder(observation_space, ("tcp_pose", "gripper_width"), config.image_encoder)
    assert state_only.output_dim == 8

    agent = SACAgent(config, observation_space, action_space, seed=0)
    observation = single(random_observations(observation_space, 1, np.random.default_rng(0)), 0)
    calls = []
    original = encoders_module.random_shift
    monkeypatch.setattr(encoders_module, "random_shift", lambda *args: calls.append(1) or original(*args))
    first = agent.act(observation, deterministic=True)
    agent.policy.act(observation, deterministic=False)
    assert not calls, "act must not augment"
    np.testing.assert_array_equal(first, agent.act(observation, deterministic=True))
    agent.update(random_batch(observation_space, 4, 16))
    assert len(calls) == 2 * 2, "one shift per camera for observations and next observations"


class CountingBackbone(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(images)


def test_state_standardisation_uses_measured_statistics_floor_and_clip() -> None:
    observation_space, action_space = robot_spaces()
    agent = SACAgent(SACConfig(**SMALL, state_min_std=0.01), observation_space, action_space,
                     observation_keys=("gripper_width", "tcp_pose"))
    rng = np.random.default_rng(0)
    tcp = np.concatenate([rng.normal([0.5, 0.0, 0.2], [0.1, 0.05, 0.02], (400, 3)),
                          np.tile([1.0, 0.0, 0.0, 0.0], (400, 1))], axis=1).astype(np.float32)
    width = rng.uniform(0.0, 0.08, (400, 1)).astype(np.float32)
    demos, online = {"gripper_width": width[:300], "tcp_pose": tcp[:300]}, {"gripper_width": width[300:], "tcp_pose": tcp[300:]}
    assert not agent.state_normalized
    agent.fit_state_normalization([online, demos])
    assert agent.state_normalized

    raw = np.concatenate([width, tcp], axis=1).astype(np.float64)  # sorted keys: gripper_width first
    np.testing.assert_allclose(agent.encoder.state_mean.numpy(), raw.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(agent.encoder.state_std.numpy(), np.maximum(raw.std(0), 0.01), rtol=1e-5)
    assert agent.encoder.state_std[4:].eq(0.01).all()  # the constant quaternion hits the floor
    assert torch.equal(agent.target_encoder.state_mean, agent.encoder.state_mean)

    prepared = agent.encoder.prepare({"gripper_width": torch.from_numpy(width), "tcp_pose": torch.from_numpy(tcp)})
    standardised = prepared["state"].numpy()
    np.testing.assert_allclose(standardised[:, :4].mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(standardised[:, :4].std(0), 1.0, atol=1e-3)
    far = {"gripper_width": torch.zeros(1, 1), "tcp_pose": torch.tensor([[5.0, 0.0, 0.2, 1.0, 0.0, 0.0, 0.0]])}
    assert agent.encoder.prepare(far)["state"][0, 1].item() == pytest.approx(10.0)  # clipped

    with pytest.raises(ValueError, match="NaN or inf"):
        agent.fit_state_normalization([{"gripper_width": np.full((2, 1), np.nan, np.float32), "tcp_pose": tcp[:2]}])


def test_spatial_softmax_finds_the_peak_and_keeps_published_weights_small() -> None:
    pool = encoders_module.SpatialSoftmax(5, 9)
    features = torch.full((1, 2, 5, 9), -50.0)
    features[0, 0, 0, 8] = 50.0  # top right
    features[0, 1, 2, 4] = 50.0  # centre
    np.testing.assert_allclose(pool(features).detach().numpy(), [[1.0, -1.0, 0.0, 0.0]], atol=1e-5)

    observation_space, action_space = robot_spaces(cameras=("front", "wrist"), image_size=128)
    sizes = {}
    for pooling in ("flatten", "spatial_softmax"):
        config = SACConfig(**SMALL, image_encoder=ImageEncoderConfig(pooling=pooling))
        agent = SACAgent(config, observation_space, action_space, seed=0)
        sizes[pooling] = len(agent.publish_policy())
        metrics = agent.update(random_batch(observation_space, 4, 16))
        assert math.isfinite(metrics["critic_loss"])
    assert sizes["flatten"] > 40e6 and sizes["spatial_softmax"] < 1e6, sizes

    strided = SACAgent(SACConfig(**SMALL, image_encoder=ImageEncoderConfig(strides=(2, 2, 1), channels=8)),
                       observation_space, action_space, seed=0)
    convs = [m for m in strided.encoder.cameras["front"].convs if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    assert len(strided.publish_policy()) < sizes["flatten"] / 10


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_pretrained_backbone_is_frozen_cached_per_minibatch_and_not_published(tmp_path) -> None:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
    path = tmp_path / "backbone.pt"
    torch.jit.script(backbone).save(str(path))
    observation_space, action_space = robot_spaces(cameras=("front", "wrist"))
    image_config = ImageEncoderConfig(kind="pretrained", pretrained_path=str(path), latent_dim=8)
    config = SACConfig(**SMALL, utd_ratio=2, image_encoder=image_config)
    agent = SACAgent(config, observation_space, action_space, seed=0)
    frozen_before = {k: [p.clone() for p in b.parameters()] for k, b in agent.encoder.frozen_backbones.items()}
    counters = {key: CountingBackbone(b) for key, b in agent.encoder._frozen_backbones.items()}
    agent.encoder._frozen_backbones.update(counters)

    metrics = agent.update(random_batch(observation_space, 4, 32))
    assert all(math.isfinite(v) for v in metrics.values())
    # 2 minibatches x (observations + next observations), shared by critic, targets and actor.
    assert [c.calls for c in counters.values()] == [4, 4]
    for key, before in frozen_before.items():
        for old, new in zip(before, counters[key].inner.parameters()):
            assert torch.equal(old, new) and new.grad is None
    published = safetensors.torch.load(agent.publish_policy())
    assert not any("backbone" in name or "inner" in name for name in published)
    actor_side = TanhGaussianPolicy(config, observation_space, action_space)
    load_policy_bytes(actor_side, agent.publish_policy())


# ---------------------------------------------------------------------------------------------
# Critic: TD target, ensemble
# ---------------------------------------------------------------------------------------------


def test_td_target_takes_min_over_a_random_subset_and_terminal_stops_bootstrap() -> None:
    observation_space, action_space = robot_spaces()
    config = SACConfig(**SMALL, num_critics=3, critic_subset=2, discount=0.9, init_temperature=0.5)
    agent = SACAgent(config, observation_space, action_space, seed=0)
    q_next = torch.tensor([[1.0, 5.0], [2.0, 4.0], [3.0, 6.0]])  # [E=3, B=2]
    log_prob = torch.tensor([0.2, -0.4])
    rewards = torch.tensor([1.0, -1.0])
    seen = set()
    for _ in range(30):
        replay = torch.Generator().manual_seed(0)
        replay.set_state(agent.generator.get_state())
        chosen = torch.randperm(3, generator=replay)[:2]
        expected = rewards + 0.9 * (q_next[chosen].min(0).values - 0.5 * log_prob)
        got = agent.td_target(rewards, torch.zeros(2), q_next, log_prob)
        assert torch.allclose(got, expected)
        seen.add(tuple(sorted(chosen.tolist())))
    assert len(seen) == 3, "every 2-subset of 3 critics should come up"
    assert torch.equal(agent.td_target(rewards, torch.ones(2), q_next, log_prob), rewards)


def test_critic_step_regresses_on_the_subset_min_target_of_fixed_critics() -> None:
    """End to end through update(): fixed-weight critics whose outputs are constants."""
    observation_space, action_space = robot_spaces()
    config = SACConfig(**SMALL, num_critics=2, critic_subset=2, discount=0.9, backup_entropy=False)
    agent = SACAgent(config, observation_space, action_space, seed=0)
    with torch.no_grad():
        for critic, constants in ((agent.target_critic, (1.0, 3.0)), (agent.critic, (0.5, -0.5))):
            critic.weights[-1].zero_()
            critic.biases[-1].copy_(torch.tensor(constants).reshape(2, 1, 1))
    batch = random_batch(observation_space, 4, 16)
    target = batch.rewards + 0.9 * (1.0 - batch.terminated) * 1.0
    expected_loss = ((0.5 - target) ** 2).mean() + ((-0.5 - target) ** 2).mean()
    metrics = agent.update(batch)
    assert metrics["td_target_mean"] == pytest.approx(float(target.mean()), abs=1e-5)
    assert metrics["critic_loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    assert metrics["q_mean"] == pytest.approx(0.0, abs=1e-6)


def test_critic_ensemble_members_equal_independent_mlps() -> None:
    torch.manual_seed(0)
    ensemble = CriticEnsemble(5, (8, 8), num_critics=3, layer_norm=True)
    with torch.no_grad():
        for scale, shift in zip(ensemble.norm_scales, ensemble.norm_shifts):
            scale.uniform_(0.5, 1.5)
            shift.uniform_(-0.1, 0.1)
    features, actions = torch.randn(4, 3), torch.randn(4, 2)
    q = ensemble(features, actions)
    assert q.shape == (3, 4)
    inputs = torch.cat([features, actions], 1)
    for member in range(3):
        hidden = inputs
        for layer in range(2):
            hidden = hidden @ ensemble.weights[layer][member] + ensemble.biases[layer][member]
            hidden = F.layer_norm(hidden, (8,), ensemble.norm_scales[layer][member, 0], ensemble.norm_shifts[layer][member, 0])
            hidden = hidden.relu()
        out = hidden @ ensemble.weights[2][member] + ensemble.biases[2][member]
        assert torch.allclose(q[member], out[:, 0], atol=1e-5)


def test_actor_step_does_not_move_the_critic_or_its_encoder() -> None:
    observation_space, action_space = robot_spaces(cameras=("front",))
    config = SACConfig(**SMALL, image_encoder=ImageEncoderConfig(latent_dim=8, channels=4))
    agent = SACAgent(config, observation_space, action_space, seed=0)
    data = agent.batch_to_torch(random_batch(observation_space, 4, 16))
    prepared = agent.encoder.prepare(data.observations, augment=True, generator=agent.generator)
    encoder_before = {k: v.clone() for k, v in agent.encoder.state_dict().items()}
    critic_before = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    actor_before = {k: v.clone() for k, v in agent.policy.head.state_dict().items()}

    agent._actor_and_temperature_step(prepared)
    for name, value in agent.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[name]), name
    assert all(p.grad is None for p in agent.encoder.parameters())
    assert all(torch.equal(v, critic_before[k]) for k, v in agent.critic.state_dict().items())
    assert any(not torch.equal(v, actor_before[k]) for k, v in agent.policy.head.state_dict().items())

    agent.update(random_batch(observation_space, 4, 16, seed=1))  # the critic step does train it
    assert any(not torch.equal(v, encoder_before[k]) for k, v in agent.encoder.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Publishing and checkpoints
# ---------------------------------------------------------------------------------------------


def test_published_policy_bytes_give_identical_actions_on_the_actor_side() -> None:
    observation_space, action_space = robot_spaces(cameras=("front", "wrist"))
    config = SACConfig(**SMALL, image_encoder=ImageEncoderConfig(latent_dim=8, channels=4),
                       gripper_critic=GripperCriticConfig(enabled=True))
    keys = ("tcp_pose", "gripper_width", "images/front", "images/wrist")
    agent = SACAgent(config, observation_space, action_space, observation_keys=keys, seed=0)
    agent.fit_state_normalization([random_observations(observation_space, 50, np.random.default_rng(3))])
    for seed in range(3):
        agent.update(random_batch(observation_space, 4, 16, seed=seed))
    data = agent.publish_policy()
    assert isinstance(data, bytes)

    actor_side = TanhGaussianPolicy(config, observation_space, action_space, keys, seed=123)
    load_policy_bytes(actor_side, data)
    observations = random_observations(observation_space, 5, np.random.default_rng(7))
    for row in range(5):
        observation = single(observations, row)
        np.testing.assert_array_equal(actor_side.act(observation, True), agent.act(observation, True))
    for name, tensor in actor_side.encoder.state_dict().items():
        assert torch.equal(tensor, agent.encoder.state_dict()[name])


def test_checkpoint_round_trip_continues_identically(tmp_path) -> None:
    observation_space, action_space = robot_spaces(cameras=("front",))
    config = SACConfig(**SMALL, utd_ratio=2, num_critics=3, critic_subset=2,
                       image_encoder=ImageEncoderConfig(latent_dim=8, channels=4),
                       gripper_critic=GripperCriticConfig(enabled=True))
    agent = SACAgent(config, observation_space, action_space, seed=0)
    agent.fit_state_normalization([random_observations(observation_space, 50, np.random.default_rng(3))])
    for seed in range(3):
        agent.update(random_batch(observation_space, 4, 32, seed=seed))

    # What a caller writes: safetensors + JSON, no pickle.
    (tmp_path / "state.safetensors").write_bytes(safetensors.torch.save(agent.checkpoint_tensors()))
    (tmp_path / "meta.json").write_text(json.dumps(agent.checkpoint_meta()))
    restored = SACAgent(config, observation_space, action_space, seed=99)
    restored.load_checkpoint(safetensors.torch.load((tmp_path / "state.safetensors").read_bytes()),
                             json.loads((tmp_path / "meta.json").read_text()))
    assert restored.update_count == 3 and restored.state_normalized
    assert torch.equal(restored.target_encoder.state_std, agent.encoder.state_std)

    batch = random_batch(observation_space, 4, 32, seed=10)
    expected, got = agent.update(batch), restored.update(batch)
    assert got == expected
    for name, tensor in agent.checkpoint_tensors().items():
        assert torch.equal(tensor, restored.checkpoint_tensors()[name]), name


# ---------------------------------------------------------------------------------------------
# Gripper critic
# ---------------------------------------------------------------------------------------------


def test_gripper_labels_from_executed_value_and_state() -> None:
    executed = torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.3, -0.2])
    closed = torch.tensor([False, False, True, True, True, False])
    assert gripper_labels(executed, closed).tolist() == [
        GRIPPER_STAY, GRIPPER_CLOSE, GRIPPER_OPEN, GRIPPER_STAY, GRIPPER_STAY, GRIPPER_STAY
    ]


def test_gripper_stay_keeps_the_current_state() -> None:
    observation_space, action_space = robot_spaces()
    config = SACConfig(**SMALL, gripper_critic=GripperCriticConfig(enabled=True))
    policy = TanhGaussianPolicy(config, observation_space, action_space)
    with torch.no_grad():
        policy.gripper_head.net[-1].weight.zero_()
        policy.gripper_head.net[-1].bias.copy_(torch.tensor([0.0, 1.0, 0.0]))  # prefer "stay"
    observation = single(random_observations(observation_space, 1, np.random.default_rng(0)), 0)
    for width, command in ((0.01, 1.0), (0.07, -1.0)):  # closed below 0.04 (half the Box high)
        observation["gripper_width"] = np.array([width], np.float32)
        action = policy.act(observation, deterministic=True)
        assert action.shape == (4,) and action[-1] == command


def test_gripper_explores_epsilon_greedily_in_training_actions_only() -> None:
    """With the head preferring "stay" on an open gripper (command -1), training actions close it
    (+1) about epsilon / 3 of the time; evaluation actions, and epsilon 0, never do."""
    observation_space, action_space = robot_spaces()
    observation = single(random_observations(observation_space, 1, np.random.default_rng(0)), 0)
    observation["gripper_width"] = np.array([0.07], np.float32)

    def close_share(epsilon: float, deterministic: bool) -> float:
        config = SACConfig(**SMALL, gripper_critic=GripperCriticConfig(enabled=True, exploration_epsilon=epsilon))
        policy = TanhGaussianPolicy(config, observation_space, action_space, seed=3)
        with torch.no_grad():
            policy.gripper_head.net[-1].weight.zero_()
            policy.gripper_head.net[-1].bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
        return float(np.mean([policy.act(observation, deterministic)[-1] == 1.0 for _ in range(3000)]))

    assert close_share(0.3, deterministic=False) == pytest.approx(0.1, abs=0.02)
    assert close_share(0.3, deterministic=True) == 0.0
    assert close_share(0.0, deterministic=False) == 0.0


def test_gripper_conservative_weight_keeps_unseen_classes_below_the_executed_one() -> None:
    """Online data that always keeps an open gripper open ("stay"), at -1 a step: plain double DQN
    leaves the never-executed classes where the network puts them; the conservative term pushes
    them below "stay"."""
    observation_space, action_space = robot_spaces()

    def gripper_values(weight: float) -> np.ndarray:
        config = SACConfig(**SMALL, discount=0.8, critic_lr=3e-3, gripper_critic=GripperCriticConfig(
            enabled=True, toggle_penalty=0.0, conservative_weight=weight))
        agent = SACAgent(config, observation_space, action_space, seed=0)
        for step in range(200):
            batch = random_batch(observation_space, 4, 64, seed=step)
            batch.observations["gripper_width"][:] = 0.08
            batch.next_observations["gripper_width"][:] = 0.08
            batch.actions[:, -1] = -1.0
            batch.rewards = np.full(64, -1.0, np.float32)
            batch.terminated = np.zeros(64, np.float32)
            agent.update(batch)
        observations = random_observations(observation_space, 16, np.random.default_rng(1))
        observations["gripper_width"][:] = 0.08
        with torch.no_grad():
            tensors = {k: torch.from_numpy(v) for k, v in observations.items()}
            return agent.policy.gripper_head(agent.encoder(tensors)).mean(dim=0).numpy()

    plain, conservative = gripper_values(0.0), gripper_values(2.0)
    assert plain[GRIPPER_STAY] < -0.5
    assert max(plain[GRIPPER_OPEN], plain[GRIPPER_CLOSE]) > plain[GRIPPER_STAY]
    assert conservative[GRIPPER_CLOSE] < conservative[GRIPPER_STAY] - 0.5
    assert conservative[GRIPPER_OPEN] < conservative[GRIPPER_STAY] - 0.5
    with pytest.raises(ValueError, match="gripper_critic.conservative_weight"):
        SACConfig(gripper_critic=GripperCriticConfig(enabled=True, conservative_weight=-1.0)).validate()


def test_gripper_exploration_epsilon_is_validated() -> None:
    with pytest.raises(ValueError, match="gripper_critic.exploration_epsilon"):
        SACConfig(gripper_critic=GripperCriticConfig(enabled=True, exploration_epsilon=1.5)).validate()


def test_gripper_critic_learns_to_prefer_the_rewarded_command() -> None:
    """A bandit: closing an open gripper pays 1 (minus the toggle penalty), anything else 0."""
    observation_space, action_space = robot_spaces()
    config = SACConfig(**SMALL, critic_lr=3e-3, gripper_critic=GripperCriticConfig(enabled=True, toggle_penalty=0.1))
    agent = SACAgent(config, observation_space, action_space, seed=0)
    rng = np.random.default_rng(0)
    rows = 64
    for step in range(150):
        batch = random_batch(observation_space, 4, rows, seed=step)
        batch.observations["gripper_width"][:] = 0.08  # open
        batch.actions[:, -1] = rng.choice([-1.0, 1.0], rows)
        batch.rewards = (batch.actions[:, -1] > 0).astype(np.float32)
        batch.terminated = np.ones(rows, np.float32)
        metrics = agent.update(batch)
    assert math.isfinite(metrics["gripper_loss"])
    observations = random_observations(observation_space, 8, np.random.default_rng(1))
    observations["gripper_width"][:] = 0.08
    with torch.no_grad():
        tensors = {k: torch.from_numpy(v) for k, v in observations.items()}
        q = agent.policy.gripper_head(agent.encoder(tensors))
    assert torch.allclose(q[:, GRIPPER_CLOSE], torch.full((8,), 0.9), atol=0.15)
    assert torch.allclose(q[:, GRIPPER_STAY], torch.zeros(8), atol=0.15)
    assert (q.argmax(1) == GRIPPER_CLOSE).all()
    assert all(agent.act(single(observations, row), True)[-1] == 1.0 for row in range(8))


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------


class PointReach(gym.Env):
    """A 2-D point mass; reward = -distance to the goal; 20 steps; the goal is in the observation."""

    def __init__(self) -> None:
        self.observation_space = spaces.Dict({
            "goal": spaces.Box(-1.0, 1.0, (2,), np.float32),
            "position": spaces.Box(-1.0, 1.0, (2,), np.float32),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        self.goal = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        self.steps = 0
        return self._observation(), {}

    def _observation(self) -> dict[str, np.ndarray]:
        return {"goal": self.goal.copy(), "position": self.position.copy()}

    def step(self, action):
        self.position = np.clip(self.position + 0.2 * np.clip(action, -1, 1), -1, 1).astype(np.float32)
        self.steps += 1
        reward = -float(np.linalg.norm(self.position - self.goal))
        return self._observation(), reward, False, self.steps >= 20, {}


def mean_return(env: gym.Env, act, episodes: int = 20, seed: int = 1000) -> float:
    returns = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            observation, reward, terminated, truncated, _ = env.step(act(observation))
            total += reward
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def test_sac_learns_point_reach() -> None:
    env = PointReach()
    config = SACConfig(hidden_dims=(64, 64), batch_size=128, utd_ratio=2, discount=0.9, init_temperature=0.1,
                       actor_lr=1e-3, critic_lr=1e-3, temperature_lr=1e-3)
    agent = SACAgent(config, env.observation_space, env.action_space, seed=0)
    rng = np.random.default_rng(0)
    total_steps, random_steps = 2000, 300
    replay = {
        "observations": {k: np.zeros((total_steps, 2), np.float32) for k in ("goal", "position")},
        "next_observations": {k: np.zeros((total_steps, 2), np.float32) for k in ("goal", "position")},
        "actions": np.zeros((total_steps, 2), np.float32),
        "rewards": np.zeros(total_steps, np.float32),
        "terminated": np.zeros(total_steps, np.float32),
    }
    observation, _ = env.reset(seed=0)
    episode = 0
    for step in range(total_steps):
        action = rng.uniform(-1, 1, 2).astype(np.float32) if step < random_steps else agent.act(observation)
        next_observation, reward, terminated, truncated, _ = env.step(action)
        for key in ("goal", "position"):
            replay["observations"][key][step] = observation[key]
            replay["next_observations"][key][step] = next_observation[key]
        replay["actions"][step], replay["rewards"][step], replay["terminated"][step] = action, reward, terminated
        observation = next_observation
        if terminated or truncated:
            episode += 1
            observation, _ = env.reset(seed=episode)
        if step >= random_steps:
            rows = rng.integers(0, step + 1, config.batch_size * config.utd_ratio)
            agent.update(SimpleNamespace(
                observations={k: v[rows] for k, v in replay["observations"].items()},
                next_observations={k: v[rows] for k, v in replay["next_observations"].items()},
                actions=replay["actions"][rows], rewards=replay["rewards"][rows],
                terminated=replay["terminated"][rows], intervened=np.zeros(len(rows), bool),
            ))

    trained = mean_return(env, lambda o: agent.act(o, deterministic=True))
    random_policy = mean_return(env, lambda o: rng.uniform(-1, 1, 2).astype(np.float32))
    straight_to_goal = mean_return(env, lambda o: np.clip((o["goal"] - o["position"]) / 0.2, -1, 1))
    print(f"point reach mean return: trained {trained:.2f}, random {random_policy:.2f}, "
          f"straight-to-goal {straight_to_goal:.2f}")
    threshold = -6.0
    assert random_policy < threshold < trained
    assert trained > straight_to_goal - 1.5


def test_image_agent_runs_end_to_end_with_two_cameras() -> None:
    observation_space, action_space = robot_spaces(cameras=("front", "wrist"), image_size=32)
    config = SACConfig(**SMALL, utd_ratio=2, image_encoder=ImageEncoderConfig(latent_dim=16, channels=8))
    agent = SACAgent(config, observation_space, action_space, seed=0)
    for seed in range(3):
        metrics = agent.update(random_batch(observation_space, 4, 32, seed=seed))
        assert all(math.isfinite(value) for value in metrics.values()), metrics
    assert {"critic_loss", "actor_loss", "temperature", "q_mean", "entropy"} <= set(metrics)
    torch_batch = batch_to_torch(random_batch(observation_space, 4, 8), "cpu")
    assert torch_batch.observations["images/front"].dtype == torch.uint8
    action = agent.act(single(random_observations(observation_space, 1, np.random.default_rng(0)), 0))
    assert action.shape == (4,) and np.all(np.isfinite(action))


def test_update_rejects_a_batch_that_does_not_split_into_utd_minibatches() -> None:
    observation_space, action_space = robot_spaces()
    agent = SACAgent(SACConfig(**SMALL, utd_ratio=3), observation_space, action_space)
    with pytest.raises(ValueError, match="utd_ratio"):
        agent.update(random_batch(observation_space, 4, 16))


def test_config_target_entropy_and_seeded_construction() -> None:
    observation_space, action_space = robot_spaces()
    assert SACAgent(SACConfig(**SMALL), observation_space, action_space).target_entropy == -2.0
    gripper = SACConfig(**SMALL, gripper_critic=GripperCriticConfig(enabled=True))
    assert SACAgent(gripper, observation_space, action_space).target_entropy == -1.5
    custom = dataclasses.replace(SACConfig(**SMALL), target_entropy=-0.25)
    assert SACAgent(custom, observation_space, action_space).target_entropy == -0.25
    first = SACAgent(SACConfig(**SMALL), observation_space, action_space, seed=5).publish_policy()
    assert first == SACAgent(SACConfig(**SMALL), observation_space, action_space, seed=5).publish_policy()


def test_construction_leaves_the_global_rng_alone() -> None:
    observation_space, action_space = robot_spaces(cameras=("front",))
    state = torch.get_rng_state()
    SACAgent(SACConfig(**SMALL, image_encoder=ImageEncoderConfig(latent_dim=8, channels=4)), observation_space,
             action_space, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
