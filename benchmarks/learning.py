"""Learning benchmark: a seeded `steerl train` session, its evaluation curve, and a final
50-episode evaluation — with and without scripted demos, and with a (simulated) operator intervening.

For each variant it runs exactly what an operator runs (separate robot-server, learner and actor
processes over loopback ZeroMQ)::

    steerl record-demos --config CONFIG -n DEMOS --out WORK/demos          (demo variant only)
    steerl train --config CONFIG --steps STEPS [--demos WORK/demos] --run-dir WORK/<variant>
    steerl eval --config CONFIG --checkpoint WORK/<variant> --episodes EVAL_EPISODES

and reports the periodic evaluation curve (success rate of ``actor.eval_episodes`` deterministic
episodes every ``actor.eval_every_episodes`` episodes, from the run's summary.json), the final
evaluation over ``--eval-episodes`` episodes, the wall time, and the first env step at which the
periodic evaluation reached the target. The curves are drawn into a PNG with OpenCV.

    python benchmarks/learning.py --config sim_panda_pick_cube --steps 30000 --compare-without-demos \\
        --png benchmarks/results/learning_pick_cube.png --json benchmarks/results/learning_pick_cube.json

Several ``--seed`` values train every variant once per seed; the human-in-the-loop comparison then
uses the median steps to the target over the seeds (one seed's luck decides too much on its own)::

    python benchmarks/learning.py --compare-with-operator --seed 1 2 3 --steps 12000 --eval-every 10 \\
        --parallel --work-dir runs/hil --png benchmarks/results/hil.png --json benchmarks/results/hil.json

``--quick`` shrinks everything to a smoke run (a few hundred steps; no learning is expected).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_info, print_targets, write_json  # noqa: E402
from hardware_configs.schema import SessionConfig, load_config, save_config  # noqa: E402

TARGET_SUCCESS = 0.9
# Seeds the episode seeds of the final evaluations: not the config's seed, which the training run used.
HELD_OUT_SEED = 7_919
CURVE_COLOURS_BGR = {"demos": (40, 120, 220), "no_demos": (60, 160, 60), "operator": (160, 60, 160),
                     "wsrl": (40, 120, 220), "wsrl_no_warmup": (60, 160, 60), "rlpd": (160, 60, 160)}
INTERVENTION_BIN_STEPS = 2_500
# A bin of fewer training episodes is too small to count towards the intervention-rate target.
MIN_EPISODES_PER_BIN = 10
# The bins of the training-episode curves drawn (the targets use INTERVENTION_BIN_STEPS).
TRAINING_CURVE_BIN_STEPS = 1_000
MIN_EPISODES_PER_POINT = 3


def steerl(*arguments: str, log_path: Path) -> float:
    """Run ``python -m tools.cli ARGUMENTS`` (output to ``log_path``); returns its wall time."""
    started = time.monotonic()
    with open(log_path, "ab") as log:
        completed = subprocess.run([sys.executable, "-m", "tools.cli", "--log-level", "warning", *arguments],
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        raise RuntimeError(f"steerl {arguments[0]} failed with code {completed.returncode}; see {log_path}")
    return time.monotonic() - started


def quick_config(config: SessionConfig) -> SessionConfig:
    """A smoke-run variant: short episodes, early learning, frequent evaluation."""
    task = dataclasses.replace(config.robot.task, max_episode_steps=30)
    robot = dataclasses.replace(config.robot, task=task)
    learner = dataclasses.replace(config.learner, learning_starts=100, checkpoint_every_updates=10_000)
    actor = dataclasses.replace(config.actor, random_steps=100, eval_every_episodes=4, eval_episodes=2)
    return dataclasses.replace(config, robot=robot, learner=learner, actor=actor)


def free_loopback_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def with_own_ports(config: SessionConfig) -> SessionConfig:
    """The config on fresh loopback ports, so that variants can train side by side."""
    robot_address, learner_address = free_loopback_address(), free_loopback_address()
    return dataclasses.replace(
        config, server=dataclasses.replace(config.server, address=robot_address),
        env=dataclasses.replace(config.env, address=robot_address),
        learner=dataclasses.replace(config.learner, address=learner_address))


def run_variant(name: str, config_file: Path, work: Path, steps: int, demos: int, eval_episodes: int,
                demos_dir: Path | None = None, train_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train one variant (with the demo buffer ``demos_dir``, default ``work/demos``, when ``demos``;
    ``train_args`` go to ``steerl train`` as they are), then evaluate it."""
    run_dir = work / name
    log_path = work / f"{name}.log"
    demo_args = ("--demos", str(demos_dir or work / "demos")) if demos else ()
    train_s = steerl("train", "--config", str(config_file), "--steps", str(steps), "--run-dir", str(run_dir),
                     *demo_args, *train_args, log_path=log_path)
    summary = json.loads((run_dir / "summary.json").read_text())

    def evaluate(checkpoint: Path, label: str) -> dict[str, Any]:
        """``eval_episodes`` episodes from seeds the training run never drew."""
        path = work / f"{name}_{label}_eval.json"
        steerl("eval", "--config", str(config_file), "--checkpoint", str(checkpoint), "--episodes",
               str(eval_episodes), "--seed", str(HELD_OUT_SEED), "--json", str(path), log_path=log_path)
        return json.loads(path.read_text())

    final = evaluate(run_dir, "final")
    best = None
    if (run_dir / "best_policy").exists():
        best = {**evaluate(run_dir / "best_policy", "best"), "selected_by": summary["best_eval"]}
    curve = summary["eval_history"]
    episodes = summary.get("episode_history", [])
    return {
        "demos": demos,
        "env_steps": summary["env_steps"],
        "episodes": summary["episodes"],
        "train_wall_s": round(train_s, 1),
        "curve": curve,
        "final_eval": final,
        "best_policy_eval": best,
        **steps_to_target(curve),
        "training_episodes": binned_episode_rates(episodes, INTERVENTION_BIN_STEPS),
        "training_curve": binned_episode_rates(episodes, TRAINING_CURVE_BIN_STEPS),
        "run_dir": str(run_dir),
    }


