#!/usr/bin/env python
"""Replay buffer benchmark: storage per transition, add rate and sampling rate with two cameras.

    python benchmarks/replay.py [--json PATH] [--quick] [--no-save]

Observations are two 128x128x3 uint8 cameras plus 21 float32 state values (``tcp_pose`` 7,
``tcp_velocity`` 6, ``gripper_width`` 1, ``task/cube_pose`` 7), actions 4 floats; two actor streams
send 100-step episodes round robin (every fourth episode ends by time-limit truncation). Each
observation is a fresh copy of a frame from a pool of random images, as if just decoded off the
wire, so ``add`` does the full image comparison that chains the frames.

1. **Fill**: a buffer of N transitions (20,000; ``--quick`` 2,000) gets 1.5 N adds (full and
   wrapped). Reports the add rate (median and p99 of the per-call time) while the rings wrap
   (steady state) and during the first fill, where the first write to each page of the lazily
   committed storage page-faults, and the storage ratio ``nbytes / len / bytes of one observation``
   (all preallocated storage, bookkeeping included).
2. **Sample**: 256-transition batches (obs + next_obs + the rest), ``repeats`` timed rounds of
   ``batches`` each after a warm-up; batches/s and transitions/s are the median over rounds.
3. **Ratio by episode length**: the same storage ratio for 5 to 200-step episodes in a smaller
   buffer (the ratio does not depend on the size), against the floor ``(L + 1) / L``.
4. **Save / load** (unless ``--no-save``): ``save`` to a temporary directory and ``load`` with
   checksums, in MB/s of the saved files.

Target (PASS/FAIL, a miss does not fail the script): storage ratio <= 1.05 for 100-step episodes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (benchmarks/machine.py: what every benchmark records)
from gymnasium import spaces  # noqa: E402

from learner.replay import ReplayBuffer  # noqa: E402

IMAGE_SHAPE = (128, 128, 3)
CAMERAS = ("images/front", "images/wrist")
STATE_FIELDS = {"tcp_pose": 7, "tcp_velocity": 6, "gripper_width": 1, "task/cube_pose": 7}
ACTION_DIM = 4
EPISODE_STEPS = 100
STREAMS = 2
BATCH_SIZE = 256
FRAME_POOL = 32
FULL = {"capacity": 20_000, "repeats": 7, "batches": 30, "sweep_capacity": 2_000}
QUICK = {"capacity": 2_000, "repeats": 5, "batches": 10, "sweep_capacity": 500}
SWEEP_LENGTHS = (5, 20, 50, 100, 200)
RATIO_TARGET = 1.05


def observation_space() -> spaces.Dict:
    fields: dict[str, spaces.Box] = {k: spaces.Box(-10.0, 10.0, (n,), np.float32) for k, n in STATE_FIELDS.items()}
    fields.update({k: spaces.Box(0, 255, IMAGE_SHAPE, np.uint8) for k in CAMERAS})
    return spaces.Dict(fields)


class Streams:
    """Round-robin actor streams producing fresh observation dicts from a pool of random frames."""

    def __init__(self, episode_steps: int, streams: int = STREAMS, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.pool = {k: self.rng.integers(0, 256, (FRAME_POOL, *IMAGE_SHAPE), dtype=np.uint8) for k in CAMERAS}
        self.episode_steps = episode_steps
        self.count = 0
        self.step = [0] * streams
        self.episode = [0] * streams
        self.obs = [self.observation() for _ in range(streams)]

    def observation(self) -> dict[str, np.ndarray]:
        self.count += 1
        obs = {k: self.rng.standard_normal(n).astype(np.float32) for k, n in STATE_FIELDS.items()}
        obs.update({k: self.pool[k][(self.count + i) % FRAME_POOL].copy() for i, k in enumerate(CAMERAS)})
        return obs

    def next(self, stream: int) -> tuple:
        """(obs, action, reward, next_obs, terminated, truncated) of ``stream``'s next step."""
        obs, next_obs = self.obs[stream], self.observation()
        self.step[stream] += 1
        end = self.step[stream] == self.episode_steps
        truncated = end and self.episode[stream] % 4 == 3
        action = self.rng.uniform(-1, 1, ACTION_DIM).astype(np.float32)
        if end:
            self.step[stream] = 0
            self.episode[stream] += 1
            self.obs[stream] = self.observation()
        else:
            self.obs[stream] = next_obs
        return obs, action, float(end), next_obs, end and not truncated, truncated


