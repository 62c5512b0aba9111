"""Scale-out benchmark: env steps/s collected by 1, 2 and 4 simulated actors under Ray, and the
learner's updates/s while they feed it.

Each configuration is a real Ray session (tools/ray_session.py): the learner and N simulated
actors as Ray actors on a local instance, each actor with its own in-process PyBullet cell,
shipping transitions over ZeroMQ. Two modes:

- ``collect``: the learner only ingests (no gradient updates): how fast N actors can collect and
  the learner can take it in, i.e. the actors' own scaling;
- ``train``: the learner trains as configured (its UTD ratio and networks) while the actors run
  unpaced: the env steps/s and updates/s the machine delivers when both compete for it.

After a warm-up, the learner's counters (transitions held, updates, weights versions) and the
CPU time of every worker process are sampled over ``--windows`` consecutive windows; rates are
medians over the windows. The transition log's growth gives the bytes per transition on the wire
(the log stores the received protobuf batches as they came).

    python benchmarks/scale.py --json benchmarks/results/scale.json      # ~8 min on 2 cores
    python benchmarks/scale.py --quick                                    # 1 and 2 actors, ~2 min
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_info, print_targets, write_json  # noqa: E402
from benchmarks.sac_sweep import inproc_config  # noqa: E402
from hardware_configs.schema import SessionConfig  # noqa: E402
from tools.ray_session import RaySession  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine spent busy (from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def session_config(base: SessionConfig, actors: int, mode: str) -> SessionConfig:
    learner = dataclasses.replace(base.learner, checkpoint_every_updates=10**9,
                                  learning_starts=10**9 if mode == "collect" else base.learner.learning_starts)
    actor = dataclasses.replace(base.actor, eval_every_episodes=0, eval_episodes=0, max_steps_per_update=0.0)
    ray = dataclasses.replace(base.ray, enabled=True, num_actors=actors, actor_cpus=1.0, learner_cpus=1.0)
    return dataclasses.replace(base, learner=learner, actor=actor, ray=ray)


def sample(session: RaySession) -> dict[str, Any]:
    session.poll()
    status = session.learner_status
    return {"time": time.monotonic(), "transitions": status["transitions"], "updates": status["updates"],
            "weights_version": status["weights_version"],
            "log_bytes": directory_bytes(session.run_dir / "transition_log"),
            "learner_cpu": cpu_seconds(status.get("pid")),
            "actors_cpu": sum(cpu_seconds(slot.pid) for slot in session.actors),
            "machine_cpu": machine_busy_seconds()}


def measure(base: SessionConfig, actors: int, mode: str, warmup_s: float, window_s: float, windows: int,
            work_dir: Path) -> dict[str, Any]:
    config = session_config(base, actors, mode)
    session = RaySession(config, work_dir / f"{mode}-{actors}")
    session.start(total_steps=10**12)
    try:
        deadline = time.monotonic() + 180
        while not all(slot.last.get("env_steps") for slot in session.actors):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode} x{actors}: the actors did not start acting within 180 s")
            session.poll()
            time.sleep(0.5)
        if mode == "train":
            while session.poll()["updates"] == 0:
                time.sleep(0.5)
        time.sleep(warmup_s)
        samples = [sample(session)]
        for _ in range(windows):
            time.sleep(window_s)
            samples.append(sample(session))
        status = session.learner_status
    finally:
        summary = session.stop()
    cores = os.cpu_count() or 1
    rates: dict[str, list[float]] = {k: [] for k in ("steps_per_s", "updates_per_s", "weights_per_s",
                                                     "bytes_per_transition", "learner_cores", "actors_cores",
                                                     "machine_cores")}
    for before, after in zip(samples, samples[1:]):
        elapsed = after["time"] - before["time"]
        transitions = after["transitions"] - before["transitions"]
        rates["steps_per_s"].append(transitions / elapsed)
        rates["updates_per_s"].append((after["updates"] - before["updates"]) / elapsed)
        rates["weights_per_s"].append((after["weights_version"] - before["weights_version"]) / elapsed)
        rates["bytes_per_transition"].append((after["log_bytes"] - before["log_bytes"]) / max(1, transitions))
        rates["learner_cores"].append((after["learner_cpu"] - before["learner_cpu"]) / elapsed)
        rates["actors_cores"].append((after["actors_cpu"] - before["actors_cpu"]) / elapsed)
        rates["machine_cores"].append((after["machine_cpu"] - before["machine_cpu"]) / elapsed)
    result = {name: statistics.median(values) for name, values in rates.items()}
    result.update(actors=actors, mode=mode, windows=rates["steps_per_s"], cores=cores,
                  weights_bytes=status["weights_bytes"],
                  replay_bytes_per_transition=status["replay_nbytes"] / max(1, status["replay_capacity"]),
                  missing=sum(a["missing"] for a in status["actors"].values()),
                  transitions=summary.get("transitions"))
    result["weight_broadcast_bytes_per_s"] = result["weights_per_s"] * result["weights_bytes"] * actors
    print(f"{mode:>7} x{actors}: {result['steps_per_s']:7.1f} env steps/s, {result['updates_per_s']:5.1f} updates/s, "
          f"CPU cores busy: actors {result['actors_cores']:.2f}, learner {result['learner_cores']:.2f}, "
          f"all processes {result['machine_cores']:.2f} of {cores}; "
          f"{result['bytes_per_transition']:.0f} B/transition on the wire, weights {result['weights_bytes'] / 1e6:.2f} MB "
          f"x {result['weights_per_s']:.2f}/s", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sim_panda_pick_cube")
    parser.add_argument("--actors", default="1,2,4", help="comma-separated actor counts")
    parser.add_argument("--modes", default="collect,train")
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="1 and 2 actors, short windows, small networks")
    args = parser.parse_args()
    overrides = []
    if args.quick:
        args.actors, args.warmup_s, args.window_s, args.windows = "1,2", 3.0, 3.0, 2
        overrides = ["learner.sac.hidden_dims=[64, 64]", "learner.sac.batch_size=64", "learner.sac.utd_ratio=1",
                     "learner.learning_starts=200", "actor.random_steps=200"]
    counts = [int(n) for n in args.actors.split(",")]
    modes = args.modes.split(",")
    base = inproc_config(args.config, overrides)

    import ray

    ray.init(num_cpus=max(os.cpu_count() or 1, 1 + max(counts)), include_dashboard=False,
             object_store_memory=base.ray.object_store_mb * 1024 * 1024, log_to_driver=True)
    results: dict[str, Any] = {"machine": machine_info(), "config": args.config, "quick": args.quick,
                               "window_s": args.window_s, "windows": args.windows, "runs": []}
    try:
        with tempfile.TemporaryDirectory(prefix="steerl-scale-") as tmp:
            for mode in modes:
                for count in counts:
                    results["runs"].append(measure(base, count, mode, args.warmup_s, args.window_s, args.windows,
                                                   Path(tmp)))
    finally:
        ray.shutdown()
    by = {(run["mode"], run["actors"]): run for run in results["runs"]}
    ratios = {}
    for mode in modes:
        one = by.get((mode, 1))
        for count in counts:
            if one and count != 1 and (mode, count) in by:
                ratios[f"{mode}_{count}_over_1"] = by[(mode, count)]["steps_per_s"] / one["steps_per_s"]
    results["ratios"] = ratios
    targets = {}
    for mode in modes:
        if f"{mode}_2_over_1" in ratios:
            targets[f"{mode}: 2 actors >= 1.8x one actor (got {ratios[f'{mode}_2_over_1']:.2f}x)"] = (
                ratios[f"{mode}_2_over_1"] >= 1.8)
    targets["no missing transition in any run"] = all(run["missing"] == 0 for run in results["runs"])
    results["targets"] = targets
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    print_targets(targets)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