def steps_to_target(curve: list[dict[str, Any]]) -> dict[str, int | None]:
    """The env step of the first periodic evaluation at >= ``TARGET_SUCCESS``, and of the first one
    that the next evaluation confirms (two in a row: 20 episodes instead of 10, less luck)."""
    hits = [point["success_rate"] >= TARGET_SUCCESS for point in curve]
    first = next((point["env_steps"] for point, hit in zip(curve, hits) if hit), None)
    confirmed = next((curve[i]["env_steps"] for i in range(len(curve) - 1) if hits[i] and hits[i + 1]), None)
    return {"first_step_at_target": first, "first_step_at_target_confirmed": confirmed}


def operator_comparison(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The human-in-the-loop targets: the operator variant's steps to the target over the demos
    variant's (at most 0.5), and its intervention rate falling (the last 2.5k-step bin's rate at
    most half the first bin's)."""
    demos, operator = variants["demos"], variants["operator"]
    ratios = {}
    for key in ("first_step_at_target", "first_step_at_target_confirmed"):
        if demos[key] and operator[key]:
            ratios[key] = operator[key] / demos[key]
    bins = [b for b in operator["training_episodes"] if b["episodes"] >= MIN_EPISODES_PER_BIN]
    rates = [b["intervention_rate"] for b in bins]
    return {
        "steps_ratio_operator_over_demos": ratios,
        "intervention_rate_by_bin": rates,
        "targets": {
            "operator_halves_steps_to_target_first_eval": bool(ratios.get("first_step_at_target", 1.0) <= 0.5),
            "operator_halves_steps_to_target_confirmed": bool(ratios.get("first_step_at_target_confirmed", 1.0) <= 0.5),
            "operator_intervention_rate_falls": bool(len(rates) >= 2 and rates[-1] <= 0.5 * rates[0]),
        },
    }


def median_steps(values: list[int | None]) -> float | None:
    """The median of steps-to-target over seeds, a run that never got there counting as infinitely
    many steps (so a minority of such runs does not hide, and a majority makes the median None)."""
    ordered = sorted(float("inf") if value is None else float(value) for value in values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return None if median == float("inf") else median


def operator_comparison_over_seeds(per_seed: dict[int, dict[str, dict[str, Any]]], steps: int) -> dict[str, Any]:
    """:func:`operator_comparison` over several seeds: the operator variant's median steps to the
    target over the demos variant's median (at most 0.5; where the demos variant's median run never
    got there within ``steps``, the ratio is at most the operator's median over ``steps`` and is
    reported as that bound), and the intervention rate falling in every seed."""
    ratios, medians = {}, {}
    for key in ("first_step_at_target", "first_step_at_target_confirmed"):
        demos = median_steps([variants["demos"][key] for variants in per_seed.values()])
        operator = median_steps([variants["operator"][key] for variants in per_seed.values()])
        medians[key] = {"demos": demos, "operator": operator}
        if operator is not None:
            ratios[key] = operator / (demos if demos is not None else steps)
    single = {seed: operator_comparison(variants) for seed, variants in per_seed.items()}
    return {
        "median_steps_to_target": medians,
        "steps_ratio_operator_over_demos": ratios,
        "steps_ratio_per_seed": {str(seed): result["steps_ratio_operator_over_demos"] for seed, result in single.items()},
        "intervention_rate_by_bin_per_seed": {str(seed): result["intervention_rate_by_bin"]
                                              for seed, result in single.items()},
        "targets": {
            "operator_halves_median_steps_to_target_first_eval": bool(ratios.get("first_step_at_target", 1.0) <= 0.5),
            "operator_halves_median_steps_to_target_confirmed": bool(
                ratios.get("first_step_at_target_confirmed", 1.0) <= 0.5),
            "operator_intervention_rate_falls_every_seed": all(
                result["targets"]["operator_intervention_rate_falls"] for result in single.values()),
        },
    }


def binned_episode_rates(episodes: list[dict[str, float]], bin_steps: int) -> list[dict[str, float]]:
    """Training episodes grouped by the env step at which they ended, ``bin_steps`` per group: the
    mean training success and operator intervention rate of each group."""
    bins: dict[int, list[dict[str, float]]] = {}
    for episode in episodes:
        bins.setdefault(int(episode["env_steps"] // bin_steps), []).append(episode)
    return [{"env_steps_until": (index + 1) * bin_steps, "episodes": len(group),
             "success_rate": round(float(np.mean([e["success"] for e in group])), 3),
             "intervention_rate": round(float(np.mean([e["intervention_rate"] for e in group])), 3)}
            for index, group in sorted(bins.items())]


def draw_lines(lines: list[tuple[str, tuple[int, int, int], list[tuple[float, float]]]], steps: int, title: str,
               path: Path, target: float | None = TARGET_SUCCESS) -> None:
    """Rates in [0, 1] against env steps, one labelled polyline per ``(label, colour_bgr, points)``
    (OpenCV, no plotting library); ``target`` draws a grey line across."""
    steps = max([steps] + [int(step) for _, _, points in lines for step, _ in points])
    width, height, left, right, top, bottom = 900, 540 + 22 * len(lines), 80, 30, 50, 70 + 22 * len(lines)
    image = np.full((height, width, 3), 255, np.uint8)
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_pixel(step: float, rate: float) -> tuple[int, int]:
        return int(left + plot_w * step / steps), int(top + plot_h * (1.0 - rate))

    font = cv2.FONT_HERSHEY_SIMPLEX
    for tick in np.linspace(0.0, 1.0, 6):
        y = to_pixel(0, tick)[1]
        cv2.line(image, (left, y), (width - right, y), (225, 225, 225), 1)
        cv2.putText(image, f"{tick:.0%}", (left - 55, y + 5), font, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
    spacing = next(step for step in (100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 10**9)
                   if steps / step <= 8)
    for tick in range(0, steps + 1, spacing):
        x = to_pixel(tick, 0.0)[0]
        cv2.line(image, (x, top), (x, top + plot_h), (235, 235, 235), 1)
        cv2.putText(image, f"{int(tick):,}", (x - 25, top + plot_h + 22), font, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
    if target is not None:
        target_y = to_pixel(0, target)[1]
        cv2.line(image, (left, target_y), (width - right, target_y), (160, 160, 160), 1, cv2.LINE_AA)
    cv2.rectangle(image, (left, top), (left + plot_w, top + plot_h), (80, 80, 80), 1)
    cv2.putText(image, "env steps", (width - right - 80, top + plot_h + 45), font, 0.55, (40, 40, 40), 1, cv2.LINE_AA)
    cv2.putText(image, title, (left, 30), font, 0.6, (20, 20, 20), 1, cv2.LINE_AA)
    for index, (label, colour, points) in enumerate(lines):
        pixels = [to_pixel(step, rate) for step, rate in points]
        cv2.polylines(image, [np.array(pixels, np.int32)], False, colour, 2, cv2.LINE_AA)
        for pixel in pixels:
            cv2.circle(image, pixel, 3, colour, -1, cv2.LINE_AA)
        cv2.putText(image, label, (left, top + plot_h + 50 + 22 * index), font, 0.5, colour, 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def draw_curves(variants: dict[str, dict[str, Any]], steps: int, title: str, path: Path,
                start_success: dict[str, float] | None = None) -> None:
    """Periodic evaluation success against env steps, one line per variant. Each line starts at
    step 0 from ``start_success[name]`` (a pre-trained policy's success), else 0."""
    lines = []
    for name, result in variants.items():
        points = [(0.0, (start_success or {}).get(name, 0.0))] + [(p["env_steps"], p["success_rate"])
                                                                   for p in result["curve"]]
        best = result.get("best_policy_eval")
        best_text = "" if best is None else (f", best-evaluated policy ({best['selected_by']['env_steps']:,} steps) "
                                             f"{best['success_rate']:.0%}")
        label = (f"{name}: final {result['final_eval']['success_rate']:.0%} over {result['final_eval']['episodes']} "
                 f"episodes{best_text}, {result['train_wall_s'] / 60:.0f} min")
        lines.append((label, CURVE_COLOURS_BGR.get(name, (120, 60, 160)), points))
    draw_lines(lines, steps, title, path)


OPERATOR_RATES_TITLE = "{config}: the simulated operator's share of the steps and training success"


def operator_rates_png(png: Path) -> Path:
    """Where a multi-seed run's operator figure goes beside ``png``'s per-seed curves."""
    return png.with_stem(f"{png.stem}_operator")


def draw_operator_rates(per_seed: dict[int, dict[str, dict[str, Any]]], steps: int, title: str, path: Path) -> None:
    """The operator variant's training-episode success and intervention rate against env steps
    (each point: the episodes that ended in one bin, drawn at the bin's end; bins of fewer than
    ``MIN_EPISODES_PER_POINT`` episodes, such as the one a run's last episode spills into, are left
    out), a pair of lines per seed."""
    lines = []
    shades = [(160, 60, 160), (200, 110, 60), (60, 150, 90), (40, 120, 220), (90, 90, 90)]
    for index, (seed, variants) in enumerate(per_seed.items()):
        operator = variants["operator"]
        bins = operator.get("training_curve") or operator["training_episodes"]
        bins = [b for b in bins if b["episodes"] >= MIN_EPISODES_PER_POINT]
        colour = shades[index % len(shades)]
        faint = tuple(int(255 - (255 - c) * 0.45) for c in colour)
        rates = ", ".join(f"{b['intervention_rate']:.0%}" for b in operator["training_episodes"] if b["episodes"] >= MIN_EPISODES_PER_BIN)
        lines.append((f"seed {seed}: operator's share of the steps (per {INTERVENTION_BIN_STEPS:,} steps: {rates})",
                      colour, [(b["env_steps_until"], b["intervention_rate"]) for b in bins]))
        lines.append((f"seed {seed}: training episodes' success", faint,
                      [(b["env_steps_until"], b["success_rate"]) for b in bins]))
    draw_lines(lines, steps, title, path, target=None)


def run_seed(config: SessionConfig, plan: dict[str, int], steps: int, eval_episodes: int, demos_dir: Path,
             work: Path, png: Path | None, teleop: str | None, parallel: bool) -> dict[str, Any]:
    """Train and evaluate every variant of ``plan`` (name -> demos) with ``config``'s seed."""
    work.mkdir(parents=True, exist_ok=True)

    def train(name: str) -> dict[str, Any]:
        variant = config
        if name == "operator":
            variant = dataclasses.replace(config, actor=dataclasses.replace(config.actor, teleop=teleop))
        config_file = save_config(with_own_ports(variant), work / f"{name}.yaml")
        print(f"[{name} seed {config.seed}] training {config.name} for {steps} env steps ...", flush=True)
        result = run_variant(name, config_file, work, steps, plan[name], eval_episodes, demos_dir=demos_dir)
        best = result["best_policy_eval"]
        print(f"[{name} seed {config.seed}] final success {result['final_eval']['success_rate']:.0%} over "
              f"{eval_episodes} episodes; best-evaluated policy "
              + ("-" if best is None else f"{best['success_rate']:.0%} (from {best['selected_by']['env_steps']} steps)")
              + f"; {result['train_wall_s']:.0f} s; curve "
              + ", ".join(f"{p['env_steps']}:{p['success_rate']:.0%}" for p in result["curve"]), flush=True)
        return result

    with ThreadPoolExecutor(max_workers=len(plan) if parallel else 1) as pool:
        variants = dict(zip(plan, pool.map(train, plan)))
    if png:
        draw_curves(variants, steps, f"{config.name}: evaluation success (seed {config.seed})", png)
        print(f"wrote {png}")
    results: dict[str, Any] = {
        "variants": variants,
        "targets": {
            f"demos_final_ge_{TARGET_SUCCESS:.0%}": bool(
                "demos" in variants and variants["demos"]["final_eval"]["success_rate"] >= TARGET_SUCCESS),
            f"demos_best_policy_ge_{TARGET_SUCCESS:.0%}": bool(
                "demos" in variants and variants["demos"]["best_policy_eval"] is not None
                and variants["demos"]["best_policy_eval"]["success_rate"] >= TARGET_SUCCESS),
        },
    }
    if "demos" in variants and "operator" in variants:
        results["operator_comparison"] = comparison = operator_comparison(variants)
        results["targets"].update(comparison["targets"])
    return results


def redraw(results: dict[str, Any], png: Path) -> None:
    """The figures of a run, from its results JSON: the curves (one PNG per seed when there are
    several) and, where the operator variant ran over several seeds, its intervention rates."""
    if "per_seed" not in results:
        draw_curves(results["variants"], results["steps"], f"{results['config']}: evaluation success "
                    f"(seed {results['seed']})", png)
        print(f"wrote {png}")
        return
    per_seed = {int(seed): result["variants"] for seed, result in results["per_seed"].items()}
    for seed, variants in per_seed.items():
        seed_png = png.with_stem(f"{png.stem}_seed{seed}")
        draw_curves(variants, results["steps"], f"{results['config']}: evaluation success (seed {seed})", seed_png)
        print(f"wrote {seed_png}")
    if all("operator" in variants for variants in per_seed.values()):
        draw_operator_rates(per_seed, results["steps"], OPERATOR_RATES_TITLE.format(config=results["config"]),
                            operator_rates_png(png))
        print(f"wrote {operator_rates_png(png)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sim_panda_pick_cube")
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--demos", type=int, default=20, help="scripted demos (0: none)")
    parser.add_argument("--demo-noise", type=float, default=0.0,
                        help="Gaussian noise on the expert's motion while recording (it corrects itself)")
    parser.add_argument("--compare-without-demos", action="store_true", help="also run without demos")
    parser.add_argument("--compare-with-operator", nargs="?", const="simulated_operator", metavar="TELEOP",
                        help="also run with the demos and a teleop device intervening (default: the simulated "
                             "operator, hardware_configs/teleop/simulated_operator.yaml): the human-in-the-loop "
                             "benchmark")
    parser.add_argument("--skip-demos-variant", action="store_true",
                        help="do not train the plain demos variant (e.g. to run the operator variant alone)")
    parser.add_argument("--eval-episodes", type=int, default=50, help="held-out episodes of the final evaluations")
    parser.add_argument("--seed", type=int, nargs="+", metavar="SEED",
                        help="session seeds (default: the config's); with several, every variant trains once per "
                             "seed (under WORK/seed_SEED) and the comparison uses the median over seeds")
    parser.add_argument("--eval-every", type=int, metavar="EPISODES",
                        help="training episodes between periodic evaluations (default: the config's "
                             "actor.eval_every_episodes); smaller resolves the steps to the target more finely")
    parser.add_argument("--parallel", action="store_true",
                        help="train the variants side by side (wall times then include the contention)")
    parser.add_argument("--work-dir", type=Path, help="where runs go (default: a temporary directory)")
    parser.add_argument("--png", type=Path, help="write the curves here")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few hundred steps")
    parser.add_argument("--redraw", type=Path, metavar="JSON",
                        help="train nothing: draw --png again from the results a run wrote with --json")
    args = parser.parse_args(argv)
    if args.redraw:
        if not args.png:
            parser.error("--redraw needs --png")
        redraw(json.loads(args.redraw.read_text()), args.png)
        return 0

    machine = machine_info()  # before the runs: its load average is the machine's before we loaded it
    config = load_config(args.config)
    steps, eval_episodes = args.steps, args.eval_episodes
    if args.eval_every:
        config = dataclasses.replace(config, actor=dataclasses.replace(config.actor, eval_every_episodes=args.eval_every))
    if args.quick:
        config, steps, eval_episodes = quick_config(config), 300, 3
    plan: dict[str, int] = {}
    if not args.skip_demos_variant:
        plan["demos" if args.demos else "no_demos"] = args.demos
    if args.compare_without_demos and args.demos:
        plan["no_demos"] = 0
    if args.compare_with_operator:
        plan["operator"] = args.demos
    if not plan:
        parser.error("nothing to run: --skip-demos-variant needs --compare-without-demos or --compare-with-operator")
    seeds = args.seed or [config.seed]
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seed: each seed once, got {seeds}")
    with tempfile.TemporaryDirectory(prefix="steerl-learning-") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if args.demos:
            # Recorded once, before any variant starts (a parallel run cannot race on it), and shared
            # by every seed: the seeds vary the training, not the demonstrations.
            steerl("record-demos", "--config", str(save_config(config, work / "record.yaml")), "-n", str(args.demos),
                   "--out", str(work / "demos"), "--noise", str(args.demo_noise), log_path=work / "demos.log")
        per_seed = {}
        for seed in seeds:
            seed_work = work if len(seeds) == 1 else work / f"seed_{seed}"
            png = args.png if args.png is None or len(seeds) == 1 else args.png.with_stem(f"{args.png.stem}_seed{seed}")
            per_seed[seed] = run_seed(dataclasses.replace(config, seed=seed), plan, steps, eval_episodes, work / "demos",
                                      seed_work, png, args.compare_with_operator, args.parallel)
    common = {"machine": machine, "quick": args.quick, "config": config.name, "steps": steps,
              "demo_noise": args.demo_noise, "parallel": args.parallel}
    if len(seeds) == 1:
        results = {**common, "seed": seeds[0], **per_seed[seeds[0]]}
        if "operator_comparison" in results:
            print_targets(results["operator_comparison"]["targets"])
    else:
        results = {**common, "seeds": seeds, "per_seed": {str(seed): result for seed, result in per_seed.items()}}
        if all("operator_comparison" in result for result in per_seed.values()):
            results["operator_comparison"] = comparison = operator_comparison_over_seeds(
                {seed: result["variants"] for seed, result in per_seed.items()}, steps)
            if args.png:
                draw_operator_rates({seed: result["variants"] for seed, result in per_seed.items()}, steps,
                                    OPERATOR_RATES_TITLE.format(config=config.name), operator_rates_png(args.png))
                print(f"wrote {operator_rates_png(args.png)}")
            results["targets"] = comparison["targets"]
            print_targets(comparison["targets"])
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
