"""Behavioural tests of learner.replay: frame sharing, chains, wrap-around, validation, files.

Every observation encodes (stream, episode, step) in its state vector and in both images, and every
transition's reward is the serial number of its ``add``; ``Driver`` records the ground truth per
serial so that a sampled transition can be checked exactly: its obs is (s, e, t), its next_obs is
(s, e, t + 1), its terminated flag is the truth, and it has not been evicted.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import threading

import numpy as np
import pytest
from gymnasium import spaces

from learner.replay import Batch, InvalidTransition, ReplayBuffer, ReplayFormatError, concatenate, sample_mixed

SMALL_IMAGE = (8, 8, 3)
ACTION_DIM = 4


def make_space(image_shape: tuple[int, int, int] = SMALL_IMAGE, state_dim: int = 3) -> spaces.Dict:
    return spaces.Dict({
        "state": spaces.Box(-np.inf, np.inf, (state_dim,), np.float32),
        "gripper_width": spaces.Box(0.0, 0.1, (1,), np.float32),
        "images/front": spaces.Box(0, 255, image_shape, np.uint8),
        "images/wrist": spaces.Box(0, 255, image_shape, np.uint8),
    })


def encode(space: spaces.Dict, stream: int, episode: int, step: int) -> dict[str, np.ndarray]:
    state = np.zeros(space["state"].shape, np.float32)
    state[:3] = (stream, episode, step)
    front = np.empty(space["images/front"].shape, np.uint8)
    front[..., 0], front[..., 1], front[..., 2] = stream, episode % 256, step % 256
    return {"state": state, "gripper_width": np.array([0.01 * (step % 10)], np.float32),
            "images/front": front, "images/wrist": 255 - front}


class Driver:
    """Interleaved actor streams with random episode lengths and endings; records the ground truth."""

    def __init__(self, buffer: ReplayBuffer, streams: int = 1, lengths=(5,), seed: int = 0,
                 truncate_probability: float = 0.5, max_adds: int = 100_000) -> None:
        self.buffer = buffer
        self.space = buffer.observation_space
        self.rng = np.random.default_rng(seed)
        self.lengths = lengths
        self.truncate_probability = truncate_probability
        self.serial = 0
        self.truth = np.zeros((max_adds, 4), np.int64)  # stream, episode, step, terminated
        self.state = {s: self._new_episode(s, -1) for s in range(streams)}

    def _new_episode(self, stream: int, previous: int) -> dict:
        episode = previous + 1
        return {"episode": episode, "step": 0, "length": int(self.rng.choice(self.lengths)),
                "truncate": bool(self.rng.random() < self.truncate_probability),
                "obs": encode(self.space, stream, episode, 0)}

    def step(self, stream: int | None = None, lose: bool = False) -> None:
        """One step of ``stream``; with ``lose`` the transition never reaches the buffer."""
        if stream is None:
            stream = int(self.rng.integers(len(self.state)))
        st = self.state[stream]
        next_obs = encode(self.space, stream, st["episode"], st["step"] + 1)
        end = st["step"] + 1 == st["length"]
        if lose and not end:
            st["step"] += 1
            st["obs"] = next_obs
            return
        terminated, truncated = end and not st["truncate"], end and st["truncate"]
        action = np.array([stream / 10, st["step"] / 1000, -0.5, 0.5], np.float32)
        self.buffer.add(st["obs"], action, float(self.serial), next_obs, terminated, truncated,
                        stream_id=stream, intervened=bool(st["step"] % 3 == 0))
        self.truth[self.serial] = (stream, st["episode"], st["step"], terminated)
        self.serial += 1
        if end:
            self.state[stream] = self._new_episode(stream, st["episode"])
        else:
            st["step"] += 1
            st["obs"] = next_obs  # the same object comes back as the next observation, like an actor

    def run(self, adds: int) -> None:
        for _ in range(adds):
            self.step()


def check_batch(batch: Batch, driver: Driver) -> None:
    """Every transition of ``batch`` is a true consecutive pair of one episode, with the right flags."""
    serial = batch.rewards.astype(np.int64)
    assert np.array_equal(serial, batch.rewards), "rewards are serial numbers"
    assert serial.min() >= driver.serial - driver.buffer.capacity, "an evicted transition was sampled"
    assert serial.max() < driver.serial
    truth = driver.truth[serial]
    assert np.array_equal(batch.observations["state"][:, :3], truth[:, :3].astype(np.float32))
    expected_next = truth[:, :3] + np.array([0, 0, 1])
    assert np.array_equal(batch.next_observations["state"][:, :3], expected_next.astype(np.float32))
    for obs, code in ((batch.observations, truth[:, :3]), (batch.next_observations, expected_next)):
        front = obs["images/front"]
        for channel in range(3):
            assert np.all(front[..., channel] == (code[:, channel] % 256)[:, None, None].astype(np.uint8))
        assert np.array_equal(obs["images/wrist"], 255 - front)
    assert np.array_equal(batch.terminated, truth[:, 3].astype(np.float32))
    assert np.array_equal(batch.actions[:, 0], (truth[:, 0] / 10).astype(np.float32))
    assert np.array_equal(batch.intervened, truth[:, 2] % 3 == 0)
    assert batch.terminated.dtype == np.float32 and batch.intervened.dtype == bool
    assert batch.actions.dtype == np.float32 and batch.rewards.dtype == np.float32


def all_valid(buffer: ReplayBuffer, driver: Driver) -> None:
    """Check every valid row (not only a sample), through the public sample path's gather."""
    check_batch(buffer.sample(max(1, 8 * len(buffer))), driver)
    rows = buffer._valid_rows[:len(buffer)]
    assert len(set(rows.tolist())) == len(buffer)
    assert np.all(buffer._valid_pos[rows] == np.arange(len(buffer)))