def fill(buffer: ReplayBuffer, adds: int, episode_steps: int, seed: int = 0) -> np.ndarray:
    """Add ``adds`` transitions; return the per-call add times in seconds."""
    streams = Streams(episode_steps, seed=seed)
    times = np.empty(adds)
    for i in range(adds):
        stream = i % STREAMS
        transition = streams.next(stream)
        start = time.perf_counter()
        buffer.add(*transition, stream_id=stream)
        times[i] = time.perf_counter() - start
    return times


def storage_ratio(buffer: ReplayBuffer) -> float:
    return buffer.nbytes / len(buffer) / buffer.frame_nbytes


def bench_fill(capacity: int) -> tuple[ReplayBuffer, dict[str, Any]]:
    buffer = ReplayBuffer(observation_space(), ACTION_DIM, capacity, seed=0)
    adds = capacity * 3 // 2
    start = time.perf_counter()
    times = fill(buffer, adds, EPISODE_STEPS)
    wall = time.perf_counter() - start
    first, wrapped = times[:capacity], times[capacity:]
    return buffer, {
        "capacity": capacity,
        "obs_capacity": buffer.obs_capacity,
        "adds": adds,
        "len": len(buffer),
        "frame_bytes": buffer.frame_nbytes,
        "nbytes": buffer.nbytes,
        "bytes_per_transition": buffer.nbytes / len(buffer),
        "ratio": storage_ratio(buffer),
        "ratio_floor": (EPISODE_STEPS + 1) / EPISODE_STEPS,
        "add_us_p50": float(np.median(wrapped) * 1e6),
        "add_us_p99": float(np.percentile(wrapped, 99) * 1e6),
        "adds_per_s": wrapped.size / float(wrapped.sum()),
        "first_fill_add_us_p50": float(np.median(first) * 1e6),
        "first_fill_add_us_p99": float(np.percentile(first, 99) * 1e6),
        "first_fill_adds_per_s": first.size / float(first.sum()),
        "fill_wall_s": wall,
        "counters": dict(buffer.counters),
    }


def bench_sample(buffer: ReplayBuffer, repeats: int, batches: int) -> dict[str, Any]:
    for _ in range(3):
        buffer.sample(BATCH_SIZE)
    rates, latencies = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            t0 = time.perf_counter()
            batch = buffer.sample(BATCH_SIZE)
            latencies.append(time.perf_counter() - t0)
        rates.append(batches / (time.perf_counter() - start))
    batch_bytes = sum(a.nbytes for a in (*batch.observations.values(), *batch.next_observations.values(),
                                         batch.actions, batch.rewards, batch.terminated, batch.intervened))
    median = float(np.median(rates))
    return {
        "batch_size": BATCH_SIZE,
        "repeats": repeats,
        "batches_per_repeat": batches,
        "batches_per_s": median,
        "transitions_per_s": median * BATCH_SIZE,
        "batches_per_s_min": float(min(rates)),
        "batches_per_s_max": float(max(rates)),
        "ms_per_batch_p50": float(np.median(latencies) * 1e3),
        "ms_per_batch_p99": float(np.percentile(latencies, 99) * 1e3),
        "batch_mb": batch_bytes / 1e6,
        "gather_gb_per_s": median * batch_bytes / 1e9,
    }


def bench_ratio_sweep(capacity: int) -> list[dict[str, Any]]:
    rows = []
    for length in SWEEP_LENGTHS:
        buffer = ReplayBuffer(observation_space(), ACTION_DIM, capacity, seed=0)
        fill(buffer, capacity * 3 // 2, length)
        rows.append({"episode_steps": length, "len": len(buffer), "capacity": capacity,
                     "ratio": storage_ratio(buffer), "ratio_floor": (length + 1) / length})
        del buffer
    return rows


def bench_save_load(buffer: ReplayBuffer) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="steerl-replay-bench-") as tmp:
        path = Path(tmp) / "replay"
        start = time.perf_counter()
        buffer.save(path)
        save_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in path.iterdir())
        start = time.perf_counter()
        loaded = ReplayBuffer.load(path)
        load_s = time.perf_counter() - start
        assert len(loaded) == len(buffer)
        del loaded
    return {"bytes": size, "save_s": save_s, "load_s": load_s, "save_mb_per_s": size / save_s / 1e6,
            "load_mb_per_s": size / load_s / 1e6, "directory": tempfile.gettempdir()}


