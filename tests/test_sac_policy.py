"""policies.sac_policy: the SAC actor behind the Policy interface (sampling, files, checkpoints)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from gymnasium import spaces

from hardware_configs.schema import GripperCriticConfig, ImageEncoderConfig, SACConfig, load_config
from policies.base import POLICY_FILE, WEIGHTS_FILE, load_policy
from policies.sac_policy import SACPolicy
from transport.spaces import RobotSpaces

from conftest import free_tcp_address

torch.set_num_threads(1)

STATE_SPACE = spaces.Dict({
    "tcp_pose": spaces.Box(-1.0, 1.0, (7,), np.float32),
    "task/goal_xyz": spaces.Box(-1.0, 1.0, (3,), np.float32),
    "unused": spaces.Box(-1.0, 1.0, (2,), np.float32),
})
IMAGE_SPACE = spaces.Dict({
    "tcp_pose": spaces.Box(-1.0, 1.0, (7,), np.float32),
    "gripper_width": spaces.Box(0.0, 0.08, (1,), np.float32),
    "images/wrist": spaces.Box(0, 255, (16, 16, 3), np.uint8),
})
ACTION_SPACE = spaces.Box(-1.0, 1.0, (4,), np.float32)
SMALL = SACConfig(hidden_dims=(32, 32))
WITH_GRIPPER_AND_IMAGES = dataclasses.replace(
    SMALL, gripper_critic=GripperCriticConfig(enabled=True),
    image_encoder=ImageEncoderConfig(channels=4, latent_dim=8, strides=(2, 2)),
)
CASES = {
    "state": (SMALL, STATE_SPACE, ("tcp_pose", "task/goal_xyz")),
    "gripper_critic_and_camera": (WITH_GRIPPER_AND_IMAGES, IMAGE_SPACE, ()),
}


def _batch(space: spaces.Dict, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {}
    for key, box in space.spaces.items():
        if box.dtype == np.uint8:
            batch[key] = rng.integers(0, 256, (size, *box.shape), dtype=np.uint8)
        else:
            batch[key] = rng.uniform(box.low, box.high, (size, *box.shape)).astype(np.float32)
    return batch


def _policy(case: str, seed: int = 0) -> SACPolicy:
    config, space, keys = CASES[case]
    torch.manual_seed(seed)
    return SACPolicy(config, space, ACTION_SPACE, keys, seed=seed)


@pytest.mark.parametrize("case", sorted(CASES))
def test_samples_have_shape_b_k_a_and_lie_in_the_action_box(case) -> None:
    policy = _policy(case)
    batch = _batch(CASES[case][1], 3)
    for observations in (batch, {key: torch.from_numpy(value) for key, value in batch.items()}):
        for deterministic in (False, True):
            actions = policy.sample(observations, 5, deterministic=deterministic)
            assert actions.shape == (3, 5, 4) and actions.dtype == torch.float32
            assert torch.all(actions.abs() <= 1.0)
    stochastic = policy.sample(batch, 5)
    assert not torch.allclose(stochastic[:, 0, :3], stochastic[:, 1, :3]), "K stochastic samples should differ"
    assert policy.act({key: value[0] for key, value in batch.items()}).shape == (4,)


@pytest.mark.parametrize("case", sorted(CASES))
def test_deterministic_sampling_repeats_tanh_of_the_mean_k_times(case) -> None:
    policy = _policy(case)
    batch = _batch(CASES[case][1], 4, seed=1)
    actions = policy.sample(batch, 6, deterministic=True)
    assert torch.equal(actions, actions[:, :1].expand_as(actions))
    for index in range(4):
        expected = policy.module.act({key: value[index] for key, value in batch.items()}, deterministic=True)
        np.testing.assert_allclose(actions[index, 0].numpy(), expected, rtol=0, atol=1e-6)


def test_unknown_fields_are_ignored_and_missing_ones_are_named() -> None:
    policy = _policy("state")
    batch = _batch(STATE_SPACE, 2)
    assert policy.observation_keys == ("task/goal_xyz", "tcp_pose")
    del batch["unused"]
    policy.sample(batch, 1)
    del batch["tcp_pose"]
    with pytest.raises(KeyError, match="tcp_pose"):
        policy.sample(batch, 1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_then_load_policy_gives_identical_samples(case, tmp_path) -> None:
    policy = _policy(case, seed=3)
    states = policy.module.encoder.state_vector(_batch(CASES[case][1], 64, seed=5)) * 3.0 + 1.0
    policy.module.encoder.set_state_normalization(states, min_std=0.01)
    policy.save(tmp_path / "sac")
    assert json.loads((tmp_path / "sac" / POLICY_FILE).read_text())["kind"] == "sac"

    loaded = load_policy(tmp_path / "sac")
    assert isinstance(loaded, SACPolicy) and loaded.action_dim == 4
    assert torch.equal(loaded.module.encoder.state_mean, policy.module.encoder.state_mean)
    batch = _batch(CASES[case][1], 3, seed=2)
    reference = _policy(case, seed=3)  # a fresh generator with the saved seed
    reference.module.load_state_dict(policy.module.state_dict())
    assert torch.equal(loaded.sample(batch, 4), reference.sample(batch, 4))
    assert torch.equal(loaded.sample(batch, 4, deterministic=True), policy.sample(batch, 4, deterministic=True))


def test_a_policy_file_of_another_kind_is_refused_naming_the_file(tmp_path) -> None:
    _policy("state").save(tmp_path)
    path = tmp_path / POLICY_FILE
    content = json.loads(path.read_text())
    path.write_text(json.dumps({**content, "kind": "diffusion"}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: kind 'diffusion' is not 'sac'")):
        SACPolicy.load(tmp_path)
    path.write_text(json.dumps({**content, "kind": "no-such-kind"}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: unknown policy kind 'no-such-kind'")):
        load_policy(tmp_path)


def test_missing_or_mismatched_weights_are_refused_naming_the_file(tmp_path) -> None:
    _policy("state").save(tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{weights}: missing")):
        load_policy(tmp_path)

    # policy.json says 3 action dimensions; the weights were made for 4.
    _policy("state").save(tmp_path)
    path = tmp_path / POLICY_FILE
    content = json.loads(path.read_text())
    content["spaces"]["action"]["shape"] = [3]
    content.pop("action_dim")
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=re.escape(f"{weights}: tensor shapes do not match")):
        load_policy(tmp_path)


def test_from_checkpoint_wraps_the_policy_steerl_eval_loads(tmp_path) -> None:
    from learner.learner import CheckpointError, Learner, load_policy_from_checkpoint

    config = load_config("sim_panda_reach")
    learner_config = dataclasses.replace(
        config.learner, sac=dataclasses.replace(config.learner.sac, hidden_dims=(32, 32)), num_threads=1,
        address=free_tcp_address(), replay_capacity=1000, intervention_capacity=100,
        observation_keys=("tcp_pose", "task/goal_xyz"))
    config = dataclasses.replace(config, learner=learner_config, seed=7)
    robot_spaces = RobotSpaces.from_gym(STATE_SPACE, ACTION_SPACE)  # the robot serves one field more
    learner = Learner(config, tmp_path / "run", spaces=robot_spaces)
    try:
        assert learner.agent is not None
        learner.agent.fit_state_normalization([_batch(STATE_SPACE, 32)])
        learner.checkpoint()
    finally:
        learner.close()
    torch.set_num_threads(1)  # the learner set its own thread count

    policy = SACPolicy.from_checkpoint(tmp_path / "run")
    reference, _ = load_policy_from_checkpoint(config, tmp_path / "run")
    assert policy.seed == 7 and policy.config == config.learner.sac
    assert policy.observation_keys == ("task/goal_xyz", "tcp_pose")
    assert not torch.equal(policy.module.encoder.state_std, torch.ones(10)), "the statistics travel along"
    batch = _batch(STATE_SPACE, 3, seed=4)
    actions = policy.sample(batch, 2, deterministic=True)
    for index in range(3):
        expected = reference.act({key: value[index] for key, value in batch.items()}, deterministic=True)
        np.testing.assert_allclose(actions[index, 1].numpy(), expected, rtol=0, atol=1e-6)

    policy.save(tmp_path / "exported")  # a checkpoint's policy becomes a deployable policy directory
    assert torch.equal(load_policy(tmp_path / "exported").sample(batch, 2, deterministic=True), actions)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nothing"))):
        SACPolicy.from_checkpoint(tmp_path / "nothing")