def snapshot(buffer: ReplayBuffer) -> dict:
    return {"arrays": {k: v.copy() for k, v in buffer._storage_arrays().items()}, "len": len(buffer),
            "counters": dict(buffer.counters), "streams": dict(buffer._streams),
            "cursors": (buffer._cursor, buffer._added, buffer._frame_cursor, buffer._frames_written)}


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["len"] == b["len"] and a["counters"] == b["counters"]
    assert a["streams"] == b["streams"] and a["cursors"] == b["cursors"]
    for key in a["arrays"]:
        assert np.array_equal(a["arrays"][key], b["arrays"][key]), key


def assert_same_contents(a: ReplayBuffer, b: ReplayBuffer) -> None:
    """Identical stored data, counters and chains (the sampling order list may differ)."""
    derived = {"valid_rows", "valid_pos", "slot_refs"}
    for key, array in a._storage_arrays().items():
        if key not in derived:
            assert np.array_equal(array, b._storage_arrays()[key]), key
    assert np.array_equal(a._valid_pos >= 0, b._valid_pos >= 0)
    assert len(a) == len(b) and a.counters == b.counters and a.rejected == b.rejected
    assert a._streams == b._streams
    assert (a._cursor, a._added, a._frame_cursor, a._frames_written) == \
        (b._cursor, b._added, b._frame_cursor, b._frames_written)


# ------------------------------------------------------------------------------------------------
# chains and next_obs
# ------------------------------------------------------------------------------------------------
def test_episode_frames_are_stored_once_and_next_obs_is_correct():
    buffer = ReplayBuffer(make_space(), ACTION_DIM, capacity=100, seed=1)
    driver = Driver(buffer, lengths=(5,), truncate_probability=0.0)
    driver.run(20)  # four terminated episodes of five steps
    assert len(buffer) == 20
    assert buffer.counters["frames_written"] == 4 * 6 and buffer.counters["frames_reused"] == 4 * 4
    assert buffer.counters["chain_mismatches"] == 0
    all_valid(buffer, driver)
    batch = buffer.sample(500)
    last = batch.observations["state"][:, 2] == 4
    assert np.all(batch.terminated[last] == 1.0) and np.all(batch.terminated[~last] == 0.0)


