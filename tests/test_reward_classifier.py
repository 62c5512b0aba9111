"""Reward classifier: labelled frames from the real PyBullet cell, training, the file, the actor wrapper, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from actor.env import make_env
from actor.labelled_frames import (LabelledFrameRecorder, LabelledFrames, LabelledFramesError, SimCollection,
                                   load_labelled_frames, record_sim_success_fail)
from actor.reward_wrapper import ProprioCheck, RewardClassifierWrapper
from hardware_configs.schema import save_config
from learner.reward_classifier import (ClassifierSpec, EncoderSpec, RewardClassifier, RewardClassifierError,
                                       RewardClassifierShapeError, TrainingOptions, describe_metrics,
                                       load_reward_classifier, read_classifier_header, save_reward_classifier,
                                       split_by_episode, train_reward_classifier)
from policies.scripted import ScriptedExpert

from conftest import configure

IMAGE_SIDE = 32
RECORDED_EPISODES = 80
TRAINING_STEPS = 300
# Noisy expert episodes end in success after 3-10 steps; exploring ones wander (and mostly fail).
COLLECTION = SimCollection(expert_share=0.5, expert_noise=0.3, random_action_share=0.7, near_miss_steps=1,
                           failures_per_episode=1)


def reach_config(side: int = IMAGE_SIDE, connection: str = "inproc", max_episode_steps: int = 12):
    """The image reach cell (goal seen by a front and a wrist camera), in-process, with the
    simulator state the scripted expert needs."""
    config = configure("sim_panda_reach_images", cameras=(("front", side, side), ("wrist", side, side)),
                       task__max_episode_steps=max_episode_steps, task__privileged_state=True)
    return dataclasses.replace(config, env=dataclasses.replace(config.env, connection=connection))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread, as the actor runs (tools.session.run_actor): the same numbers on every
    machine, and no thread oversubscription on a busy 2-core one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """Frames recorded on the real PyBullet cell, a classifier trained on them and its file."""
    config = reach_config()
    env = make_env(config)
    try:
        recorder = LabelledFrameRecorder.for_observation_space(env.observation_space, config.name)
        expert = ScriptedExpert(config.robot, noise_std=COLLECTION.expert_noise, seed=0)
        started = time.perf_counter()
        record_sim_success_fail(env, expert.act, recorder, RECORDED_EPISODES, seed=0, settings=COLLECTION)
        record_s = time.perf_counter() - started
    finally:
        env.close()
    directory = recorder.save(tmp_path_factory.mktemp("frames") / "reach")
    data = load_labelled_frames(directory)
    result = train_reward_classifier(data, TrainingOptions(steps=TRAINING_STEPS, seed=0), log_line=lambda line: None)
    path = save_reward_classifier(result.classifier, tmp_path_factory.mktemp("classifier") / "reach.safetensors",
                                  result.summary())
    return SimpleNamespace(config=config, data=data, directory=directory, result=result, path=path,
                           record_s=record_s)


# ------------------------------------------------------------------------------ labelled frames


def test_recorder_writes_a_numpy_only_directory_crash_safely(tmp_path: Path) -> None:
    recorder = LabelledFrameRecorder({"front": (8, 10, 3)}, config_name="cell")
    rng = np.random.default_rng(0)
    for index in range(5):
        recorder.add({"front": rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)}, label=index == 4,
                     source="operator", step=index)
    recorder.end_episode()
    recorder.add_observation({"images/front": np.zeros((8, 10, 3), np.uint8), "tcp_pose": np.zeros(7)},
                             label=True, source="operator")
    with pytest.raises(LabelledFramesError, match=r"camera 'front': expected a uint8 frame of shape \(8, 10, 3\)"):
        recorder.add({"front": np.zeros((8, 10, 3), np.float32)}, label=True, source="operator")
    with pytest.raises(LabelledFramesError, match=r"missing \['front'\], unexpected \['side'\]"):
        recorder.add({"side": np.zeros((8, 10, 3), np.uint8)}, label=True, source="operator")
    assert len(recorder) == 6 and recorder.counts == {"frames": 6, "success": 2, "failure": 4, "episodes": 2}

    target = tmp_path / "marks"
    (tmp_path / "marks.tmp").mkdir()  # a crashed earlier save: cleared, never read
    recorder.save(target)
    recorder.save(target)  # a second snapshot replaces the first
    assert sorted(os.listdir(tmp_path)) == ["marks"]
    assert sorted(os.listdir(target)) == ["episodes.npy", "images.front.npy", "labels.npy", "meta.json",
                                          "sources.npy", "steps.npy"]
    # numpy and json alone read it back
    meta = json.loads((target / "meta.json").read_text())
    assert meta["cameras"] == {"front": {"file": "images.front.npy", "shape": [8, 10, 3]}}
    assert meta["counts"]["success"] == 2 and meta["sources"] == {"operator": 6} and meta["config_name"] == "cell"
    front = np.load(target / "images.front.npy", allow_pickle=False)
    labels = np.load(target / "labels.npy", allow_pickle=False)
    assert front.shape == (6, 8, 10, 3) and front.dtype == np.uint8 and labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert np.load(target / "episodes.npy").tolist() == [0, 0, 0, 0, 0, 1]
    assert np.load(target / "sources.npy", allow_pickle=False).tolist() == ["operator"] * 6

    # a crash between the two renames leaves only marks.old: the loader reads it
    os.replace(target, tmp_path / "marks.old")
    assert len(load_labelled_frames(target)) == 6
    os.replace(tmp_path / "marks.old", target)
    np.save(target / "labels.npy", np.ones(3, bool))
    with pytest.raises(LabelledFramesError, match=r"episodes.npy: holds 6 rows, labels.npy holds 3"):
        load_labelled_frames(target)


def test_sim_recording_holds_both_classes_and_near_misses(trained) -> None:
    data = trained.data
    positives = int(data.labels.sum())
    assert positives >= 30 and len(data) - positives >= 60, data.meta["counts"]
    assert set(data.sources.tolist()) == {"sim_success_flag"}
    assert data.image_shapes == {"front": (IMAGE_SIDE, IMAGE_SIDE, 3), "wrist": (IMAGE_SIDE, IMAGE_SIDE, 3)}
    # every success frame is preceded, in its episode, by a kept near-miss failure frame
    near_misses = 0
    for index in np.flatnonzero(data.labels):
        same_episode = data.episodes == data.episodes[index]
        near_misses += bool(np.any(same_episode & ~data.labels & (data.steps == data.steps[index] - 1)))
    assert near_misses >= 0.8 * positives
    assert data.meta["counts"]["episodes"] == RECORDED_EPISODES


# ------------------------------------------------------------------------------------- training


def test_split_by_episode_keeps_episodes_whole_and_holds_out_both_classes() -> None:
    episodes = np.repeat(np.arange(20), 5)
    labels = np.zeros(100, bool)
    labels[4::5][:12] = True  # episodes 0..11 succeed at their last frame
    train, heldout = split_by_episode(labels, episodes, 0.25, seed=3)
    assert set(episodes[train]).isdisjoint(episodes[heldout])
    assert len(train) + len(heldout) == 100
    assert labels[heldout].any() and not labels[heldout].all()
    assert len(np.unique(episodes[heldout])) == 5  # 3 of 12 successful, 2 of 8 others


def test_balanced_batches_learn_a_rare_class() -> None:
    """5 success frames against 200 failures: the balanced loss still finds them."""
    rng = np.random.default_rng(0)
    count = 205
    labels = np.zeros(count, bool)
    labels[:5] = True
    images = rng.integers(0, 120, (count, 24, 24, 3), dtype=np.uint8)
    images[labels, 8:16, 8:16, 0] = 255  # a red square marks success
    data = LabelledFrames({"front": images}, labels, np.arange(count), np.zeros(count, np.int64),
                          np.full(count, "test"))
    result = train_reward_classifier(data, TrainingOptions(steps=120, batch_size=32, holdout_fraction=0, seed=0),
                                     log_line=lambda line: None)
    assert result.heldout is None
    assert result.train["recall"] == 1.0 and result.train["accuracy"] >= 0.95, result.train


def test_classifier_learns_success_from_real_sim_frames(trained, capsys) -> None:
    heldout = trained.result.heldout
    with capsys.disabled():
        print(f"\n[reward classifier] {len(trained.data)} frames recorded in {trained.record_s:.1f} s, "
              f"{TRAINING_STEPS} steps in {trained.result.seconds:.1f} s; held-out {describe_metrics(heldout)}")
    assert heldout["frames"] >= 20 and trained.result.heldout_episodes
    assert set(trained.result.heldout_episodes).isdisjoint(
        set(np.unique(trained.data.episodes[~np.isin(trained.data.episodes, trained.result.heldout_episodes)])))
    assert heldout["majority_rate"] <= 0.8
    assert heldout["accuracy"] >= 0.85 and heldout["accuracy"] >= heldout["majority_rate"] + 0.1, heldout
    assert heldout["precision"] >= 0.7 and heldout["recall"] >= 0.7, heldout


# ---------------------------------------------------------------------------------------- file


def test_classifier_file_round_trip(trained) -> None:
    raw = trained.path.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and header_length < len(raw)  # a safetensors file, not a pickle
    header = read_classifier_header(trained.path)
    assert header["format"] == "steerl.reward_classifier" and header["threshold"] == 0.5
    assert header["cameras"]["front"] == {"field": "images/front", "shape": [IMAGE_SIDE, IMAGE_SIDE, 3]}
    assert header["encoder"]["kind"] == "small_cnn" and header["encoder"]["frozen"] is True
    assert header["training"]["heldout"]["accuracy"] == trained.result.heldout["accuracy"]

    env = make_env(trained.config)
    try:
        loaded = load_reward_classifier(trained.path, env.observation_space)
    finally:
        env.close()
    frames = {camera: trained.data.images[camera][:50] for camera in loaded.cameras}
    np.testing.assert_allclose(loaded.probabilities(frames), trained.result.classifier.probabilities(frames),
                               atol=1e-6)
    observation = {f"images/{camera}": trained.data.images[camera][3] for camera in loaded.cameras}
    assert abs(loaded.probability(observation) - loaded.probabilities(
        {camera: frames[camera][3:4] for camera in loaded.cameras})[0]) < 1e-6


def test_a_classifier_file_of_the_wrong_shape_is_refused(trained, tmp_path: Path) -> None:
    env = make_env(reach_config(side=48))
    try:
        with pytest.raises(RewardClassifierShapeError) as error:
            load_reward_classifier(trained.path, env.observation_space)
        message = str(error.value)
        assert str(trained.path) in message and "camera 'front'" in message
        assert f"({IMAGE_SIDE}, {IMAGE_SIDE}, 3)" in message and "(48, 48, 3)" in message
        with pytest.raises(RewardClassifierShapeError, match="camera 'front'"):
            RewardClassifierWrapper(env, trained.path)
    finally:
        env.close()

    one_camera = configure("sim_panda_reach_images", cameras=(("wrist", IMAGE_SIDE, IMAGE_SIDE),))
    env = make_env(dataclasses.replace(one_camera, env=dataclasses.replace(one_camera.env, connection="inproc")))
    try:
        with pytest.raises(RewardClassifierShapeError, match=r"camera 'front' \(field 'images/front'\) is not in"):
            load_reward_classifier(trained.path, env.observation_space)
    finally:
        env.close()

    # tensors that do not match their own header (a hand-edited or truncated file)
    spec = ClassifierSpec({"front": (IMAGE_SIDE, IMAGE_SIDE, 3)}, EncoderSpec(channels=4, strides=(2, 2)))
    small = RewardClassifier(spec)
    forged = save_reward_classifier(small, tmp_path / "forged.safetensors")
    header = read_classifier_header(forged)
    header["encoder"]["channels"] = 8
    save_file(load_file(str(forged)), str(forged), metadata={"steerl.reward_classifier": json.dumps(header)})
    with pytest.raises(RewardClassifierError, match=r"forged.safetensors: tensors do not match the header"):
        load_reward_classifier(forged)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_frozen_torchscript_backbone_is_used_and_pinned(tmp_path: Path) -> None:
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2))
    backbone_path = tmp_path / "backbone.pt"
    torch.jit.script(backbone).save(str(backbone_path))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 100, (40, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(40) % 4 == 0
    images[labels] = 250
    data = LabelledFrames({"front": images}, labels, np.arange(40) // 2, np.zeros(40, np.int64), np.full(40, "x"))
    options = TrainingOptions(steps=40, batch_size=16, encoder="pretrained", pretrained_path=str(backbone_path))
    result = train_reward_classifier(data, options, log_line=lambda line: None)
    assert not any(p.requires_grad for p in result.classifier.backbone.parameters())
    path = save_reward_classifier(result.classifier, tmp_path / "c.safetensors")
    header = read_classifier_header(path)
    assert header["encoder"]["kind"] == "pretrained" and header["encoder"]["pretrained_path"] == str(backbone_path)
    assert all(name.startswith(("encoders.front.", "head.")) for name in load_file(str(path)))  # no backbone
    loaded = load_reward_classifier(path)
    np.testing.assert_allclose(loaded.probabilities({"front": images}), result.classifier.probabilities({"front": images}),
                               atol=1e-6)
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(),
                                         torch.nn.AdaptiveAvgPool2d(2))).save(str(backbone_path))
    with pytest.raises(RewardClassifierError, match="backbone .* has sha256"):
        load_reward_classifier(path)


# ------------------------------------------------------------------------------------- wrapper


def test_wrapper_rewards_success_and_ends_the_episode(trained, capsys) -> None:
    config = trained.config
    env = RewardClassifierWrapper(make_env(config), trained.path)
    expert = ScriptedExpert(config.robot, noise_std=COLLECTION.expert_noise, seed=7)
    agree = steps = ended_by_classifier = 0
    try:
        for episode in range(8):
            observation, _ = env.reset(seed=1000 + episode)  # not among the recorded episodes
            while True:
                observation, reward, terminated, truncated, info = env.step(expert.act(observation))
                steps += 1
                assert reward == info["classifier_success"] == info["success"]
                assert 0.0 <= info["classifier_probability"] <= 1.0 and "env_reward" in info
                agree += reward == info["env_success"]
                if info["classifier_success"]:
                    assert terminated and not truncated
                    ended_by_classifier += 1
                if terminated or truncated:
                    break
        with capsys.disabled():
            print(f"\n[reward classifier wrapper] reward agrees with the simulator's success on {agree}/{steps} "
                  f"steps; classifier {env.mean_latency_ms:.2f} ms per step on CPU (1 thread)")
    finally:
        env.close()
    assert ended_by_classifier >= 5
    assert agree >= 0.85 * steps


def test_session_applies_the_configured_classifier_under_the_operator(trained) -> None:
    from rich.console import Console

    from actor.intervention import InterventionWrapper
    from tools.session import attach_reward_classifier, attach_teleop

    config = dataclasses.replace(trained.config, actor=dataclasses.replace(
        trained.config.actor, reward_classifier=str(trained.path), reward_threshold=0.7,
        reward_proprio_checks=("gripper_width[0] > 0.01",), teleop="simulated_operator"))
    console = Console(quiet=True)
    env = attach_teleop(config, attach_reward_classifier(config, make_env(config), console), console)
    try:
        assert isinstance(env, InterventionWrapper) and isinstance(env.env, RewardClassifierWrapper)
        assert env.env.threshold == 0.7 and len(env.env.checks) == 1
        env.reset(seed=0)
        info = env.step(np.zeros(env.action_space.shape, np.float32))[4]
        assert {"classifier_probability", "env_success", "intervened"} <= set(info)
    finally:
        env.close()
    unchanged = make_env(trained.config)
    try:
        assert attach_reward_classifier(trained.config, unchanged, Console(quiet=True)) is unchanged
    finally:
        unchanged.close()


def test_wrapper_threshold_and_proprioceptive_checks(trained) -> None:
    env = make_env(trained.config)
    try:
        always = RewardClassifierWrapper(env, trained.result.classifier, threshold=0.0)
        always.reset(seed=5)
        _, reward, terminated, truncated, info = always.step(np.zeros(4, np.float32))
        assert (reward, terminated, truncated) == (1.0, True, False)
        assert info["env_success"] == 0.0 and info["classifier_latency_ms"] > 0

        # a classifier that always says yes, vetoed by the gripper check: the episode runs to its limit
        vetoed = RewardClassifierWrapper(env, trained.path, threshold=0.0, proprio_check="gripper_width[0] < -1")
        vetoed.reset(seed=5)
        rewards = []
        for _ in range(trained.config.robot.task.max_episode_steps):
            _, reward, terminated, truncated, _ = vetoed.step(np.zeros(4, np.float32))
            rewards.append(reward)
            if terminated or truncated:
                break
        assert truncated and not terminated and set(rewards) == {0.0}

        check = ProprioCheck.parse("tcp_pose[2] > 0.1")
        assert check == ProprioCheck("tcp_pose", 2, above=0.1) and str(check) == "tcp_pose[2] > 0.1"
        assert check({"tcp_pose": np.array([0, 0, 0.2, 0, 0, 0, 1])})
        with pytest.raises(ValueError, match="no field 'gripper'"):
            RewardClassifierWrapper(env, trained.path, proprio_check="gripper[0] < 0.05")
        with pytest.raises(ValueError, match="'tcp_pose' has 7 elements, index 9"):
            RewardClassifierWrapper(env, trained.path, proprio_check=ProprioCheck("tcp_pose", 9, below=1.0))
        with pytest.raises(ValueError, match="expected 'FIELD"):
            ProprioCheck.parse("gripper_width is small")
        callable_check = RewardClassifierWrapper(env, trained.path, threshold=0.0, proprio_check=lambda obs: False)
        callable_check.reset(seed=6)
        assert callable_check.step(np.zeros(4, np.float32))[1] == 0.0
    finally:
        env.close()


# ----------------------------------------------------------------------------------------- CLI


def _steerl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "120", "OMP_NUM_THREADS": "1"})


def test_cli_records_frames_and_trains_a_classifier(tmp_path: Path) -> None:
    config_file = save_config(reach_config(side=24, max_episode_steps=8), tmp_path / "cell.yaml")
    frames = tmp_path / "frames"
    record = _steerl("record-success-fail", "--config", str(config_file), "--episodes", "8", "--out", str(frames),
                     "--expert-share", "0.75")
    assert record.returncode == 0, record.stdout[-2000:] + record.stderr[-2000:]
    assert f"from 8 episodes into {frames}" in record.stdout
    meta = json.loads((frames / "meta.json").read_text())
    assert meta["counts"]["success"] >= 1 and meta["recording"]["expert_share"] == 0.75
    assert meta["cameras"]["wrist"]["shape"] == [24, 24, 3]

    out = tmp_path / "classifier.safetensors"
    train = _steerl("train-reward-classifier", "--data", str(frames), "--out", str(out), "--steps", "20",
                    "--holdout", "0.3", "--seed", "1", "--threads", "1")
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert "held-out accuracy" in train.stdout and "predicted success" in train.stdout
    assert read_classifier_header(out)["training"]["options"]["steps"] == 20

    bad = _steerl("train-reward-classifier", "--data", str(tmp_path / "nothing"), "--out", str(out))
    assert bad.returncode == 2 and "nothing/meta.json" in bad.stderr and "Traceback" not in bad.stderr
    for command in ("record-success-fail", "train-reward-classifier"):
        usage = _steerl(command, "--help")
        assert usage.returncode == 0 and f"usage: steerl {command}" in usage.stdout
