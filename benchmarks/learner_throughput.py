#!/usr/bin/env python
"""Learner throughput benchmark: how many SAC/RLPD updates per second ``learner/sac.py`` runs.

    python benchmarks/learner_throughput.py [--json PATH] [--quick] [--threads N] [--image-cpu]

Measures, in this process, with batches pre-generated in memory:

1. **State-only SAC** (the LeRobot comparison): 2 critics of 256x256 with LayerNorm, an actor of
   256x256, batch 256, an 18-d observation (4 float fields), a 4-d action, at UTD 1 and UTD 4.
   ``updates/s`` = calls of ``SACAgent.update()`` per second; ``critic updates/s`` = UTD x that.
   Each rate is the median over several timed windows after a warm-up; once with batches already
   converted to tensors, once including the numpy -> torch conversion of every batch.
2. **Where the time goes**: the median time of one critic step and of one actor + temperature step.
3. **FLOP fraction**: the machine's dense fp32 matmul rate (1024x1024 @ 1024x1024, median of 10-30
   calls, sampled before, between and after the SAC runs; the best sample) measured in the same run,
   against the update's matmul FLOPs counted analytically per Linear layer (forward 2*B*in*out;
   backward adds a weight-gradient and an input-gradient matmul of the same size where autograd
   needs them; target critics and the next-action sample are forward only; the actor loss
   back-propagates through the critics to the action but not into their weights).
4. **act() latency** of the tanh-Gaussian policy on one unbatched observation (state only, and
   state + two 128x128 cameras), median.
5. **Image SAC** (two 128x128 cameras, small CNN, batch 256) on a CUDA device when there is one
   (``--image-cpu`` runs it on the CPU instead); skipped otherwise.

Reference: LeRobot's SAC learner, 51-57 updates/s at UTD 1 and 95 critic updates/s at UTD 4 on a
2-core machine; the target is >= 2x that (PASS/FAIL printed and stored; a miss does not fail the
script). Other processes on the machine slow every number down: the load average at the start is
recorded next to the results.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (benchmarks/machine.py: what every benchmark records)
import torch  # noqa: E402
from gymnasium import spaces  # noqa: E402

from hardware_configs.schema import ImageEncoderConfig, SACConfig  # noqa: E402
from learner.sac import SACAgent  # noqa: E402

REFERENCE_UPDATES_PER_S_UTD1 = (51.0, 57.0)  # LeRobot SAC, 2-core machine
REFERENCE_CRITIC_UPDATES_PER_S_UTD4 = 95.0
TARGET_FACTOR = 2.0
BATCH_SIZE = 256
ACTION_DIM = 4
STATE_FIELDS = {"tcp_pose": 7, "tcp_velocity": 6, "gripper_width": 1, "task/goal": 4}  # 18-d


def observation_space(cameras: tuple[str, ...] = (), image_size: int = 128) -> spaces.Dict:
    fields: dict[str, spaces.Box] = {k: spaces.Box(-1.0, 1.0, (n,), np.float32) for k, n in STATE_FIELDS.items()}
    for camera in cameras:
        fields[f"images/{camera}"] = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
    return spaces.Dict(fields)


ACTION_SPACE = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)


def random_batch(space: spaces.Dict, rows: int, rng: np.random.Generator) -> SimpleNamespace:
    def observations() -> dict[str, np.ndarray]:
        out = {}
        for key, box in space.spaces.items():
            if box.dtype == np.uint8:
                out[key] = rng.integers(0, 256, (rows, *box.shape), dtype=np.uint8)
            else:
                out[key] = rng.uniform(-1, 1, (rows, *box.shape)).astype(np.float32)
        return out

    return SimpleNamespace(
        observations=observations(), next_observations=observations(),
        actions=rng.uniform(-1, 1, (rows, ACTION_DIM)).astype(np.float32),
        rewards=rng.normal(size=rows).astype(np.float32),
        terminated=(rng.uniform(size=rows) < 0.05).astype(np.float32),
        intervened=np.zeros(rows, bool),
    )


def windowed_rate(step: Callable[[int], Any], warmup: int, windows: int, per_window: int,
                  synchronize: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Calls of ``step(i)`` per second: median (and min/max) over timed windows after a warm-up."""
    for i in range(warmup):
        step(i)
    synchronize()
    rates = []
    calls = warmup
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(per_window):
            step(calls)
            calls += 1
        synchronize()
        rates.append(per_window / (time.perf_counter() - start))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def median_seconds(call: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    return float(np.median(machine.time_calls(call, repeats, warmup)))


def matmul_flops_per_s(repeats: int) -> float:
    """Dense fp32 matmul rate of this machine (1024^3, median of single-call timings)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    seconds = median_seconds(lambda: torch.mm(a, b), repeats, warmup=5)
    return 2 * 1024**3 / seconds


# ----------------------------------------------------------------------------------------------
# Analytic FLOP count of one update
# ----------------------------------------------------------------------------------------------


def linear_flops(batch: int, dims: tuple[int, ...], forward: int, weight_grad: int, input_grad_from: int) -> float:
    """Matmul FLOPs of an MLP with layer sizes ``dims``: ``forward`` and ``weight_grad`` passes over
    every layer, input gradients for layers ``input_grad_from..`` (0 = also into the first input)."""
    total = 0.0
    for index, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        matmul = 2.0 * batch * fan_in * fan_out
        passes = forward + weight_grad + (1 if index >= input_grad_from else 0)
        total += passes * matmul
    return total


def update_matmul_flops(config: SACConfig, observation_dim: int, action_dim: int) -> dict[str, float]:
    """Matmul FLOPs of one ``update()`` (UTD critic steps + one actor step), state-only networks."""
    batch, hidden, critics = config.batch_size, tuple(config.hidden_dims), config.num_critics
    actor = (observation_dim, *hidden, 2 * action_dim)
    critic = (observation_dim + action_dim, *hidden, 1)
    no_input_grad = len(critic)  # index past the last layer: no input gradient anywhere
    critic_step = (
        linear_flops(batch, actor, 1, 0, no_input_grad)                      # a' ~ pi(s'), no grad
        + critics * linear_flops(batch, critic, 1, 0, no_input_grad)         # target critics
        + critics * linear_flops(batch, critic, 1, 1, 1)                     # critics fwd + bwd (input is data)
    )
    actor_step = (
        linear_flops(batch, actor, 1, 1, 1)                                  # actor fwd + bwd
        + critics * linear_flops(batch, critic, 1, 0, 0)                     # critics fwd + grad wrt action
    )
    return {
        "critic_step": critic_step,
        "actor_step": actor_step,
        "update": config.utd_ratio * critic_step + actor_step,
    }


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def bench_state_sac(utd: int, quick: bool, seed: int = 0) -> dict[str, Any]:
    """Rates and step times of state-only SAC at ``utd``; FLOP fractions are added by the caller."""
    config = SACConfig(hidden_dims=(256, 256), num_critics=2, critic_subset=2, layer_norm=True,
                       batch_size=BATCH_SIZE, utd_ratio=utd)
    space = observation_space()
    agent = SACAgent(config, space, ACTION_SPACE, device="cpu", seed=seed)
    rng = np.random.default_rng(seed)
    numpy_batches = [random_batch(space, BATCH_SIZE * utd, rng) for _ in range(8)]
    torch_batches = [agent.batch_to_torch(b) for b in numpy_batches]
    warmup, windows = (10, 5) if quick else (30, 9)
    per_window = max(5, (40 if quick else 100) // utd)

    pre_converted = windowed_rate(lambda i: agent.update(torch_batches[i % 8]), warmup, windows, per_window)
    with_conversion = windowed_rate(lambda i: agent.update(numpy_batches[i % 8]), warmup, windows, per_window)

    minibatch = torch_batches[0].rows(0, BATCH_SIZE)
    prepared = agent.encoder.prepare(minibatch.observations)
    repeats = 30 if quick else 100
    critic_step_s = median_seconds(lambda: agent._critic_step(minibatch), repeats)
    actor_step_s = median_seconds(lambda: agent._actor_and_temperature_step(prepared), repeats)

    flops = update_matmul_flops(config, sum(STATE_FIELDS.values()), ACTION_DIM)
    updates_per_s = pre_converted["median"]
    return {
        "utd_ratio": utd,
        "updates_per_s": updates_per_s,
        "updates_per_s_min": pre_converted["min"],
        "updates_per_s_max": pre_converted["max"],
        "critic_updates_per_s": utd * updates_per_s,
        "updates_per_s_with_numpy_conversion": with_conversion["median"],
        "critic_updates_per_s_with_numpy_conversion": utd * with_conversion["median"],
        "critic_step_ms": 1e3 * critic_step_s,
        "actor_step_ms": 1e3 * actor_step_s,
        "matmul_gflop_per_update": flops["update"] / 1e9,
        "achieved_gflop_per_s": flops["update"] * updates_per_s / 1e9,
        "critic_step_achieved_gflop_per_s": flops["critic_step"] / critic_step_s / 1e9,
        "actor_step_achieved_gflop_per_s": flops["actor_step"] / actor_step_s / 1e9,
    }


def add_flop_fractions(result: dict[str, Any], machine_gflop_per_s: float) -> None:
    """Achieved matmul GFLOP/s over the machine's, for the whole update and each step."""
    result["flop_fraction"] = result["achieved_gflop_per_s"] / machine_gflop_per_s
    for step in ("critic_step", "actor_step"):
        result[f"{step}_flop_fraction"] = result[f"{step}_achieved_gflop_per_s"] / machine_gflop_per_s


def bench_act(quick: bool) -> dict[str, float]:
    """Median latency of ``act()`` on one unbatched observation (CPU)."""
    results = {}
    rng = np.random.default_rng(0)
    for name, cameras in (("state", ()), ("two_128px_cameras", ("front", "wrist"))):
        space = observation_space(cameras)
        agent = SACAgent(SACConfig(), space, ACTION_SPACE, seed=0)
        observation = {k: v[0] for k, v in random_batch(space, 1, rng).observations.items()}
        repeats = 200 if quick else 1000
        results[f"act_{name}_deterministic_us"] = 1e6 * median_seconds(lambda: agent.act(observation, True), repeats, 20)
        results[f"act_{name}_stochastic_us"] = 1e6 * median_seconds(lambda: agent.act(observation, False), repeats, 20)
    return results


def bench_image_sac(device: str, quick: bool) -> dict[str, Any]:
    config = SACConfig(batch_size=BATCH_SIZE, utd_ratio=1, image_encoder=ImageEncoderConfig())
    space = observation_space(("front", "wrist"), 128)
    agent = SACAgent(config, space, ACTION_SPACE, device=device, seed=0)
    rng = np.random.default_rng(0)
    numpy_batches = [random_batch(space, BATCH_SIZE, rng) for _ in range(4)]
    torch_batches = [agent.batch_to_torch(b) for b in numpy_batches]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if not device.startswith("cuda"):
        warmup, windows, per_window = 1, 2, 1  # seconds per update on a CPU: a smoke run only
    else:
        warmup, windows, per_window = (3, 3, 3) if quick else (20, 7, 30)
    pre_converted = windowed_rate(lambda i: agent.update(torch_batches[i % 4]), warmup, windows, per_window, sync)
    with_conversion = windowed_rate(lambda i: agent.update(numpy_batches[i % 4]), warmup, windows, per_window, sync)
    return {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "cameras": "2 x 128x128x3 uint8, small_cnn (32 channels, latent 64), DrQ pad 4",
        "utd_ratio": 1,
        "updates_per_s": pre_converted["median"],
        "updates_per_s_with_numpy_conversion": with_conversion["median"],
    }


def machine_info(threads: int) -> dict[str, Any]:
    return machine.machine_info(
        torch_threads=threads, torch=torch.__version__,
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the numbers and machine info here")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter windows (a smoke run)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the cores available)")
    parser.add_argument("--image-cpu", action="store_true", help="run the image config on the CPU when no CUDA")
    args = parser.parse_args(argv)

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    host = machine_info(threads)
    print(f"{host['cpu_model']}: {host['cpus_usable']} cores, torch {host['torch']} "
          f"({threads} threads), load average at start {host['loadavg_at_start']}")

    # The matmul rate is sampled before, between and after the SAC runs and its best sample taken as
    # the machine's: other tenants of the cores only ever lower it, and they come and go.
    matmul_repeats = 10 if args.quick else 30
    matmul_samples = [matmul_flops_per_s(matmul_repeats)]
    state = {}
    for utd in (1, 4):
        state[utd] = bench_state_sac(utd, args.quick)
        matmul_samples.append(matmul_flops_per_s(matmul_repeats))
    flops_per_s = max(matmul_samples)
    for result in state.values():
        add_flop_fractions(result, flops_per_s / 1e9)
    print(f"fp32 matmul 1024^3: {flops_per_s / 1e9:.1f} GFLOP/s (best of "
          f"{', '.join(f'{x / 1e9:.0f}' for x in matmul_samples)})")
    act = bench_act(args.quick)

    image: dict[str, Any]
    if torch.cuda.is_available():
        image = bench_image_sac("cuda", args.quick)
    elif args.image_cpu:
        image = bench_image_sac("cpu", args.quick)
    else:
        image = {"skipped": "no CUDA device (use --image-cpu to run it on the CPU)"}

    reference_utd1 = REFERENCE_UPDATES_PER_S_UTD1[1]
    ratio_utd1 = state[1]["updates_per_s"] / reference_utd1
    ratio_utd4 = state[4]["critic_updates_per_s"] / REFERENCE_CRITIC_UPDATES_PER_S_UTD4
    targets = {"utd1_2x_reference": ratio_utd1 >= TARGET_FACTOR, "utd4_2x_reference": ratio_utd4 >= TARGET_FACTOR}

    rows = [
        ("UTD", "updates/s", "critic upd/s", "best window", "+np->torch upd/s", "critic ms", "actor ms", "GFLOP/upd",
         "FLOP frac", "vs LeRobot"),
    ]
    for utd, ratio in ((1, ratio_utd1), (4, ratio_utd4)):
        r = state[utd]
        rows.append((str(utd), f"{r['updates_per_s']:.1f}", f"{r['critic_updates_per_s']:.1f}",
                     f"{r['updates_per_s_max']:.1f}", f"{r['updates_per_s_with_numpy_conversion']:.1f}", f"{r['critic_step_ms']:.2f}",
                     f"{r['actor_step_ms']:.2f}", f"{r['matmul_gflop_per_update']:.3f}",
                     f"{100 * r['flop_fraction']:.1f}%", f"{ratio:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    print("(updates/s: median of the timed windows; best window: the fastest one, a bound on the rate when "
          "no other process competes for the cores)")
    print()
    print(f"UTD 1 vs LeRobot {reference_utd1:.0f} updates/s: {ratio_utd1:.2f}x "
          f"[{'PASS' if targets['utd1_2x_reference'] else 'FAIL'} >= {TARGET_FACTOR:.0f}x]")
    print(f"UTD 4 vs LeRobot {REFERENCE_CRITIC_UPDATES_PER_S_UTD4:.0f} critic updates/s: {ratio_utd4:.2f}x "
          f"[{'PASS' if targets['utd4_2x_reference'] else 'FAIL'} >= {TARGET_FACTOR:.0f}x]")
    for name, value in act.items():
        print(f"{name}: {value:.0f} us")
    if "skipped" in image:
        print(f"image SAC: skipped ({image['skipped']})")
    else:
        print(f"image SAC on {image['device']}: {image['updates_per_s']:.1f} updates/s "
              f"({image['updates_per_s_with_numpy_conversion']:.1f} with numpy->torch)")

    if args.json:
        report = {
            "benchmark": "learner_throughput",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": args.quick,
            "machine": host,
            "setup": {"batch_size": BATCH_SIZE, "observation_dim": sum(STATE_FIELDS.values()),
                      "action_dim": ACTION_DIM, "hidden_dims": [256, 256], "num_critics": 2, "layer_norm": True},
            "matmul_fp32_gflop_per_s": flops_per_s / 1e9,
            "matmul_fp32_gflop_per_s_samples": [x / 1e9 for x in matmul_samples],
            "state_sac": {f"utd{utd}": r for utd, r in state.items()},
            "act": act,
            "image_sac": image,
            "reference": {"lerobot_updates_per_s_utd1": list(REFERENCE_UPDATES_PER_S_UTD1),
                          "lerobot_critic_updates_per_s_utd4": REFERENCE_CRITIC_UPDATES_PER_S_UTD4},
            "ratio_vs_reference": {"utd1": ratio_utd1, "utd4": ratio_utd4},
            "targets": targets,
        }
        machine.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