def test_truncation_is_not_terminal_but_breaks_the_chain():
    buffer = ReplayBuffer(make_space(), ACTION_DIM, capacity=100, seed=2)
    driver = Driver(buffer, lengths=(7,), truncate_probability=1.0)
    driver.run(21)
    assert buffer.counters["frames_written"] == 3 * 8
    batch = buffer.sample(1000)
    check_batch(batch, driver)
    assert not batch.terminated.any()
    assert np.any(batch.next_observations["state"][:, 2] == 7)  # the final frame is kept
    assert buffer._truncated[:21].sum() == 3 and not buffer._terminated[:21].any()


def test_mismatched_observation_starts_a_new_chain():
    space = make_space()
    buffer = ReplayBuffer(space, ACTION_DIM, capacity=10)
    action = np.zeros(ACTION_DIM, np.float32)
    buffer.add(encode(space, 0, 0, 0), action, 0.0, encode(space, 0, 0, 1), False, False)
    changed = encode(space, 0, 0, 1)
    changed["images/wrist"][3, 3, 1] ^= 1  # one pixel differs from the remembered next_obs
    buffer.add(changed, action, 1.0, encode(space, 0, 0, 2), False, False)
    assert buffer.counters["chain_mismatches"] == 1 and buffer.counters["frames_written"] == 4
    batch = buffer.sample(64)
    second = batch.rewards == 1.0
    assert np.all(batch.observations["images/wrist"][second][:, 3, 3, 1] == changed["images/wrist"][3, 3, 1])
    buffer.add(encode(space, 0, 0, 2), action, 2.0, encode(space, 0, 0, 3), False, False)
    assert buffer.counters["frames_reused"] == 1  # the chain continues after the fallback


def test_interleaved_streams_keep_their_own_chains():
    buffer = ReplayBuffer(make_space(), ACTION_DIM, capacity=1000, seed=3)
    driver = Driver(buffer, streams=4, lengths=(10, 25), seed=3)
    driver.run(600)
    all_valid(buffer, driver)
    assert buffer.counters["chain_mismatches"] == 0 and buffer.counters["chains_lost"] == 0
    episodes = int(buffer._terminated[:600].sum() + buffer._truncated[:600].sum())
    assert buffer.counters["frames_written"] == 600 + episodes + sum(
        1 for st in driver.state.values() if st["step"] > 0)  # one extra frame per (open) episode


# ------------------------------------------------------------------------------------------------
# wrap-around
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("obs_capacity", [None, 40, 130])
def test_wraparound_never_returns_an_overwritten_frame(obs_capacity):
    buffer = ReplayBuffer(make_space(), ACTION_DIM, capacity=64, seed=4, obs_capacity=obs_capacity)
    driver = Driver(buffer, streams=3, lengths=(1, 2, 3, 30, 60), seed=4)
    for _ in range(40):  # about 30 wraps of the transition ring
        driver.run(50)
        check_batch(buffer.sample(256), driver)
        assert 0 < len(buffer) <= buffer.capacity
    all_valid(buffer, driver)
    if obs_capacity == 40:  # the frame ring is smaller than the transition ring: it invalidates
        assert buffer.counters["invalidated"] > 0 and len(buffer) < 40
    else:
        assert buffer.counters["evicted"] > 0


