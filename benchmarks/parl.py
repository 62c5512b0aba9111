"""PA-RL benchmark: fine-tune a behaviour-cloned diffusion policy online with ``steerl train``
(``learner.algorithm: parl``) and compare its success before and after.

1. Offline data of mixed quality, as the V-GPS benchmark records it (benchmarks/vgps.py): scripted
   episodes with noise on most of them, failures kept (or ``--data`` an existing buffer).
2. Behaviour cloning of a diffusion policy on all of it (PA-RL's shape: ``horizon`` 1, one
   observation), the imperfect starting point.
3. Its success over ``--eval-episodes`` held-out episodes, actions sampled: the "before".
4. ``steerl train`` with PA-RL for ``--steps`` online env steps (robot server, learner and actor
   processes, the offline data as the demo buffer): the learner samples N actions of the base,
   keeps the critic's top k, refines them by gradient ascent, trains the critic on them and
   distils them into the base; the actor acts with the steered policy.
5. The "after", on the same held-out episodes: the steered policy of the final checkpoint (what
   ``steerl eval`` loads: the best of the optimised actions) and, for reference, the distilled base
   policy alone (sampled). The learner's
   logged critic gain of the action optimisation (mean Q of the optimised actions minus that of
   the base samples) is read from its TensorBoard scalars.

Targets: the steered policy ends >= 25 points above the BC start, and the mean critic gain > 0.

    python benchmarks/parl.py --json benchmarks/results/parl.json --work-dir runs/parl   # long on a CPU
    python benchmarks/parl.py --quick                                                    # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actor.env import make_env  # noqa: E402
from benchmarks.learning import HELD_OUT_SEED, run_variant  # noqa: E402
from benchmarks.machine import machine_info, print_targets, write_json  # noqa: E402
from benchmarks.sac_sweep import inproc_config, with_override  # noqa: E402
from benchmarks.vgps import episode_plan, record_data  # noqa: E402
from hardware_configs.schema import PARLConfig, save_config  # noqa: E402
from learner.learner import BASE_POLICY_DIR, latest_checkpoint  # noqa: E402
from learner.replay import ReplayBuffer  # noqa: E402
from policies.base import load_policy  # noqa: E402
from policies.diffusion import DiffusionPolicyConfig, train_diffusion_policy  # noqa: E402
from tools.session import evaluate_policy  # noqa: E402

TARGET_GAIN = 0.25


def learner_scalars(run_dir: Path, tag: str) -> list[float]:
    """Every value the learner logged under ``tag`` (TensorBoard event files of ``run_dir``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: list[float] = []
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            values.extend(event.value for event in accumulator.Scalars(tag))
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sim_panda_pick_cube")
    parser.add_argument("--max-episode-steps", type=int, default=50)
    parser.add_argument("--data", type=Path, help="an offline replay buffer to use instead of recording one")
    parser.add_argument("--episodes", type=int, default=200, help="scripted episodes of offline data")
    parser.add_argument("--noisy-share", type=float, default=0.75)
    parser.add_argument("--noise-levels", default="0.3,0.6,1.0")
    parser.add_argument("--bc-steps", type=int, default=3000)
    parser.add_argument("--bc-hidden", type=int, default=128)
    parser.add_argument("--bc-blocks", type=int, default=2)
    parser.add_argument("--train-timesteps", type=int, default=50)
    parser.add_argument("--ddim-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20_000, help="online env steps")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--local-step-size", type=float, default=0.05)
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--reuse-run", action="store_true",
                        help="take the BC policy, the PA-RL run and its evaluations from --work-dir (an earlier run "
                             "of this script) instead of training again; the rest is measured afresh")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data, training and evaluation")
    parser.add_argument("overrides", nargs="*", help="dotted.config.path=JSON value for the session config")
    args = parser.parse_args(argv)
    if args.quick:
        args.episodes, args.bc_steps, args.steps, args.eval_episodes = 6, 60, 300, 3
        args.bc_hidden, args.bc_blocks, args.num_samples, args.top_k, args.local_steps = 32, 1, 4, 2, 2
        args.overrides = ["learner.sac.hidden_dims=[32, 32]", "learner.sac.batch_size=32", "learner.sac.utd_ratio=1",
                          "learner.learning_starts=100", "learner.publish_every_updates=25",
                          "actor.eval_every_episodes=0", *args.overrides]
    torch.set_num_threads(1)
    started = time.monotonic()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="steerl-parl-"))
    work.mkdir(parents=True, exist_ok=True)
    config = inproc_config(args.config, [f"robot.task.max_episode_steps={args.max_episode_steps}"])
    keys = tuple(config.learner.observation_keys)
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "config": args.config,
                               "work_dir": str(work), "arguments": {k: str(v) for k, v in vars(args).items()}}

    # 1. offline data
    if args.data:
        data_dir = args.data
        buffer = ReplayBuffer.load(data_dir)
        results["data"] = {"path": str(data_dir), "transitions": len(buffer)}
    else:
        data_dir = work / "data"
        env = make_env(config)
        observation_space = {k: env.observation_space[k] for k in keys}
        import gymnasium as gym

        plan = episode_plan(args.episodes, args.noisy_share, [float(v) for v in args.noise_levels.split(",")])
        buffer = ReplayBuffer(gym.spaces.Dict(observation_space), env.action_space.shape[0],
                              capacity=max(1000, sum(c for _, c in plan) * args.max_episode_steps + 10), seed=config.seed)
        print(f"1. recording {sum(c for _, c in plan)} scripted episodes (plan {plan})", flush=True)
        levels = record_data(env, config, keys, plan, buffer)
        env.close()
        buffer.save(data_dir)
        wins, total = sum(level["successes"] for level in levels), sum(level["episodes"] for level in levels)
        results["data"] = {"path": str(data_dir), "transitions": len(buffer), "episodes": total,
                           "success_rate": wins / total, "levels": levels}

    # 2. behaviour cloning
    bc_config = DiffusionPolicyConfig(horizon=1, n_obs=1, action_steps=1, observation_keys=keys,
                                      hidden_dim=args.bc_hidden, num_blocks=args.bc_blocks,
                                      train_timesteps=args.train_timesteps, inference_steps=args.ddim_steps,
                                      lr_warmup_steps=min(100, args.bc_steps // 10))
    if args.reuse_run:
        print(f"2. the BC policy of {work / 'base'}", flush=True)
        base = load_policy(work / "base")
    else:
        print(f"2. behaviour cloning: {args.bc_steps} steps", flush=True)
        base = train_diffusion_policy(bc_config, data_dir, args.bc_steps, seed=config.seed,
                                      log_every=max(1, args.bc_steps // 5),
                                      progress=lambda s, loss: print(f"   step {s}: loss {loss:.4f}", flush=True))
        base.save(work / "base")
    results["bc"] = {"steps": args.bc_steps, "final_loss": base.info.get("final_loss"),
                     "config": dataclasses.asdict(bc_config)}

    # 3. before
    # A diffusion policy acts by sampling (its "deterministic" mode denoises from zero noise, an
    # average of the modes that does worse here): the sampled policy is the starting point.
    print(f"3. the BC policy over {args.eval_episodes} held-out episodes", flush=True)
    results["before"] = evaluate_policy(config, base, keys, args.eval_episodes, seed=HELD_OUT_SEED,
                                        deterministic=False)
    results["before_zero_noise"] = evaluate_policy(config, base, keys, args.eval_episodes, seed=HELD_OUT_SEED)
    print(f"   success {results['before']['success_rate']:.0%} sampled, "
          f"{results['before_zero_noise']['success_rate']:.0%} from zero noise", flush=True)

    # 4. online PA-RL
    parl = PARLConfig(base_policy=str((work / "base").resolve()), num_samples=args.num_samples, top_k=args.top_k,
                      local_steps=args.local_steps, local_step_size=args.local_step_size)
    session = dataclasses.replace(config, env=dataclasses.replace(config.env, connection="zmq"),
                                  learner=dataclasses.replace(config.learner, algorithm="parl", parl=parl))
    for override in args.overrides:
        path, _, value = override.partition("=")
        session = with_override(session, path, json.loads(value))
    config_file = save_config(session, work / "parl.yaml")
    if args.reuse_run:
        print(f"4. the PA-RL run of {work / 'parl'} and its evaluations", flush=True)
        summary = json.loads((work / "parl" / "summary.json").read_text())
        variant = {"env_steps": summary["env_steps"], "episodes": summary["episodes"],
                   "train_wall_s": round(summary["wall_time_s"], 1), "curve": summary["eval_history"],
                   "final_eval": json.loads((work / "parl_final_eval.json").read_text()),
                   "best_policy_eval": json.loads((work / "parl_best_eval.json").read_text()),
                   "run_dir": str(work / "parl"), "reused": True}
    else:
        print(f"4. steerl train with PA-RL: {args.steps} online steps (log: {work / 'parl.log'})", flush=True)
        variant = run_variant("parl", config_file, work, args.steps, demos=1, eval_episodes=args.eval_episodes,
                              demos_dir=data_dir)
    results["parl"] = variant
    results["after"] = variant["final_eval"]

    # 5. the distilled base alone, and the critic gain
    distilled = load_policy(latest_checkpoint(work / "parl") / BASE_POLICY_DIR)
    results["after_distilled_base"] = evaluate_policy(config, distilled, keys, args.eval_episodes, seed=HELD_OUT_SEED,
                                                      deterministic=False)
    gains = learner_scalars(work / "parl", "learner/critic_gain")
    results["critic_gain"] = {"mean": float(np.mean(gains)) if gains else None, "logged": len(gains),
                              "first": gains[0] if gains else None, "last": gains[-1] if gains else None}
    gain = results["after"]["success_rate"] - results["before"]["success_rate"]
    results["success_gain"] = gain
    results["targets"] = {
        f"steered policy >= BC + {TARGET_GAIN:.0%} (got {gain:+.0%})": gain >= TARGET_GAIN,
        "mean critic gain of the action optimisation > 0": bool(gains) and float(np.mean(gains)) > 0,
    }
    results["wall_s"] = round(time.monotonic() - started, 1)
    print(f"\nBC {results['before']['success_rate']:.0%} -> PA-RL {results['after']['success_rate']:.0%} "
          f"(distilled base alone {results['after_distilled_base']['success_rate']:.0%}); "
          f"mean critic gain {results['critic_gain']['mean']}")
    print_targets(results["targets"])
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