def machine_info() -> dict[str, Any]:
    return machine.machine_info()

def run(quick: bool, save: bool) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    results: dict[str, Any] = {"benchmark": "replay", "quick": quick, "machine": machine_info(),
                               "config": {"image_shape": list(IMAGE_SHAPE), "cameras": list(CAMERAS),
                                          "state_dim": sum(STATE_FIELDS.values()), "action_dim": ACTION_DIM,
                                          "episode_steps": EPISODE_STEPS, "streams": STREAMS}}
    buffer, results["fill"] = bench_fill(sizes["capacity"])
    results["sample"] = bench_sample(buffer, sizes["repeats"], sizes["batches"])
    if save:
        results["save_load"] = bench_save_load(buffer)
    del buffer
    results["ratio_sweep"] = bench_ratio_sweep(sizes["sweep_capacity"])
    results["targets"] = {"ratio_le_1.05": results["fill"]["ratio"] <= RATIO_TARGET}
    return results


def print_report(results: dict[str, Any]) -> None:
    host, fill_, sample = results["machine"], results["fill"], results["sample"]
    print(f"\nreplay benchmark ({'quick' if results['quick'] else 'full'}) on {host['cpu_model']}, "
          f"{host['cpu_count']} cores, python {host['python']}, numpy {host['numpy']}")
    print(f"two {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}x3 cameras + {results['config']['state_dim']}-d state "
          f"({fill_['frame_bytes']:,} B per observation), {EPISODE_STEPS}-step episodes, {STREAMS} streams\n")
    rows = [
        ("capacity / adds / len", f"{fill_['capacity']:,} / {fill_['adds']:,} / {fill_['len']:,}"),
        ("storage (all arrays)", f"{fill_['nbytes'] / 2**20:,.0f} MiB"),
        ("bytes per transition", f"{fill_['bytes_per_transition']:,.0f} B"),
        ("ratio to one observation", f"{fill_['ratio']:.4f} (floor {fill_['ratio_floor']:.4f})"),
        ("add (wrapped)", f"{fill_['adds_per_s']:,.0f} /s (p50 {fill_['add_us_p50']:.0f} us, "
                          f"p99 {fill_['add_us_p99']:.0f} us)"),
        ("add (first fill)", f"{fill_['first_fill_adds_per_s']:,.0f} /s "
                             f"(p50 {fill_['first_fill_add_us_p50']:.0f} us, "
                             f"p99 {fill_['first_fill_add_us_p99']:.0f} us, page faults)"),
        (f"sample {BATCH_SIZE}", f"{sample['batches_per_s']:,.1f} batches/s = {sample['transitions_per_s']:,.0f} "
                                 f"transitions/s (p50 {sample['ms_per_batch_p50']:.2f} ms, "
                                 f"{sample['batch_mb']:.1f} MB/batch)"),
    ]
    if "save_load" in results:
        io = results["save_load"]
        rows.append(("save / load", f"{io['save_s']:.2f} s / {io['load_s']:.2f} s for {io['bytes'] / 2**20:,.0f} MiB "
                                    f"({io['save_mb_per_s']:,.0f} / {io['load_mb_per_s']:,.0f} MB/s)"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"\n  {'episode steps':>13}  {'len/capacity':>12}  {'ratio':>7}  {'floor (L+1)/L':>13}")
    for row in results["ratio_sweep"]:
        print(f"  {row['episode_steps']:>13}  {row['len'] / row['capacity']:>12.3f}  {row['ratio']:>7.4f}  "
              f"{row['ratio_floor']:>13.4f}")
    verdict = "PASS" if results["targets"]["ratio_le_1.05"] else "FAIL"
    print(f"\n  target: storage ratio <= {RATIO_TARGET} for {EPISODE_STEPS}-step episodes: {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write all numbers and machine info to this file")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['capacity']:,} transitions instead of {FULL['capacity']:,}, fewer repeats")
    parser.add_argument("--no-save", action="store_true", help="skip the save/load timing")
    args = parser.parse_args(argv)
    results = run(args.quick, not args.no_save)
    print_report(results)
    machine.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