def test_long_episodes_fill_the_buffer_without_invalidation():
    buffer = ReplayBuffer(make_space(), ACTION_DIM, capacity=200, seed=5)
    driver = Driver(buffer, streams=2, lengths=(60, 80), seed=5)
    for i in range(1000):  # round robin: no transition is lost before it is evicted
        driver.step(i % 2)
    assert len(buffer) == 200 and buffer.counters["invalidated"] == 0
    all_valid(buffer, driver)
    driver.run(1000)  # random interleaving: a stream's frame may wait a few adds before reuse
    assert len(buffer) >= 196
    all_valid(buffer, driver)


@pytest.mark.parametrize("seed", range(6))
def test_random_configurations_keep_the_invariant(seed):
    rng = np.random.default_rng(100 + seed)
    capacity = int(rng.integers(5, 80))
    obs_capacity = int(rng.integers(2, 2 * capacity + 10))
    buffer = ReplayBuffer(make_space(), ACTION_DIM, capacity, seed=seed, obs_capacity=obs_capacity)
    driver = Driver(buffer, streams=int(rng.integers(1, 5)), lengths=(1, 2, 4, 8, 16, 64), seed=seed)
    for i in range(700):
        driver.step(lose=bool(rng.random() < 0.05))  # lost transitions break chains: mismatches
        if i % 37 == 0 and len(buffer):
            check_batch(buffer.sample(64), driver)
    assert buffer.counters["chain_mismatches"] > 0
    assert len(buffer) <= capacity
    all_valid(buffer, driver)


def test_stalled_stream_whose_frame_was_overwritten_restarts_its_chain():
    buffer = ReplayBuffer(make_space(), ACTION_DIM, capacity=32, seed=6)
    driver = Driver(buffer, streams=2, lengths=(1000,), seed=6)
    driver.run(0)
    for _ in range(5):
        driver.step(0)
    for _ in range(3 * buffer.obs_capacity):  # stream 0 stalls while stream 1 wraps the rings
        driver.step(1)
    driver.step(0)
    assert buffer.counters["chains_lost"] == 1
    for _ in range(5):
        driver.step(0)
    all_valid(buffer, driver)


def test_concurrent_add_and_sample():
    buffer = ReplayBuffer(make_space(), ACTION_DIM, capacity=128, seed=7)
    driver = Driver(buffer, streams=2, lengths=(3, 20), seed=7)
    driver.run(10)
    errors: list[BaseException] = []

    def ingest() -> None:
        try:
            driver.run(1500)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    thread = threading.Thread(target=ingest)
    thread.start()
    while thread.is_alive():
        batch = buffer.sample(64)
        serial = batch.rewards.astype(np.int64)
        truth = driver.truth[serial]
        expected_next = (truth[:, :3] + [0, 0, 1]).astype(np.float32)
        assert np.array_equal(batch.next_observations["state"][:, :3], expected_next)
    thread.join()
    assert not errors
    all_valid(buffer, driver)


# ------------------------------------------------------------------------------------------------
# storage
# ------------------------------------------------------------------------------------------------
def test_storage_ratio_for_50_step_image_episodes():
    space = make_space(image_shape=(128, 128, 3), state_dim=21)
    buffer = ReplayBuffer(space, ACTION_DIM, capacity=400, seed=8)
    driver = Driver(buffer, lengths=(50,), seed=8, max_adds=700)
    driver.run(600)  # full and wrapped
    assert len(buffer) == buffer.capacity
    ratio = buffer.nbytes / len(buffer) / buffer.frame_nbytes
    assert ratio <= 1.05, ratio
    check_batch(buffer.sample(64), driver)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def _bad(obs=None, next_obs=None, action=None, reward=None):
    def mutate(space, args):
        for name, change in (("obs", obs), ("next_obs", next_obs), ("action", action), ("reward", reward)):
            if change is not None:
                args[name] = change(args[name])
        return args
    return mutate


def _with(key, value):
    def change(o):
        o = dict(o)
        o[key] = value(o.get(key))
        return o
    return change


def _without(key):
    def change(o):
        return {k: v for k, v in o.items() if k != key}
    return change


