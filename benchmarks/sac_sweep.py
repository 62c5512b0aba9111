"""In-process SAC/RLPD runs for hyper-parameter sweeps: the learner's update and replay code and the
robot cell in one process (no sockets, no pacing), with an evaluation curve.

It answers "does this change learn faster?" in a fraction of the time of a full `steerl train`
session (same networks, updates and demos; the actor's random steps, the mixed demo/online batches
(`learner.replay.sample_mixed`) and the state standardisation as the learner does them), so that only promising settings go on to
benchmarks/learning.py. Overrides are dotted config paths with JSON values::

    python benchmarks/sac_sweep.py --steps 20000 learner.sac.utd_ratio=4 robot.task.dense_reward_weight=0.3
    python benchmarks/sac_sweep.py --demo-noise 0.3 --tag noisy-demos --json runs/sweep/noisy.json

Evaluation: ``--eval-episodes`` deterministic episodes (fixed seeds) every ``--eval-every`` steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actor.env import make_env  # noqa: E402
from actor.rollout import play_episode, record_episodes  # noqa: E402
from benchmarks.machine import machine_info, write_json  # noqa: E402
from hardware_configs.schema import SessionConfig, load_config  # noqa: E402
from learner.learner import save_agent  # noqa: E402
from learner.replay import ReplayBuffer, sample_mixed  # noqa: E402
from learner.sac import SACAgent  # noqa: E402
from policies.scripted import ScriptedExpert  # noqa: E402

EVAL_SEED = 100_000
DEMO_SEED = 10_000
CUBE_RESTING_Z_M = 0.02


def with_override(config: Any, dotted: str, value: Any) -> Any:
    """``config`` with the field at ``dotted`` (e.g. ``learner.sac.utd_ratio``) replaced."""
    head, _, rest = dotted.partition(".")
    if not hasattr(config, head):
        raise KeyError(f"{dotted}: no field {head!r} in {type(config).__name__}")
    if rest:
        return dataclasses.replace(config, **{head: with_override(getattr(config, head), rest, value)})
    if isinstance(getattr(config, head), tuple):
        value = tuple(value)
    return dataclasses.replace(config, **{head: value})


def inproc_config(name: str, overrides: list[str]) -> SessionConfig:
    """The bundled or YAML config ``name`` on the in-process cell, with ``dotted.path=JSON`` overrides."""
    config = with_override(load_config(name), "env.connection", "inproc")
    for override in overrides:
        path, _, value = override.partition("=")
        config = with_override(config, path, json.loads(value))
    return config


def record_demos(env, config: SessionConfig, episodes: int, noise: float, keys: tuple[str, ...],
                 buffer: ReplayBuffer) -> None:
    expert = ScriptedExpert(config.robot, noise_std=noise, seed=config.seed)
    kept, attempts = record_episodes(env, expert.act, episodes, DEMO_SEED)
    if len(kept) < episodes:
        raise RuntimeError(f"the scripted expert succeeded in only {len(kept)} of {attempts} episodes")
    for episode in kept:
        for observation, action, reward, next_observation, terminated, truncated in episode.steps:
            buffer.add({k: observation[k] for k in keys}, action, reward, {k: next_observation[k] for k in keys},
                       terminated, truncated)


def failure_kind(episode) -> str:
    """Where a failed pick_cube episode went wrong, from the full observations: ``far`` (the TCP never
    came within 2 cm of the cube), ``no_lift`` (came close, the cube never rose 1 cm), ``dropped``
    (lifted but not held at the height); ``other`` for tasks without a cube."""
    observations = [step[3] for step in episode.steps]
    if "task/cube_offset" not in observations[0]:
        return "other"
    closest = min(float(np.linalg.norm(o["task/cube_offset"])) for o in observations)
    highest = max(float(o["task/cube_pose"][2]) for o in observations)
    if closest > 0.02:
        return "far"
    return "no_lift" if highest < CUBE_RESTING_Z_M + 0.01 else "dropped"


def run(config: SessionConfig, steps: int, demos: int, demo_noise: float, eval_every: int, eval_episodes: int,
        tag: str, save: Path | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    env = make_env(config)
    keys = tuple(config.learner.observation_keys) or tuple(env.observation_space.spaces)
    observation_space = gym.spaces.Dict({k: env.observation_space[k] for k in keys})
    action_dim = env.action_space.shape[0]
    sac = config.learner.sac
    agent = SACAgent(sac, observation_space, env.action_space, seed=config.seed)
    demo_buffer = ReplayBuffer(observation_space, action_dim, max(1000, demos * config.robot.task.max_episode_steps),
                               seed=config.seed)
    if demos:
        record_demos(env, config, demos, demo_noise, keys, demo_buffer)
    online = ReplayBuffer(observation_space, action_dim, config.learner.replay_capacity, seed=config.seed)
    sample_rng = np.random.default_rng(config.seed)

    def select(observation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: observation[k] for k in keys}

    def evaluate() -> tuple[float, dict[str, int]]:
        episodes = [play_episode(env, lambda o: agent.act(select(o), deterministic=True), seed=EVAL_SEED + i)
                    for i in range(eval_episodes)]
        failures: dict[str, int] = {}
        for episode in episodes:
            if not episode.success:
                kind = failure_kind(episode)
                failures[kind] = failures.get(kind, 0) + 1
        return float(np.mean([episode.success for episode in episodes])), failures

    env.action_space.seed(config.seed)
    observation, _ = env.reset(seed=config.seed)
    started, curve, metrics = time.monotonic(), [], {}
    for step in range(1, steps + 1):
        if step <= config.actor.random_steps:
            action = env.action_space.sample()
        else:
            action = agent.act(select(observation))
        next_observation, reward, terminated, truncated, _ = env.step(action)
        online.add(select(observation), action, reward, select(next_observation), terminated, truncated)
        observation = next_observation
        if terminated or truncated:
            observation, _ = env.reset()
        if len(online) >= config.learner.learning_starts:
            demo_sources = [demo_buffer] if demos else []
            if not agent.state_normalized:
                agent.fit_state_normalization([buffer.observations(keys) for buffer in [online, *demo_sources]])
            metrics = agent.update(sample_mixed(online, demo_sources, sac.batch_size, config.learner.demo_ratio,
                                                sac.utd_ratio, sample_rng))
        if step % eval_every == 0:
            rate, failures = evaluate()
            observation, _ = env.reset()
            curve.append({"env_steps": step, "success_rate": rate, "failures": failures,
                          "wall_s": round(time.monotonic() - started, 1)})
            print(f"[{tag}] step {step} eval {rate:.2f} failures {failures} q {metrics.get('q_mean', 0.0):.3f} "
                  f"temperature {metrics.get('temperature', 0.0):.4f} {time.monotonic() - started:.0f} s", flush=True)
    env.close()
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        save_agent(agent, save)
    return {"tag": tag, "curve": curve, "wall_s": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="dotted.config.path=JSON value")
    parser.add_argument("--config", default="sim_panda_pick_cube")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--demos", type=int, default=20)
    parser.add_argument("--demo-noise", type=float, default=0.0)
    parser.add_argument("--eval-every", type=int, default=2500)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--tag", default="run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--save", type=Path, help="write the final agent here as a learner checkpoint")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few hundred steps")
    args = parser.parse_args(argv)

    config = inproc_config(args.config, args.overrides)
    steps, eval_every, eval_episodes, demos = args.steps, args.eval_every, args.eval_episodes, args.demos
    if args.quick:
        config = with_override(config, "learner.learning_starts", 100)
        config = with_override(config, "actor.random_steps", 100)
        steps, eval_every, eval_episodes, demos = 300, 150, 2, min(demos, 2)
    result = run(config, steps, demos, args.demo_noise, eval_every, eval_episodes, args.tag, args.save)
    write_json(args.json, {"machine": machine_info(), "quick": args.quick, "config": config.name,
                           "overrides": args.overrides, "demos": demos, "demo_noise": args.demo_noise, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
