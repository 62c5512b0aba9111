"""Replay buffer for the learner: each observation frame stored once, ring wrap-around, crash-safe files.

Design
======

**Frames and transitions.** A transition is ``(obs, action, reward, next_obs, terminated,
intervened)``. Within an episode the ``next_obs`` of step *t* is the ``obs`` of step *t + 1*, so
storing both per transition would keep every camera image twice. Instead the buffer has two rings:

- the *frame ring*: ``obs_capacity`` observation slots, one preallocated array per observation
  field (``[obs_capacity, *shape]``), written in order by a cursor;
- the *transition ring*: ``capacity`` rows of ``obs_index``, ``next_obs_index`` (slot numbers in
  the frame ring), ``action``, ``reward``, ``terminated``, ``truncated``, ``intervened``,
  ``stream_id``, written in order by a second cursor.

All storage is allocated up front with ``np.zeros`` (``nbytes`` counts it all); the operating
system commits the pages on first write, so the first fill of a large buffer page-faults.

**Chains.** Transitions arrive from several actor streams (``stream_id``), in order within a
stream and interleaved across streams. For each stream the buffer remembers the slot that its last
``next_obs`` went into (and that slot's write generation). When the stream's next ``add`` comes,
its ``observation`` is compared with that slot (every field, ``np.array_equal``); if equal the slot
is reused as the new transition's ``obs_index`` and only ``next_observation`` is written, to a
fresh slot. If it differs (a lost step, an unannounced reset) or the slot has been overwritten
meanwhile, the observation gets a slot of its own: the chain restarts, nothing is wrong in the data.
When an episode ends (``terminated`` or ``truncated``) the final ``next_obs`` has its own slot and
the stream's next ``add`` starts a fresh chain. An episode of *L* steps therefore uses *L + 1*
slots, so a full buffer costs ``(L + 1) / L`` observations per transition (1.02 for *L* = 50), plus
about 100 bytes of bookkeeping. Time-limit truncations are stored with ``terminated = 0`` (the
learner bootstraps through them) and ``truncated = 1``.

**Wrap-around invariant.** *Every transition that ``sample`` can return references slots that
still hold the very frames it was written with.* Overwriting an old transition row evicts it;
overwriting a frame slot invalidates the (at most two) transitions that reference it: the one that
wrote the slot and the one that reused it as its ``obs``. Both rings keep their own cursor, and a
dense list of valid transition rows (with each row's position in it) makes eviction, invalidation
and uniform sampling O(1) per transition; ``sample`` draws row numbers from that list and gathers
with numpy fancy indexing, without a Python loop per item. The default ``obs_capacity`` is
``capacity + ceil(0.02 * capacity) + 8``: with episodes of 50 steps or more (and streams
interleaved so that a stream's last frame waits at most a few adds before it is reused) the frame
ring wraps no faster than the transition ring and nothing is invalidated before it is evicted; with
shorter episodes the frame ring wraps first and the oldest transitions are dropped early (``len`` is
then below ``capacity``: about ``capacity * 1.02 * L / (L + 1)``). Pass ``obs_capacity`` to trade
memory for length.

**Validation.** ``add`` checks everything before it touches storage: the observation keys, every
field's shape and dtype (exact; no silent casts), NaN/inf in float fields, the action (float32,
shape ``(action_dim,)``, finite, within [-1, 1]) and the reward (finite real scalar). A bad
transition raises :class:`InvalidTransition` (a ``ValueError`` whose message names the field),
counts a reason in ``self.rejected`` (a ``Counter``, e.g. ``"observation[tcp_pose]: nonfinite"``)
and leaves the buffer unchanged.

``add``, ``sample``, ``save`` and ``len`` hold one internal lock, so an ingest thread and the
training loop may share a buffer (``save`` holds it while it writes).

On-disk format (version 1)
==========================

``buffer.save(path)`` writes a directory readable with numpy and json alone (never pickle)::

    path/
      meta.json              # see below
      obs.<field>.npy        # one per observation field: [S, *shape], field dtype; slot s = frame s
      slot_generation.npy    # int64 [S]: serial number of the frame write that filled slot s
      obs_index.npy          # int64 [T]: slot of each transition's observation
      next_obs_index.npy     # int64 [T]: slot of each transition's next observation
      actions.npy            # float32 [T, action_dim]
      rewards.npy            # float32 [T]
      terminated.npy         # bool [T]: true terminal (no bootstrap)
      truncated.npy          # bool [T]: time-limit end of episode (terminated is false then)
      intervened.npy         # bool [T]: a human overrode the policy on this step
      stream_id.npy          # int64 [T]: actor stream that sent the transition
      add_index.npy          # int64 [T]: serial number of the add() that wrote the row (its age)
      valid.npy              # bool [T]: row is sampleable (not invalidated by a frame overwrite)

``S = min(frames_written, obs_capacity)`` and ``T = min(transitions_added, capacity)``: only the
part of the rings ever written is saved. ``<field>`` is the field name with characters other than
letters, digits, ``_`` and ``-`` replaced by ``.`` (``images/front`` -> ``obs.images.front.npy``);
``meta.json`` holds the exact mapping. ``meta.json`` keys:

- ``format`` (``"steerl.replay"``), ``format_version`` (1), ``capacity``, ``obs_capacity``,
  ``action_dim``;
- ``transitions_added``, ``transition_cursor`` (next row to write = ``transitions_added %
  capacity``), ``frames_written``, ``frame_cursor`` (``frames_written % obs_capacity``),
  ``num_valid``;
- ``observation_fields``: list of ``{"name", "file", "dtype", "shape", "low", "high"}`` (``shape``
  of one frame; ``low``/``high`` a number when uniform, else nested lists), in space order;
- ``files``: ``{file name: {"dtype", "shape", "crc32"}}`` for every ``.npy``; ``crc32`` is
  ``zlib.crc32`` of the array's data bytes in C order (``zlib.crc32(np.load(f))``);
- ``streams``: list of ``{"stream_id", "slot", "slot_generation"}``: open chains (the slot holding
  the stream's last next_obs; stale if ``slot_generation`` no longer matches);
- ``counters`` (``frames_written``, ``frames_reused``, ``chain_mismatches``, ``chains_lost``,
  ``invalidated``, ``evicted``, ``discarded``: rows made unsampleable by
  :meth:`ReplayBuffer.discard`), ``rejected`` (reason -> count), ``saved_at``, ``numpy_version``.

Reading it in a notebook::

    meta = json.load(open(f"{path}/meta.json"))
    valid = np.load(f"{path}/valid.npy")
    rows = np.flatnonzero(valid)[np.argsort(np.load(f"{path}/add_index.npy")[valid])]  # oldest first
    front = np.load(f"{path}/obs.images.front.npy", mmap_mode="r")
    obs_front = front[np.load(f"{path}/obs_index.npy")[rows]]
    next_front = front[np.load(f"{path}/next_obs_index.npy")[rows]]

**Crash safety.** ``save`` writes everything into the sibling ``path.tmp`` (each file fsynced,
``meta.json`` last), then renames ``path`` to ``path.old``, renames ``path.tmp`` to ``path``
(``os.replace``), fsyncs the parent directory and only then removes ``path.old``. A crash at any
point leaves either ``path`` or ``path.old`` complete; a leftover ``path.tmp`` is never read and is
cleared by the next save. ``ReplayBuffer.load(path, observation_space=None)`` restores the buffer (with a space given, only
its fields are read: they must be saved with the same shapes and dtypes; other saved fields are
skipped, so demos recorded with more fields load into a learner that uses fewer). It checks
``meta.json``, every file's header
(dtype, shape), size and checksum and the index structure; a bad file raises
:class:`ReplayFormatError` naming it, unless ``path.old`` exists and loads, in which case a warning
names the corrupt path and the previous copy is returned. Demonstrations are simply a saved buffer.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import operator
import os
import re
import threading
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces

from learner.durable import sibling_paths, write_directory_atomically, write_durably

log = logging.getLogger("steerl.learner.replay")

FORMAT_NAME = "steerl.replay"
FORMAT_VERSION = 1
OBS_MARGIN_FRACTION = 0.02
OBS_MARGIN_SLOTS = 8
ACTION_LIMIT = 1.0 + 1e-6
COUNTER_NAMES = ("frames_written", "frames_reused", "chain_mismatches", "chains_lost", "invalidated",
                 "evicted", "discarded")
TRANSITION_FILES = {  # file stem -> dtype; one row per transition ([T], actions [T, action_dim])
    "obs_index": "int64",
    "next_obs_index": "int64",
    "actions": "float32",
    "rewards": "float32",
    "terminated": "bool",
    "truncated": "bool",
    "intervened": "bool",
    "stream_id": "int64",
    "add_index": "int64",
    "valid": "bool",
}


class ReplayFormatError(Exception):
    """A saved replay buffer is missing a file, truncated, corrupt or inconsistent."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class InvalidTransition(ValueError):
    """``add`` refused a transition; ``reason`` is the key counted in ``ReplayBuffer.rejected``."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """A batch of B transitions (numpy arrays, first axis B)."""

    observations: dict[str, np.ndarray]
    actions: np.ndarray  # float32 [B, A]
    rewards: np.ndarray  # float32 [B]
    next_observations: dict[str, np.ndarray]
    terminated: np.ndarray  # float32 [B]; 1.0 = true terminal, time-limit truncations are 0.0
    intervened: np.ndarray  # bool [B]

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


def concatenate(batches: list[Batch]) -> Batch:
    """One batch of all transitions of ``batches``, in order (e.g. RLPD's demo + online halves)."""
    if not batches:
        raise ValueError("concatenate needs at least one batch")
    keys = list(batches[0].observations)
    for batch in batches[1:]:
        if list(batch.observations) != keys or list(batch.next_observations) != keys:
            raise ValueError(f"batches have different observation fields: {keys} vs {list(batch.observations)}")

    def cat(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays, axis=0)

    return Batch(
        observations={k: cat([b.observations[k] for b in batches]) for k in keys},
        actions=cat([b.actions for b in batches]),
        rewards=cat([b.rewards for b in batches]),
        next_observations={k: cat([b.next_observations[k] for b in batches]) for k in keys},
        terminated=cat([b.terminated for b in batches]),
        intervened=cat([b.intervened for b in batches]),
    )


def sample_mixed(online: "ReplayBuffer", demo_sources: list["ReplayBuffer"], batch_size: int, demo_ratio: float,
                 minibatches: int, rng: np.random.Generator) -> Batch:
    """``minibatches`` stacked minibatches of ``batch_size`` rows: ``round(batch_size * demo_ratio)``
    rows from the non-empty ``demo_sources`` (split between them in proportion to their sizes,
    drawn per minibatch) and the rest from ``online`` (RLPD's symmetric sampling)."""
    sources = [buffer for buffer in demo_sources if len(buffer)]
    demo_rows = int(round(batch_size * demo_ratio)) if sources else 0
    shares = np.array([len(buffer) for buffer in sources], dtype=np.float64)
    parts = []
    for _ in range(minibatches):
        if demo_rows:
            counts = rng.multinomial(demo_rows, shares / shares.sum())
            parts += [buffer.sample(int(count)) for buffer, count in zip(sources, counts) if count]
        parts.append(online.sample(batch_size - demo_rows))
    return concatenate(parts)


# ------------------------------------------------------------------------------------------------
# the buffer
# ------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Uniform replay over transitions from interleaved actor streams; see the module docstring."""

    def __init__(self, observation_space: spaces.Dict, action_dim: int, capacity: int, seed: int = 0,
                 *, obs_capacity: int | None = None) -> None:
        if not isinstance(observation_space, spaces.Dict):
            raise TypeError(f"observation_space must be a gymnasium spaces.Dict, got {type(observation_space)}")
        if capacity < 1 or action_dim < 1:
            raise ValueError(f"capacity and action_dim must be >= 1, got {capacity} and {action_dim}")
        if obs_capacity is None:
            obs_capacity = capacity + math.ceil(OBS_MARGIN_FRACTION * capacity) + OBS_MARGIN_SLOTS
        if obs_capacity < 2:
            raise ValueError(f"obs_capacity must be >= 2, got {obs_capacity}")
        self.observation_space = observation_space
        self.action_dim = int(action_dim)
        self.capacity = int(capacity)
        self.obs_capacity = int(obs_capacity)
        self._fields = _field_specs(observation_space)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.RLock()
        self.rejected: Counter[str] = Counter()
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTER_NAMES})
        self._allocate()

    def _allocate(self) -> None:
        m, c = self.obs_capacity, self.capacity
        # frame ring
        self._obs = {k: np.zeros((m, *shape), dtype) for k, (shape, dtype) in self._fields.items()}
        self._slot_generation = np.full(m, -1, np.int64)
        self._slot_refs = np.full((m, 2), -1, np.int64)  # transition rows referencing each slot
        self._frame_cursor = 0
        self._frames_written = 0
        # transition ring
        self._obs_index = np.zeros(c, np.int64)
        self._next_obs_index = np.zeros(c, np.int64)
        self._actions = np.zeros((c, self.action_dim), np.float32)
        self._rewards = np.zeros(c, np.float32)
        self._terminated = np.zeros(c, bool)
        self._truncated = np.zeros(c, bool)
        self._intervened = np.zeros(c, bool)
        self._stream_id = np.zeros(c, np.int64)
        self._add_index = np.full(c, -1, np.int64)
        self._cursor = 0
        self._added = 0
        # dense list of valid rows: _valid_rows[:_num_valid]; _valid_pos[row] = position or -1
        self._valid_rows = np.zeros(c, np.int64)
        self._valid_pos = np.full(c, -1, np.int64)
        self._num_valid = 0
        # open chains: stream_id -> (slot of its last next_obs, that slot's generation)
        self._streams: dict[int, tuple[int, int]] = {}

    # -- sizes ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._num_valid

    @property
    def transitions_added(self) -> int:
        return self._added

    @property
    def frame_nbytes(self) -> int:
        """Bytes of one observation (all fields)."""
        return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in self._fields.values())

    @property
    def nbytes(self) -> int:
        """Bytes of all preallocated storage (frames, transitions and bookkeeping)."""
        return sum(a.nbytes for a in self._storage_arrays().values())

    def _storage_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"obs/{k}": a for k, a in self._obs.items()}
        arrays.update(slot_generation=self._slot_generation, slot_refs=self._slot_refs,
                      obs_index=self._obs_index, next_obs_index=self._next_obs_index, actions=self._actions,
                      rewards=self._rewards, terminated=self._terminated, truncated=self._truncated,
                      intervened=self._intervened, stream_id=self._stream_id, add_index=self._add_index,
                      valid_rows=self._valid_rows, valid_pos=self._valid_pos)
        return arrays

    def __repr__(self) -> str:
        return (f"ReplayBuffer({len(self)}/{self.capacity} transitions, {self.obs_capacity} frame slots, "
                f"{self.nbytes / 2**20:.1f} MiB, fields={list(self._fields)})")

    # -- add --------------------------------------------------------------------------------------
    def add(self, observation: Mapping[str, np.ndarray], action: np.ndarray, reward: float,
            next_observation: Mapping[str, np.ndarray], terminated: bool, truncated: bool,
            stream_id: int = 0, intervened: bool = False) -> int:
        """Store one transition of stream ``stream_id``; raises :class:`InvalidTransition` if bad.
        Returns the add's serial number (its ``add_index``; :meth:`discard` takes it back)."""
        with self._lock:
            try:
                obs = self._check_observation("observation", observation)
                next_obs = self._check_observation("next_observation", next_observation)
                action_array = self._check_action(action)
                reward_value = _check_reward(reward)
                stream = _check_stream(stream_id)
            except InvalidTransition as error:
                self.rejected[error.reason] += 1
                raise
            self._insert(obs, action_array, reward_value, next_obs, bool(terminated), bool(truncated), stream,
                         bool(intervened))
            return self._added - 1

    def discard(self, add_indices: Iterable[int]) -> int:
        """Make the transitions written by these adds (serial numbers returned by :meth:`add`)
        unsampleable, e.g. an episode the operator threw away. Rows already evicted or overwritten
        by a later add, and rows already invalid, are skipped. Returns how many were discarded
        (counted in ``counters["discarded"]``)."""
        discarded = 0
        with self._lock:
            for add_index in add_indices:
                add_index = int(add_index)
                if add_index < 0 or add_index >= self._added:
                    continue
                row = add_index % self.capacity
                if self._add_index[row] == add_index and self._valid_pos[row] >= 0:
                    self._invalidate(row)
                    discarded += 1
            self.counters["discarded"] += discarded
        return discarded

    def _check_observation(self, which: str, observation: Any) -> dict[str, np.ndarray]:
        if not isinstance(observation, Mapping):
            raise InvalidTransition(f"{which}: type", f"{which} must be a mapping of field name to array, "
                                                      f"got {type(observation).__name__}")
        missing = [k for k in self._fields if k not in observation]
        if missing:
            raise InvalidTransition(f"{which}[{missing[0]}]: missing", f"{which} is missing field(s) {missing}")
        extra = sorted(str(k) for k in observation if k not in self._fields)
        if extra:
            raise InvalidTransition(f"{which}[{extra[0]}]: unexpected", f"{which} has unexpected field(s) {extra}")
        checked = {}
        for key, (shape, dtype) in self._fields.items():
            value = np.asarray(observation[key])
            where = f"{which}[{key}]"
            if value.dtype != dtype:
                raise InvalidTransition(f"{where}: dtype",
                                        f"{which} field {key!r}: dtype {value.dtype}, expected {dtype}")
            if value.shape != shape:
                raise InvalidTransition(f"{where}: shape",
                                        f"{which} field {key!r}: shape {value.shape}, expected {shape}")
            if dtype.kind == "f" and not np.isfinite(value).all():
                raise InvalidTransition(f"{where}: nonfinite", f"{which} field {key!r} contains NaN or inf")
            checked[key] = value
        return checked

    def _check_action(self, action: Any) -> np.ndarray:
        value = np.asarray(action)
        if value.dtype != np.float32:
            raise InvalidTransition("action: dtype", f"action: dtype {value.dtype}, expected float32")
        if value.shape != (self.action_dim,):
            raise InvalidTransition("action: shape", f"action: shape {value.shape}, expected ({self.action_dim},)")
        if not np.isfinite(value).all():
            raise InvalidTransition("action: nonfinite", "action contains NaN or inf")
        if np.abs(value).max() > ACTION_LIMIT:
            raise InvalidTransition("action: out_of_range", f"action {value.tolist()} is outside [-1, 1]")
        return value

    def _insert(self, obs: dict[str, np.ndarray], action: np.ndarray, reward: float,
                next_obs: dict[str, np.ndarray], terminated: bool, truncated: bool, stream: int,
                intervened: bool) -> None:
        row = self._cursor
        if self._valid_pos[row] >= 0:
            self._invalidate(row)
            self.counters["evicted"] += 1
        obs_slot = self._reusable_slot(stream, obs)
        if obs_slot is None:
            obs_slot = self._write_frame(obs)
        next_slot = self._write_frame(next_obs)
        self._obs_index[row] = obs_slot
        self._next_obs_index[row] = next_slot
        self._actions[row] = action
        self._rewards[row] = reward
        self._terminated[row] = terminated
        self._truncated[row] = truncated and not terminated
        self._intervened[row] = intervened
        self._stream_id[row] = stream
        self._add_index[row] = self._added
        self._add_reference(obs_slot, row)
        self._add_reference(next_slot, row)
        self._mark_valid(row)
        self._cursor = (row + 1) % self.capacity
        self._added += 1
        if terminated or truncated:
            self._streams.pop(stream, None)
        else:
            self._streams[stream] = (next_slot, int(self._slot_generation[next_slot]))

    def _reusable_slot(self, stream: int, obs: dict[str, np.ndarray]) -> int | None:
        """The slot holding ``stream``'s last next_obs if ``obs`` equals it and it survives this add."""
        remembered = self._streams.get(stream)
        if remembered is None:
            return None
        slot, generation = remembered
        # The slot is gone if it was rewritten, or will be by this add's own next_obs write.
        if self._slot_generation[slot] != generation or slot == self._frame_cursor:
            self.counters["chains_lost"] += 1
            return None
        if not all(np.array_equal(self._obs[k][slot], v) for k, v in obs.items()):
            self.counters["chain_mismatches"] += 1
            return None
        self.counters["frames_reused"] += 1
        return slot

    def _write_frame(self, frame: dict[str, np.ndarray]) -> int:
        slot = self._frame_cursor
        self._release_slot(slot)
        for key, value in frame.items():
            self._obs[key][slot] = value
        self._slot_generation[slot] = self._frames_written
        self._frames_written += 1
        self._frame_cursor = (slot + 1) % self.obs_capacity
        self.counters["frames_written"] += 1
        return slot

    def _release_slot(self, slot: int) -> None:
        """Invalidate the valid transitions that still reference ``slot`` before it is overwritten."""
        for row in self._slot_refs[slot]:
            if (row >= 0 and self._valid_pos[row] >= 0
                    and slot in (self._obs_index[row], self._next_obs_index[row])):
                self._invalidate(int(row))
                self.counters["invalidated"] += 1
        self._slot_refs[slot] = -1

    def _add_reference(self, slot: int, row: int) -> None:
        refs = self._slot_refs[slot]
        for i, other in enumerate(refs):
            if other < 0 or other == row or self._valid_pos[other] < 0 \
                    or slot not in (self._obs_index[other], self._next_obs_index[other]):
                refs[i] = row
                return
        raise AssertionError(f"frame slot {slot} already referenced by rows {refs.tolist()}")  # pragma: no cover

    def _mark_valid(self, row: int) -> None:
        self._valid_rows[self._num_valid] = row
        self._valid_pos[row] = self._num_valid
        self._num_valid += 1

    def _invalidate(self, row: int) -> None:
        position = self._valid_pos[row]
        last = self._valid_rows[self._num_valid - 1]
        self._valid_rows[position] = last
        self._valid_pos[last] = position
        self._valid_pos[row] = -1
        self._num_valid -= 1

    # -- sample -----------------------------------------------------------------------------------
    def sample(self, batch_size: int) -> Batch:
        """``batch_size`` transitions drawn uniformly (with replacement) from the valid ones."""
        return self.sample_with_rows(batch_size)[0]

    def sample_with_rows(self, batch_size: int) -> tuple[Batch, np.ndarray]:
        """:meth:`sample`, and the transition rows drawn (int64 ``[batch_size]``, the row numbers of
        :meth:`transition_table`), e.g. to gather per-row values kept beside the buffer."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        with self._lock:
            if self._num_valid == 0:
                raise ValueError("cannot sample from an empty replay buffer")
            rows = self._valid_rows[self._rng.integers(0, self._num_valid, size=batch_size)]
            obs_slots = self._obs_index[rows]
            next_slots = self._next_obs_index[rows]
            return Batch(
                observations={k: a.take(obs_slots, axis=0) for k, a in self._obs.items()},
                actions=self._actions.take(rows, axis=0),
                rewards=self._rewards.take(rows),
                next_observations={k: a.take(next_slots, axis=0) for k, a in self._obs.items()},
                terminated=self._terminated.take(rows).astype(np.float32),
                intervened=self._intervened.take(rows),
            ), rows

    def transition_table(self) -> dict[str, np.ndarray]:
        """Copies of the per-transition arrays that :meth:`save` writes (``obs_index``,
        ``next_obs_index``, ``actions``, ``rewards``, ``terminated``, ``truncated``, ``intervened``,
        ``stream_id``, ``add_index``, ``valid``), ``min(transitions_added, capacity)`` rows indexed by
        transition row: the episode structure, e.g. to compute returns-to-go."""
        with self._lock:
            rows = min(self._added, self.capacity)
            return {stem: (self._valid_pos[:rows] >= 0) if stem == "valid"
                    else getattr(self, f"_{stem}")[:rows].copy() for stem in TRANSITION_FILES}

    def observations(self, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Copies of the observations of every valid transition (``[len(self), ...]`` per field,
        ``keys`` or all fields), e.g. to measure normalisation statistics."""
        with self._lock:
            slots = self._obs_index[self._valid_rows[: self._num_valid]]
            return {k: self._obs[k].take(slots, axis=0) for k in (keys if keys is not None else self._obs)}

    # -- save -------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the buffer to ``directory`` (crash-safe; format in the module docstring)."""
        def write(tmp: Path) -> None:
            files = {name: _write_npy(tmp / name, array) for name, array in self._saved_arrays().items()}
            write_durably(tmp / "meta.json", json.dumps(self._meta(files), indent=1).encode())

        with self._lock:
            return write_directory_atomically(Path(directory), write)

    def _saved_arrays(self) -> dict[str, np.ndarray]:
        frames = min(self._frames_written, self.obs_capacity)
        rows = min(self._added, self.capacity)
        arrays = {_field_file(k, self._fields): a[:frames] for k, a in self._obs.items()}
        arrays["slot_generation.npy"] = self._slot_generation[:frames]
        for stem in TRANSITION_FILES:
            source = self._valid_pos >= 0 if stem == "valid" else getattr(self, f"_{stem}")
            arrays[f"{stem}.npy"] = source[:rows]
        return arrays

    def _meta(self, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "capacity": self.capacity,
            "obs_capacity": self.obs_capacity,
            "action_dim": self.action_dim,
            "transitions_added": self._added,
            "transition_cursor": self._cursor,
            "frames_written": self._frames_written,
            "frame_cursor": self._frame_cursor,
            "num_valid": self._num_valid,
            "observation_fields": [_field_meta(k, self.observation_space[k], self._fields) for k in self._fields],
            "files": files,
            "streams": [{"stream_id": s, "slot": slot, "slot_generation": gen}
                        for s, (slot, gen) in sorted(self._streams.items())],
            "counters": {k: int(v) for k, v in self.counters.items()},
            "rejected": {k: int(v) for k, v in self.rejected.items()},
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "numpy_version": np.__version__,
        }

    # -- load -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | os.PathLike, observation_space: spaces.Dict | None = None, *,
             seed: int = 0, verify_checksums: bool = True) -> ReplayBuffer:
        """Read a buffer written by :meth:`save`, falling back to ``directory.old`` if it is corrupt."""
        final = Path(directory)
        _, old = sibling_paths(final)
        try:
            return cls._load_directory(final, observation_space, seed, verify_checksums)
        except (ReplayFormatError, FileNotFoundError) as error:
            if not old.is_dir():
                raise
            bad = error.path if isinstance(error, ReplayFormatError) else final
            log.warning("replay buffer %s is unreadable (%s); loading the previous copy %s", bad, error, old)
            try:
                return cls._load_directory(old, observation_space, seed, verify_checksums)
            except ReplayFormatError as old_error:
                raise error from old_error

    @classmethod
    def _load_directory(cls, directory: Path, observation_space: spaces.Dict | None, seed: int,
                        verify: bool) -> ReplayBuffer:
        if not directory.is_dir():
            raise FileNotFoundError(f"no saved replay buffer at {directory}")
        meta_path = directory / "meta.json"
        meta = _read_meta(meta_path)
        try:
            saved_space = _space_from_meta(meta["observation_fields"])
            if observation_space is None:
                observation_space = saved_space
            else:
                _check_field_subset(_field_specs(observation_space), _field_specs(saved_space), directory)
            buffer = cls(observation_space, int(meta["action_dim"]), int(meta["capacity"]), seed,
                         obs_capacity=int(meta["obs_capacity"]))
            frames = min(int(meta["frames_written"]), buffer.obs_capacity)
            rows = min(int(meta["transitions_added"]), buffer.capacity)
            field_files = {f["name"]: f["file"] for f in meta["observation_fields"]}
            files = meta["files"]
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, _FieldMismatch):
                raise
            raise ReplayFormatError(meta_path, f"bad metadata: {error!r}") from None
        reader = _NpyReader(directory, files, verify)
        for key in buffer._fields:
            reader.read_into(field_files[key], buffer._obs[key][:frames])
        buffer._slot_generation[:frames] = reader.read("slot_generation.npy", np.int64, (frames,))
        for stem, dtype in TRANSITION_FILES.items():
            shape = (rows, buffer.action_dim) if stem == "actions" else (rows,)
            data = reader.read(f"{stem}.npy", np.dtype(dtype), shape)
            if stem == "valid":
                valid = data
            else:
                getattr(buffer, f"_{stem}")[:rows] = data
        buffer._restore_state(meta, valid, frames, directory)
        return buffer

    def _restore_state(self, meta: dict[str, Any], valid: np.ndarray, frames: int, directory: Path) -> None:
        meta_path = directory / "meta.json"
        try:
            self._added = int(meta["transitions_added"])
            self._cursor = int(meta["transition_cursor"])
            self._frames_written = int(meta["frames_written"])
            self._frame_cursor = int(meta["frame_cursor"])
            streams = {int(s["stream_id"]): (int(s["slot"]), int(s["slot_generation"])) for s in meta["streams"]}
            self.counters.update({k: int(v) for k, v in meta["counters"].items()})
            self.rejected.update({k: int(v) for k, v in meta["rejected"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ReplayFormatError(meta_path, f"bad metadata: {error!r}") from None
        if (self._cursor != self._added % self.capacity
                or self._frame_cursor != self._frames_written % self.obs_capacity):
            raise ReplayFormatError(meta_path, "cursors disagree with the write counts")
        if frames and not (0 <= self._slot_generation[:frames].min()
                           and self._slot_generation[:frames].max() < self._frames_written):
            raise ReplayFormatError(directory / "slot_generation.npy", "generation out of range")
        rows = np.flatnonzero(valid)
        for name, index in (("obs_index", self._obs_index), ("next_obs_index", self._next_obs_index)):
            if rows.size and not (0 <= index[rows].min() and index[rows].max() < frames):
                raise ReplayFormatError(directory / f"{name}.npy", "slot index out of range")
        if int(meta.get("num_valid", rows.size)) != rows.size:
            raise ReplayFormatError(directory / "valid.npy", "number of valid rows disagrees with meta.json")
        if any(not 0 <= slot < frames for slot, _ in streams.values()):
            raise ReplayFormatError(meta_path, "stream slot out of range")
        self._streams = streams
        self._num_valid = rows.size
        self._valid_rows[:rows.size] = rows
        self._valid_pos[rows] = np.arange(rows.size)
        self._rebuild_slot_refs(rows, directory)

    def _rebuild_slot_refs(self, rows: np.ndarray, directory: Path) -> None:
        slots = np.concatenate([self._obs_index[rows], self._next_obs_index[rows]])
        owners = np.concatenate([rows, rows])
        order = np.argsort(slots, kind="stable")
        slots, owners = slots[order], owners[order]
        position = np.arange(slots.size)
        starts = np.maximum.accumulate(np.where(np.r_[True, slots[1:] != slots[:-1]], position, 0)) \
            if slots.size else position
        rank = position - starts
        if rank.size and rank.max() > 1:
            raise ReplayFormatError(directory / "obs_index.npy", "a frame slot is referenced by more than two rows")
        if np.any(self._obs_index[rows] == self._next_obs_index[rows]):
            raise ReplayFormatError(directory / "obs_index.npy", "a row uses one slot as obs and next_obs")
        self._slot_refs[slots, rank] = owners


# ------------------------------------------------------------------------------------------------
# validation helpers
# ------------------------------------------------------------------------------------------------
def _field_specs(observation_space: spaces.Dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    fields = {}
    for key, box in observation_space.spaces.items():
        if not isinstance(box, spaces.Box):
            raise TypeError(f"observation field {key!r} is {type(box).__name__}; only Box fields are supported")
        fields[key] = (tuple(int(n) for n in box.shape), np.dtype(box.dtype))
    return fields


def _check_reward(reward: Any) -> float:
    value = np.asarray(reward)
    if value.ndim != 0 or value.dtype.kind not in "fiub":
        raise InvalidTransition("reward: type", f"reward must be a real scalar, got {reward!r}")
    if not np.isfinite(value):
        raise InvalidTransition("reward: nonfinite", f"reward is {reward!r}")
    return float(value)


def _check_stream(stream_id: Any) -> int:
    try:
        return operator.index(stream_id)
    except TypeError:
        raise InvalidTransition("stream_id: type", f"stream_id must be an int, got {stream_id!r}") from None


class _FieldMismatch(ValueError):
    """The observation_space given to ``load`` does not match the saved fields."""


def _check_field_subset(wanted: dict, saved: dict, directory: Path) -> None:
    """Every wanted field must be saved with the same shape and dtype (extra saved ones are skipped)."""
    bad = {k: v for k, v in wanted.items() if saved.get(k) != v}
    if bad:
        raise _FieldMismatch(f"the buffer saved in {directory} has observation fields {saved}; the given "
                             f"observation_space wants {bad}")


# ------------------------------------------------------------------------------------------------
# file helpers
# ------------------------------------------------------------------------------------------------
def _field_file(key: str, fields: dict) -> str:
    names = {k: "obs." + re.sub(r"[^A-Za-z0-9_-]", ".", k) for k in fields}
    if len(set(names.values())) != len(names):  # two names differing only in punctuation
        names = {k: f"obs.{i:02d}.{v[4:]}" for i, (k, v) in enumerate(names.items())}
    return names[key] + ".npy"


def _bound(values: np.ndarray) -> Any:
    flat = np.asarray(values, dtype=np.float64)
    if flat.size and np.all(flat == flat.flat[0]):
        return float(flat.flat[0])
    return flat.tolist()


def _field_meta(key: str, box: spaces.Box, fields: dict) -> dict[str, Any]:
    shape, dtype = fields[key]
    return {"name": key, "file": _field_file(key, fields), "dtype": dtype.name, "shape": list(shape),
            "low": _bound(box.low), "high": _bound(box.high)}


def _space_from_meta(fields: list[dict[str, Any]]) -> spaces.Dict:
    boxes = {}
    for field in fields:
        dtype, shape = np.dtype(field["dtype"]), tuple(int(n) for n in field["shape"])
        low = np.broadcast_to(np.asarray(field["low"], np.float64), shape).astype(dtype)
        high = np.broadcast_to(np.asarray(field["high"], np.float64), shape).astype(dtype)
        boxes[field["name"]] = spaces.Box(low=low, high=high, shape=shape, dtype=dtype)
    return spaces.Dict(boxes)


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8)) if array.size else 0


def _write_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"dtype": array.dtype.name, "shape": list(array.shape), "crc32": _crc32(array)}


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ReplayFormatError(path, f"cannot read metadata: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ReplayFormatError(path, f"not a {FORMAT_NAME} buffer")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ReplayFormatError(path, f"format version {meta.get('format_version')} is not {FORMAT_VERSION}")
    return meta


class _NpyReader:
    """Reads the ``.npy`` files of a saved buffer, checking them against ``meta.json``'s ``files``."""

    def __init__(self, directory: Path, files: dict[str, Any], verify: bool) -> None:
        self.directory = directory
        self.files = files
        self.verify = verify

    def read(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty(shape, dtype)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: np.ndarray) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+\.npy", name):  # a plain name inside the directory
            raise ReplayFormatError(self.directory / "meta.json", f"bad file name {name!r}")
        path = self.directory / name
        entry = self.files.get(name)
        if not isinstance(entry, dict):
            raise ReplayFormatError(self.directory / "meta.json", f"no entry for {name}")
        if entry.get("dtype") != out.dtype.name or tuple(entry.get("shape", ())) != out.shape:
            raise ReplayFormatError(self.directory / "meta.json",
                                    f"{name} is listed as {entry.get('dtype')} {entry.get('shape')}, "
                                    f"expected {out.dtype.name} {list(out.shape)}")
        _check_npy_header(path, out.dtype, out.shape)
        if out.size:
            try:
                data = np.load(path, mmap_mode="r", allow_pickle=False)
                out[...] = data
                del data
            except (OSError, ValueError) as error:
                raise ReplayFormatError(path, f"unreadable: {error}") from None
        if self.verify and _crc32(out) != entry.get("crc32"):
            raise ReplayFormatError(path, "checksum mismatch (corrupt data)")


def _check_npy_header(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Check a ``.npy`` file's header (dtype, shape, C order) and its size."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                file_shape, fortran, file_dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                file_shape, fortran, file_dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = f.tell()
    except FileNotFoundError:
        raise ReplayFormatError(path, "missing file") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ReplayFormatError(path, f"bad .npy header: {error}") from None
    if file_dtype != dtype or tuple(file_shape) != tuple(shape) or fortran:
        raise ReplayFormatError(path, f"holds {file_dtype} {tuple(file_shape)}, expected {dtype} {tuple(shape)}")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise ReplayFormatError(path, f"is {size} bytes, expected {expected} (truncated or corrupt)")