BAD_TRANSITIONS = {
    "missing field": (_bad(obs=_without("images/front")), "images/front"),
    "extra field": (_bad(next_obs=_with("bogus", lambda _: np.zeros(1, np.float32))), "bogus"),
    "state shape": (_bad(obs=_with("state", lambda v: np.zeros(4, np.float32))), "state"),
    "state dtype": (_bad(obs=_with("state", lambda v: v.astype(np.float64))), "state"),
    "image dtype": (_bad(obs=_with("images/wrist", lambda v: v.astype(np.float32))), "images/wrist"),
    "image shape": (_bad(next_obs=_with("images/front", lambda v: v[..., 0])), "images/front"),
    "nan in obs": (_bad(obs=_with("state", lambda v: np.array([np.nan, 0, 0], np.float32))), "state"),
    "inf in next_obs": (_bad(next_obs=_with("gripper_width", lambda v: np.array([np.inf], np.float32))),
                        "next_observation field 'gripper_width'"),
    "obs not a mapping": (_bad(obs=lambda o: [1, 2]), "observation"),
    "nan action": (_bad(action=lambda a: np.array([np.nan, 0, 0, 0], np.float32)), "action"),
    "action dtype": (_bad(action=lambda a: a.astype(np.float64)), "action"),
    "action shape": (_bad(action=lambda a: a[:3]), "action"),
    "action range": (_bad(action=lambda a: np.array([1.5, 0, 0, 0], np.float32)), "action"),
    "nan reward": (_bad(reward=lambda r: float("nan")), "reward"),
    "inf reward": (_bad(reward=lambda r: np.float32(-np.inf)), "reward"),
    "reward type": (_bad(reward=lambda r: "1.0"), "reward"),
}


def test_validation_names_the_field_and_leaves_the_buffer_unchanged():
    space = make_space()
    buffer = ReplayBuffer(space, ACTION_DIM, capacity=16, seed=9)
    driver = Driver(buffer, streams=2, lengths=(4, 9), seed=9)
    driver.run(40)
    before = snapshot(buffer)
    reused = buffer.counters["frames_reused"]
    st = driver.state[0]
    for name, (mutate, field) in BAD_TRANSITIONS.items():
        args = mutate(space, {"obs": st["obs"], "next_obs": encode(space, 0, st["episode"], st["step"] + 1),
                              "action": np.zeros(ACTION_DIM, np.float32), "reward": 0.0})
        with pytest.raises(ValueError, match=field.replace("[", r"\[")) as caught:
            buffer.add(args["obs"], args["action"], args["reward"], args["next_obs"], False, False, stream_id=0)
        assert isinstance(caught.value, InvalidTransition), name
        assert_same_snapshot(before, snapshot(buffer))
    assert sum(buffer.rejected.values()) == len(BAD_TRANSITIONS)
    assert buffer.rejected["observation[state]: nonfinite"] == 1
    assert buffer.rejected["next_observation[gripper_width]: nonfinite"] == 1
    driver.step(0)  # the stream's chain survived the rejections
    assert buffer.counters["frames_reused"] == reused + (1 if st["step"] > 0 else 0)
    all_valid(buffer, driver)


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
def test_concatenate_and_len():
    buffer = ReplayBuffer(make_space(), ACTION_DIM, capacity=50, seed=10)
    driver = Driver(buffer, lengths=(6,))
    driver.run(30)
    a, b = buffer.sample(3), buffer.sample(5)
    both = concatenate([a, b])
    assert len(both) == 8 and len(a) == 3
    assert np.array_equal(both.observations["images/front"][3:], b.observations["images/front"])
    assert np.array_equal(both.rewards[:3], a.rewards)
    check_batch(both, driver)
    with pytest.raises(ValueError):
        concatenate([])


