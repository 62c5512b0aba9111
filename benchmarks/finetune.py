"""Offline-to-online benchmark: Cal-QL pre-training on mixed-quality data, then online fine-tuning
with WSRL (warm start, no offline data retained), the same without warm-up, and RLPD from scratch
with the offline data — each for the same number of online env steps, same seed.

What runs is what an operator runs (separate robot-server, learner and actor processes over
loopback ZeroMQ)::

    steerl record-demos --config CONFIG -n EPISODES --keep-failures --noise NOISE --clean-episodes N --out WORK/data
    steerl train-calql --data WORK/data --session CONFIG' --config WORK/calql.yaml --steps N --out WORK/calql
                                                    (CONFIG': CONFIG with learner.sac.utd_ratio --calql-utd)
    steerl eval --checkpoint WORK/calql ...                           (the pre-trained policy)
    steerl train ... --warm-start WORK/calql --warmup-steps W         wsrl
    steerl train ... --warm-start WORK/calql --warmup-steps 0         wsrl_no_warmup
    steerl train ... --demos WORK/data                                rlpd (from scratch, 50 % offline rows)

The offline data is the scripted expert with Gaussian action noise, failures kept (mostly clumsy and
failed attempts), plus ``--clean-episodes`` noise-free ones in the same buffer. Every variant uses
HIL-SERL's discrete gripper critic (``--no-gripper-critic`` to drop it), explored epsilon-greedily
online (``--gripper-epsilon``, the config's ``gripper_critic.exploration_epsilon`` by default: without
it the warm-started gripper critic, no longer conservative, over-values closing far from the cube and
the policy collapses) and, with ``--gripper-conservative-weight``, kept conservative online too (the
executed class above the others: without it the head can come to rank "close later" above "close
now" and never close); Cal-QL keeps that critic conservative in pre-training with its own term,
and adds a behaviour-cloning term (``--bc-weight``) to its actor: with the 100 noisy + 50 clean
episodes, alpha_cql 1 and bc_weight 5, the pre-trained policy grasps (100 % over 50
held-out episodes after 6,000 steps), where without them it hovered over the cube or closed the
gripper at once (RESULTS "WSRL: offline pre-training"). Every variant evaluates its deterministic
policy every ``--eval-every`` episodes (``--eval-episodes-periodic`` episodes; the curves) and at
the end on ``--eval-episodes`` held-out episodes.

Targets (the issue's): WSRL shows no post-switch collapse — its lowest periodic evaluation in the
``--collapse-window`` online steps after its policy's first update can happen (after the warm-up
and ``learner.warm_start.actor_delay_updates``) is at most ``--collapse-tolerance`` below the
pre-trained policy's held-out success — and its final success is at least RLPD's. The lowest
evaluation of the whole run is reported beside it.

    python benchmarks/finetune.py --steps 20000 --calql-steps 6000 --warmup-steps 5000 \\
        --gripper-conservative-weight 1.0 --work-dir runs/finetune \\
        --png benchmarks/results/finetune_pick_cube.png --json benchmarks/results/finetune_pick_cube.json
    python benchmarks/finetune.py --quick

For trials: ``--variants`` trains a subset, ``--reuse-pretraining`` skips steps 1-2 when the work
directory already holds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.learning import (  # noqa: E402
    HELD_OUT_SEED,
    draw_curves,
    quick_config,
    run_variant,
    steerl,
    with_own_ports,
)
from benchmarks.machine import machine_info, print_targets, write_json  # noqa: E402
from hardware_configs.schema import load_config, save_config  # noqa: E402

VARIANTS = ("wsrl", "wsrl_no_warmup", "rlpd")


def collapse(curve: list[dict[str, Any]], window_end_steps: int, reference: float) -> dict[str, Any]:
    """The lowest periodic evaluation up to ``window_end_steps`` env steps, how far it falls below
    ``reference`` (the pre-trained policy's success), and the lowest of the whole run."""
    early = [point for point in curve if point["env_steps"] <= window_end_steps]
    whole_run = min((point["success_rate"] for point in curve), default=None)
    if not early:
        return {"window_end_steps": window_end_steps, "evaluations": 0, "min_success": None,
                "dip_below_pretrained": None, "min_success_whole_run": whole_run}
    lowest = min(point["success_rate"] for point in early)
    return {"window_end_steps": window_end_steps, "evaluations": len(early), "min_success": lowest,
            "dip_below_pretrained": round(reference - lowest, 3), "min_success_whole_run": whole_run}


def collapse_window_end(window_steps: int, warmup_steps: int, actor_delay_updates: int) -> int:
    """Where a warm-started variant's collapse window ends: ``window_steps`` after the policy's first
    update can happen (updates start after the warm-up, one per env step, and the first
    ``actor_delay_updates`` leave the policy alone), so that a delay cannot push a dip past it."""
    return warmup_steps + actor_delay_updates + window_steps


def pretrain(args: argparse.Namespace, work: Path, session_file: Path, calql_session: Path, data_episodes: int,
             clean_episodes: int, calql_steps: int, eval_episodes: int, log_path: Path) -> float:
    """Steps 1-2: record the offline data into WORK/data, pre-train Cal-QL into WORK/calql and evaluate
    it on held-out episodes into WORK/pretrained_eval.json; returns Cal-QL's wall time (s)."""
    print(f"1. recording {data_episodes} offline episodes (noise {args.data_noise}, failures kept) and "
          f"{clean_episodes} clean ones", flush=True)
    steerl("record-demos", "--config", str(session_file), "-n", str(data_episodes), "--keep-failures",
           "--noise", str(args.data_noise), "--clean-episodes", str(clean_episodes), "--out", str(work / "data"),
           log_path=log_path)
    calql_file = work / "calql.yaml"
    calql_file.write_text(f"alpha_cql: {args.alpha_cql}\nnum_action_samples: {args.cql_samples}\n"
                          f"bc_weight: {args.bc_weight}\nlog_every: {max(1, calql_steps // 10)}\n")
    print(f"2. Cal-QL pre-training: {calql_steps} steps", flush=True)
    calql_s = steerl("train-calql", "--data", str(work / "data"), "--session", str(calql_session), "--config",
                     str(calql_file), "--steps", str(calql_steps), "--threads", "1", "--out", str(work / "calql"),
                     log_path=log_path)
    steerl("eval", "--config", str(session_file), "--checkpoint", str(work / "calql"), "--episodes",
           str(eval_episodes), "--seed", str(HELD_OUT_SEED), "--json", str(work / "pretrained_eval.json"),
           log_path=log_path)
    return calql_s

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sim_panda_pick_cube")
    parser.add_argument("--steps", type=int, default=20_000, help="online env steps per variant")
    parser.add_argument("--data-episodes", type=int, default=100, help="offline episodes (failures kept)")
    parser.add_argument("--data-noise", type=float, default=0.5, help="action-noise std of the offline expert")
    parser.add_argument("--calql-steps", type=int, default=10_000, help="Cal-QL gradient steps")
    parser.add_argument("--calql-utd", type=int, default=1,
                        help="critic steps per Cal-QL step (the online learner keeps its own learner.sac.utd_ratio)")
    parser.add_argument("--clean-episodes", type=int, default=50,
                        help="noise-free scripted episodes recorded into the same offline buffer")
    parser.add_argument("--alpha-cql", type=float, default=1.0)
    parser.add_argument("--bc-weight", type=float, default=5.0, help="Cal-QL's behaviour-cloning term on the actor")
    parser.add_argument("--gripper-critic", action=argparse.BooleanOptionalAction, default=True,
                        help="HIL-SERL's discrete gripper critic in every variant (Cal-QL keeps it conservative)")
    parser.add_argument("--gripper-epsilon", type=float,
                        help="gripper_critic.exploration_epsilon of every variant (default: the config's)")
    parser.add_argument("--gripper-conservative-weight", type=float,
                        help="gripper_critic.conservative_weight of every variant online (default: the config's)")
    parser.add_argument("--cql-samples", type=int, default=4, help="actions per proposal in the regulariser")
    parser.add_argument("--warmup-steps", type=int, default=2_000, help="WSRL's warm-up (env steps, no updates)")
    parser.add_argument("--actor-delay-updates", type=int,
                        help="learner.warm_start.actor_delay_updates of the warm-started variants (critic-only "
                             "updates; default: the config's)")
    parser.add_argument("--offline-ratio", type=float, default=0.0,
                        help="learner.warm_start.offline_ratio of the warm-started variants: that share of each "
                             "batch from the offline data (0: WSRL's choice, the data discarded)")
    parser.add_argument("--eval-every", type=int, default=20, help="episodes between periodic evaluations")
    parser.add_argument("--eval-episodes-periodic", type=int, default=10)
    parser.add_argument("--eval-episodes", type=int, default=50, help="held-out episodes of the final evaluations")
    parser.add_argument("--collapse-window", type=int, default=5_000, help="online steps watched for a collapse")
    parser.add_argument("--collapse-tolerance", type=float, default=0.2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which variants to train (a trial; the targets need wsrl and rlpd)")
    parser.add_argument("--reuse-pretraining", action="store_true",
                        help="skip steps 1-2 when WORK holds their results from an earlier run (same options)")
    parser.add_argument("--parallel", action="store_true", help="train the variants side by side")
    parser.add_argument("--work-dir", type=Path, help="where everything goes (default: a temporary directory)")
    parser.add_argument("--png", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="a smoke run (a few hundred steps, tiny pre-training)")
    args = parser.parse_args(argv)

    if not 0.0 <= args.offline_ratio < 1.0:
        parser.error(f"--offline-ratio must lie in [0, 1), got {args.offline_ratio}")
    if args.gripper_epsilon is not None and not 0.0 <= args.gripper_epsilon <= 1.0:
        parser.error(f"--gripper-epsilon must lie in [0, 1], got {args.gripper_epsilon}")
    machine = machine_info()
    config = load_config(args.config)
    steps, eval_episodes, calql_steps, warmup = args.steps, args.eval_episodes, args.calql_steps, args.warmup_steps
    data_episodes, window = args.data_episodes, args.collapse_window
    actor = dataclasses.replace(config.actor, eval_every_episodes=args.eval_every,
                                eval_episodes=args.eval_episodes_periodic)
    sac = config.learner.sac
    gripper_critic = dataclasses.replace(sac.gripper_critic, enabled=args.gripper_critic)
    if args.gripper_epsilon is not None:
        gripper_critic = dataclasses.replace(gripper_critic, exploration_epsilon=args.gripper_epsilon)
    if args.gripper_conservative_weight is not None:
        gripper_critic = dataclasses.replace(gripper_critic, conservative_weight=args.gripper_conservative_weight)
    sac = dataclasses.replace(sac, gripper_critic=gripper_critic)
    warm_start = config.learner.warm_start
    if args.actor_delay_updates is not None:
        warm_start = dataclasses.replace(warm_start, actor_delay_updates=args.actor_delay_updates)
    config = dataclasses.replace(config, actor=actor, learner=dataclasses.replace(config.learner, sac=sac,
                                                                                  warm_start=warm_start))
    clean_episodes = args.clean_episodes
    if args.quick:
        config = quick_config(config)
        steps, eval_episodes, calql_steps, warmup, data_episodes, window = 300, 3, 50, 100, 4, 300
        clean_episodes = min(clean_episodes, 2)

    with tempfile.TemporaryDirectory(prefix="steerl-finetune-") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        session_file = save_config(config, work / "session.yaml")
        # Only the networks must match the online learner's (the warm start checks them), not the UTD ratio.
        calql_sac = dataclasses.replace(config.learner.sac, utd_ratio=args.calql_utd)
        calql_session = save_config(dataclasses.replace(
            config, learner=dataclasses.replace(config.learner, sac=calql_sac)), work / "calql_session.yaml")
        log_path = work / "offline.log"
        pretrained_path = work / "pretrained_eval.json"
        calql_s = None
        if args.reuse_pretraining and pretrained_path.exists():
            print(f"1-2. reusing the offline data and the Cal-QL checkpoint in {work}", flush=True)
        else:
            calql_s = pretrain(args, work, session_file, calql_session, data_episodes, clean_episodes, calql_steps,
                               eval_episodes, log_path)
        pretrained = json.loads(pretrained_path.read_text())
        print(f"   pre-trained policy: {pretrained['success_rate']:.0%} over {pretrained['episodes']} held-out "
              "episodes", flush=True)

        warm = ("--warm-start", str(work / "calql"))
        plan = {"wsrl": (0, warm + ("--warmup-steps", str(warmup))),
                "wsrl_no_warmup": (0, warm + ("--warmup-steps", "0")),
                "rlpd": (1, ())}
        plan = {name: plan[name] for name in VARIANTS if name in args.variants}

        warm_config = config
        if args.offline_ratio > 0.0:
            warm_config = dataclasses.replace(config, learner=dataclasses.replace(
                config.learner, warm_start=dataclasses.replace(
                    config.learner.warm_start, offline_ratio=args.offline_ratio,
                    offline_data=(str((work / "data").resolve()),))))

        def train(name: str) -> dict[str, Any]:
            demos, train_args = plan[name]
            variant_config = config if name == "rlpd" else warm_config
            config_file = save_config(with_own_ports(variant_config), work / f"{name}.yaml")
            print(f"[{name}] training for {steps} online env steps ...", flush=True)
            result = run_variant(name, config_file, work, steps, demos, eval_episodes, demos_dir=work / "data",
                                 train_args=train_args)
            window_end = window if name == "rlpd" else collapse_window_end(
                window, warmup if name == "wsrl" else 0, config.learner.warm_start.actor_delay_updates)
            result["collapse"] = collapse(result["curve"], window_end, pretrained["success_rate"])
            print(f"[{name}] final {result['final_eval']['success_rate']:.0%}; lowest periodic evaluation in the "
                  f"first {window_end} steps {result['collapse']['min_success']}, in the whole run "
                  f"{result['collapse']['min_success_whole_run']}; curve "
                  + ", ".join(f"{p['env_steps']}:{p['success_rate']:.0%}" for p in result["curve"]), flush=True)
            return result

        with ThreadPoolExecutor(max_workers=len(plan) if args.parallel else 1) as pool:
            variants = dict(zip(plan, pool.map(train, plan)))
        if args.png:
            draw_curves(variants, steps, f"{config.name}: online fine-tuning after Cal-QL "
                                         f"(pre-trained {pretrained['success_rate']:.0%})", args.png,
                        start_success={name: pretrained["success_rate"] for name in variants if name != "rlpd"})
            print(f"wrote {args.png}")

    targets = {}
    if "wsrl" in variants:
        dip = variants["wsrl"]["collapse"]["dip_below_pretrained"]
        targets["wsrl_no_post_switch_collapse"] = bool(dip is not None and dip <= args.collapse_tolerance + 1e-9)
    if "wsrl" in variants and "rlpd" in variants:
        targets["wsrl_final_ge_rlpd"] = bool(variants["wsrl"]["final_eval"]["success_rate"]
                                             >= variants["rlpd"]["final_eval"]["success_rate"])
    results = {
        "machine": machine,
        "quick": args.quick,
        "config": config.name,
        "seed": config.seed,
        "steps": steps,
        "parallel": args.parallel,
        "options": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "offline_data": {"episodes": data_episodes, "noise": args.data_noise, "clean_episodes": clean_episodes},
        "gripper_critic": args.gripper_critic,
        "gripper_exploration_epsilon": config.learner.sac.gripper_critic.exploration_epsilon,
        "gripper_conservative_weight": config.learner.sac.gripper_critic.conservative_weight,
        "calql": {"steps": calql_steps, "utd_ratio": args.calql_utd, "alpha_cql": args.alpha_cql,
                  "bc_weight": args.bc_weight,
                  "wall_s": None if calql_s is None else round(calql_s, 1)},
        "pretrained_eval": pretrained,
        "variants": variants,
        "targets": targets,
    }
    print_targets(results["targets"])
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