def test_sample_from_empty_buffer_raises():
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(make_space(), ACTION_DIM, capacity=4).sample(2)


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def filled_buffer(seed: int = 11, adds: int = 300) -> tuple[ReplayBuffer, Driver]:
    buffer = ReplayBuffer(make_space(), ACTION_DIM, capacity=100, seed=seed)
    driver = Driver(buffer, streams=3, lengths=(2, 15, 40), seed=seed)
    driver.run(adds)  # wrapped, with open chains
    with pytest.raises(ValueError):  # a rejection counter to round-trip
        buffer.add({}, np.zeros(ACTION_DIM, np.float32), 0.0, {}, False, False)
    return buffer, driver


def test_save_load_round_trip_is_identical(tmp_path):
    buffer, driver = filled_buffer()
    path = buffer.save(tmp_path / "replay")
    assert sorted(os.listdir(tmp_path)) == ["replay"]
    loaded = ReplayBuffer.load(path)
    assert_same_contents(buffer, loaded)
    assert_same_contents(buffer, ReplayBuffer.load(path, make_space()))
    assert list(loaded.observation_space.spaces) == list(buffer.observation_space.spaces)
    # both continue identically: the open chains were restored
    driver.buffer = None
    other = copy.deepcopy(driver)
    driver.buffer, other.buffer = buffer, loaded
    driver.run(120)
    other.run(120)
    assert_same_contents(buffer, loaded)
    all_valid(loaded, other)
    with pytest.raises(ValueError, match="observation fields"):
        ReplayBuffer.load(path, make_space(image_shape=(4, 4, 3)))


def test_load_with_a_subset_of_the_saved_fields(tmp_path):
    buffer, driver = filled_buffer()
    path = buffer.save(tmp_path / "replay")
    full = make_space()
    subset = spaces.Dict({k: full[k] for k in ("state", "images/front")})
    loaded = ReplayBuffer.load(path, subset)
    assert list(loaded.observation_space.spaces) == ["images/front", "state"] and len(loaded) == len(buffer)
    for key in subset.spaces:
        assert np.array_equal(loaded._obs[key], buffer._obs[key])
    batch = loaded.sample(256)
    truth = driver.truth[batch.rewards.astype(np.int64)]
    assert np.array_equal(batch.next_observations["state"][:, :3], (truth[:, :3] + [0, 0, 1]).astype(np.float32))
    assert_same_contents(loaded, ReplayBuffer.load(loaded.save(tmp_path / "subset")))


def test_saved_format_reads_with_numpy_alone(tmp_path):
    buffer, driver = filled_buffer()
    path = buffer.save(tmp_path / "replay")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "steerl.replay" and meta["format_version"] == 1
    fields = {f["name"]: f for f in meta["observation_fields"]}
    assert fields["images/front"]["file"] == "obs.images.front.npy"
    valid = np.load(path / "valid.npy", allow_pickle=False)
    rows = np.flatnonzero(valid)[np.argsort(np.load(path / "add_index.npy")[valid])]
    state = np.load(path / fields["state"]["file"], mmap_mode="r")
    obs = state[np.load(path / "obs_index.npy")[rows]]
    next_obs = state[np.load(path / "next_obs_index.npy")[rows]]
    rewards = np.load(path / "rewards.npy")[rows]
    truth = driver.truth[rewards.astype(np.int64)]
    assert np.array_equal(obs, truth[:, :3].astype(np.float32))
    assert np.array_equal(next_obs, (truth[:, :3] + [0, 0, 1]).astype(np.float32))
    assert np.all(np.diff(rewards) > 0)  # oldest first


def test_empty_buffer_round_trip(tmp_path):
    buffer = ReplayBuffer(make_space(), ACTION_DIM, capacity=8)
    loaded = ReplayBuffer.load(buffer.save(tmp_path / "empty"))
    assert len(loaded) == 0 and loaded.capacity == 8
    assert_same_contents(buffer, loaded)


def test_truncated_file_raises_format_error_naming_it(tmp_path):
    buffer, _ = filled_buffer()
    path = buffer.save(tmp_path / "replay")
    actions = path / "actions.npy"
    actions.write_bytes(actions.read_bytes()[: actions.stat().st_size // 2])
    with pytest.raises(ReplayFormatError, match="actions.npy") as caught:
        ReplayBuffer.load(path)
    assert caught.value.path == actions


def test_corrupt_data_and_missing_meta_raise_format_error(tmp_path):
    buffer, _ = filled_buffer()
    path = buffer.save(tmp_path / "replay")
    front = path / "obs.images.front.npy"
    data = bytearray(front.read_bytes())
    data[-5] ^= 0xFF
    front.write_bytes(bytes(data))
    with pytest.raises(ReplayFormatError, match="obs.images.front.npy.*checksum"):
        ReplayBuffer.load(path)
    (path / "meta.json").unlink()
    with pytest.raises(ReplayFormatError, match="meta.json"):
        ReplayBuffer.load(path)


def test_load_falls_back_to_the_previous_good_copy(tmp_path, caplog):
    good, _ = filled_buffer(seed=12)
    newer, _ = filled_buffer(seed=13, adds=400)
    path = newer.save(tmp_path / "replay")
    good.save(tmp_path / "replay.old")  # the state left by a crash before "replay.old" was removed
    rewards = path / "rewards.npy"
    rewards.write_bytes(rewards.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING, logger="steerl.learner.replay"):
        loaded = ReplayBuffer.load(path)
    assert_same_contents(good, loaded)
    assert any(str(rewards) in record.getMessage() for record in caplog.records)


def test_crash_mid_save_does_not_break_loading(tmp_path, caplog):
    first, _ = filled_buffer(seed=14)
    second, _ = filled_buffer(seed=15, adds=350)
    path = first.save(tmp_path / "replay")
    # crash while writing the new copy: a partial .tmp next to the good one
    partial = tmp_path / "replay.tmp"
    partial.mkdir()
    shutil.copy(path / "actions.npy", partial / "actions.npy")
    (partial / "rewards.npy").write_bytes(b"\x93NUMPY")
    assert_same_contents(first, ReplayBuffer.load(path))
    # crash between the two renames: only replay.old and a partial replay.tmp
    os.replace(path, tmp_path / "replay.old")
    with caplog.at_level(logging.WARNING, logger="steerl.learner.replay"):
        assert_same_contents(first, ReplayBuffer.load(path))
    # the next save cleans up and wins
    second.save(path)
    assert sorted(os.listdir(tmp_path)) == ["replay"]
    assert_same_contents(second, ReplayBuffer.load(path))


def test_load_without_any_copy_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.load(tmp_path / "nothing")


def test_sample_mixed_splits_the_demo_share_between_sources_by_size() -> None:
    space = make_space()

    def filled(stream: int, count: int) -> ReplayBuffer:
        buffer = ReplayBuffer(space, 2, 1000, seed=stream)
        for step in range(count):
            buffer.add(encode(space, stream, 0, step), np.zeros(2, np.float32), 0.0, encode(space, stream, 0, step + 1),
                       False, False, stream_id=stream)
        return buffer

    online, demos, interventions, empty = filled(0, 50), filled(1, 300), filled(2, 100), ReplayBuffer(space, 2, 1000)
    batch = sample_mixed(online, [demos, empty, interventions], 64, 0.5, 4, np.random.default_rng(0))
    source = batch.observations["state"][:, 0].astype(int)
    assert len(batch) == 4 * 64 and np.sum(source == 0) == 4 * 32  # exactly half online
    assert 0.65 < np.sum(source == 1) / np.sum(source != 0) < 0.85  # demos : interventions = 3 : 1
    only_online = sample_mixed(online, [empty], 64, 0.5, 2, np.random.default_rng(0))
    assert len(only_online) == 128 and np.all(only_online.observations["state"][:, 0] == 0)
