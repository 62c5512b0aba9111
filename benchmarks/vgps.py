"""V-GPS benchmark: steer a deliberately imperfect diffusion policy with a Cal-QL critic in PyBullet.

Everything runs in one process on the in-process robot cell (no sockets, no pacing), on one CPU
thread. Episodes are capped at ``--max-episode-steps`` (50; the scripted expert needs about 12
without noise, 20 with noise 0.3):

1. **Offline data.** The scripted expert plays episodes with Gaussian action noise on x/y/z: a
   share ``1 - noisy_share`` without noise, the rest split evenly over ``--noise-levels``. Failures
   are kept. Everything goes into one :class:`~learner.replay.ReplayBuffer` (the state fields of the
   config's ``learner.observation_keys``), saved in the replay format.
2. **The generalist.** A diffusion policy (policies/diffusion.py) is trained by behaviour cloning
   on *all* of the data, so it imitates the clean, the noisy and the failing behaviour alike.
3. **The critic.** Cal-QL (learner/calql.py) is trained offline on the same buffer with the
   rewards the cell gave; its target critic ensemble is the V-GPS scorer (``QCritic.from_agent``).
   By default with HIL-SERL's discrete gripper critic (``sac.gripper_critic``): the continuous
   critics then score x/y/z only, and the chosen candidate keeps the base's gripper command.
   Without it (``--no-gripper-critic``) the short offline run learns that closing the gripper is
   bad (its actor never learns to grasp, so Q(s, close) is the value of letting go again), and
   the argmax never grasps. Defaults sized for one CPU thread: 128x128 critics, batches of 128,
   4 action samples per proposal, alpha_c = 1, tau = 0.02, 8,000 updates.
4. **Arms**, each on the same episode seeds ``EVAL_SEED + i``:
   ``base`` (the diffusion policy as deployed: a random DDIM sample, ``deterministic=False``),
   ``vgps_k{K}`` (:class:`~policies.vgps.VGPSPolicy` over the base with K candidates and
   temperature beta; 0 = argmax), ``random_k{K}`` (the same K candidates, one picked uniformly:
   the control, equal in distribution to the base), ``oracle_k{K}`` (headroom: the candidate
   closest to the clean scripted expert's action, from the privileged state; no V-GPS critic),
   ``ddpm{T}`` (the base with the ancestral DDPM sampler over all train timesteps, to compare with
   DDIM), plus optional extra beta / K arms.
   **Execution: every arm re-plans at every step** (``action_steps = 1``): the base samples a
   chunk conditioned on the observation history and executes its first action; V-GPS samples K
   chunks in one batched call, scores their first actions with one critic call and executes the
   chosen one. The same action_steps for all arms keeps the comparison fair.
5. **Latency.** Median ms per action (after warm-up) of one action selection on a recorded
   observation: base (K = 1), V-GPS at each K (batched sampling + one critic call), DDPM; on one
   torch thread (the targets) and again on all usable cores (``latency_by_torch_threads``).
6. JSON (``--json``) with ``machine_info`` and a table on stdout.

How the base reads its history while the critic reads the current state: the batch handed to
:class:`~policies.vgps.VGPSPolicy` carries the current fields under their own names (for the
critic) and the history ``[B, n_obs, ...]`` under ``history/<name>`` (for :class:`HistoryBase`,
a thin :class:`~policies.base.Policy` adapter over the diffusion policy).

Statistics: success rates with Wilson 95 % intervals; arm vs base on the same seeds with an exact
sign test (McNemar) on the discordant seeds.

    python benchmarks/vgps.py --json benchmarks/results/vgps.json --work-dir runs/vgps
    python benchmarks/vgps.py --load-from runs/vgps --betas 0.01 --ks 10,50   # re-evaluate only
    python benchmarks/vgps.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actor.env import make_env  # noqa: E402
from actor.rollout import Episode, play_episode, record_episodes  # noqa: E402
from benchmarks.history_base import HISTORY_PREFIX, HistoryBase  # noqa: E402
from benchmarks.machine import latency_ms, machine_info, print_targets, write_json  # noqa: E402
from benchmarks.sac_sweep import inproc_config, with_override  # noqa: E402
from hardware_configs.schema import GripperCriticConfig, SessionConfig  # noqa: E402
from learner.calql import CalQLConfig, save_offline_checkpoint, train_offline  # noqa: E402
from learner.replay import ReplayBuffer  # noqa: E402
from policies.base import Policy, load_policy  # noqa: E402
from policies.diffusion import (  # noqa: E402
    DiffusionPolicy,
    DiffusionPolicyConfig,
    ObservationHistory,
    train_diffusion_policy,
)
from policies.scripted import ScriptedExpert  # noqa: E402
from policies.vgps import QCritic, VGPSConfig, VGPSPolicy, load_critic  # noqa: E402

DATA_SEED = 20_000
EVAL_SEED = 100_000


class StepActor:
    """Acts with any policy over :class:`HistoryBase` inputs, re-planning at every step."""

    def __init__(self, policy: Policy, keys: Sequence[str], n_obs: int) -> None:
        self.policy = policy
        self.keys = tuple(keys)
        self.history = ObservationHistory(n_obs)
        #: seconds spent choosing each action (the policy call only).
        self.times: list[float] = []

    def reset(self) -> None:
        self.history.reset()

    def batch(self, observation: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        current = {key: np.asarray(observation[key]) for key in self.keys}
        history = self.history.push(current)
        batch = {key: value[None] for key, value in current.items()}
        batch.update({HISTORY_PREFIX + key: value[None] for key, value in history.items()})
        return batch

    def act(self, observation: Mapping[str, np.ndarray]) -> np.ndarray:
        batch = self.batch(observation)
        started = time.perf_counter()
        with torch.inference_mode():
            action = self.policy.sample(batch, 1)[0, 0].float().cpu().numpy()
        self.times.append(time.perf_counter() - started)
        return action


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def sign_test(wins: int, losses: int) -> tuple[float, float]:
    """Exact sign test on discordant pairs: (one-sided p that the arm is better, two-sided p)."""
    n = wins + losses
    if n == 0:
        return 1.0, 1.0
    tail = lambda k: sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n  # noqa: E731  P(X >= k)
    greater = tail(wins)
    two_sided = min(1.0, 2 * min(tail(wins), tail(losses)))
    return greater, two_sided


def paired(arm: Sequence[bool], base: Sequence[bool]) -> dict[str, Any]:
    wins = sum(a and not b for a, b in zip(arm, base))
    losses = sum(b and not a for a, b in zip(arm, base))
    greater, two_sided = sign_test(wins, losses)
    return {"difference": (sum(arm) - sum(base)) / len(base), "arm_only": wins, "base_only": losses,
            "p_better_one_sided": greater, "p_two_sided": two_sided}


# --------------------------------------------------------------------------------------------
# 1. Offline data
# --------------------------------------------------------------------------------------------


def episode_plan(episodes: int, noisy_share: float, noise_levels: Sequence[float]) -> list[tuple[float, int]]:
    """(noise_std, episodes) per level: ``round((1 - noisy_share) * episodes)`` clean ones, the rest
    split evenly over ``noise_levels``."""
    clean = int(round((1.0 - noisy_share) * episodes))
    noisy = episodes - clean
    plan = [(0.0, clean)] if clean else []
    for index, level in enumerate(noise_levels):
        count = noisy // len(noise_levels) + (1 if index < noisy % len(noise_levels) else 0)
        if count:
            plan.append((float(level), count))
    return plan


def record_data(env: gym.Env, config: SessionConfig, keys: tuple[str, ...], plan: Sequence[tuple[float, int]],
                buffer: ReplayBuffer) -> list[dict[str, Any]]:
    """Play the plan with the scripted expert (failures kept) into ``buffer``; per-level stats."""
    stats = []
    for index, (noise, count) in enumerate(plan):
        expert = ScriptedExpert(config.robot, noise_std=noise, seed=config.seed + 1 + index)
        kept, _ = record_episodes(env, expert.act, count, DATA_SEED + 10_000 * index, keep_failures=True)
        for episode in kept:
            for observation, action, reward, next_observation, terminated, truncated in episode.steps:
                buffer.add({k: observation[k] for k in keys}, action, reward, {k: next_observation[k] for k in keys},
                           terminated, truncated)
        stats.append({"noise_std": noise, "episodes": len(kept), "successes": sum(e.success for e in kept),
                      "steps": sum(len(e.steps) for e in kept),
                      "mean_return": float(np.mean([e.episode_return for e in kept]))})
        print(f"  noise {noise:.2f}: {stats[-1]['successes']}/{len(kept)} succeeded, {stats[-1]['steps']} steps",
              flush=True)
    return stats


class ExpertDistanceCritic:
    """An *oracle* scorer for the headroom arm: ``-||a_xyz - expert_xyz(s)||`` (and the gripper's
    sign agreement), where the clean scripted expert acts from the privileged state. It shows
    what steering among the same K candidates could reach with a perfect ranking; it is no V-GPS
    critic (it needs the simulator's task state)."""

    def __init__(self, config: SessionConfig, keys: Sequence[str], action_dim: int) -> None:
        self.expert = ScriptedExpert(config.robot)
        self.observation_keys = tuple(keys)
        self.action_dim = action_dim

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> "ExpertDistanceCritic":
        return self

    def q_values(self, observations: Mapping[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        batch = actions.shape[0]
        expert = torch.stack([torch.from_numpy(self.expert.act({k: v[i].cpu().numpy() for k, v in observations.items()}))
                              for i in range(batch)])[:, None]
        distance = (actions[..., :3].float() - expert[..., :3]).norm(dim=-1)
        gripper = (torch.sign(actions[..., -1]) != torch.sign(expert[..., -1])).float()
        return -(distance + gripper)


def critic_diagnostics(critic: QCritic, buffer: ReplayBuffer, policy: DiffusionPolicy, config: SessionConfig,
                       discount: float, rows: int = 400, k: int = 10) -> dict[str, Any]:
    """How well the critic fits the data and ranks the base's candidates, on ``rows`` recorded
    states: the correlation of Q(s, a_data) with the Monte-Carlo return-to-go; and, among K base
    candidates per state, the Spearman correlation of Q with closeness to the clean expert's action
    (x/y/z) and how close the argmax candidate is, against a random candidate and the closest."""
    from learner.calql import buffer_returns_to_go

    keys = critic.observation_keys
    returns = buffer_returns_to_go(buffer, discount).values
    batch, chosen = buffer.sample_with_rows(rows)  # uniform over the recorded steps (the buffer's own seeded rng)
    observations = {key: batch.observations[key] for key in keys}
    tensors = {key: torch.from_numpy(value) for key, value in observations.items()}

    def q(actions: torch.Tensor) -> np.ndarray:
        return critic.q_values(tensors, actions).min(dim=0).values.numpy()

    with torch.inference_mode():
        q_data = q(torch.from_numpy(batch.actions)[:, None])[:, 0]
        history = {key: value for key, value in observations.items() if key in policy.observation_keys}
        candidates = policy.sample(history, k)
        q_candidates = q(candidates)
    result = {"states": len(chosen), "corr_q_data_vs_mc_return": float(np.corrcoef(q_data, returns[chosen])[0, 1]),
              "q_data_mean": float(q_data.mean()), "mc_return_mean": float(returns[chosen].mean()),
              "q_candidates_mean": float(q_candidates.mean()),
              "q_candidates_range_p50": float(np.median(q_candidates.max(1) - q_candidates.min(1)))}
    try:
        expert = ScriptedExpert(config.robot)
        targets = np.stack([expert.act({key: observations[key][i] for key in keys}) for i in range(len(chosen))])
    except (KeyError, ValueError):
        return result
    distance = np.linalg.norm(candidates.numpy()[:, :, :3] - targets[:, None, :3], axis=2)
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    spearman = [np.corrcoef(rank(q_candidates[i]), rank(-distance[i]))[0, 1] for i in range(len(chosen))]
    best = q_candidates.argmax(1)
    result.update({"spearman_q_vs_expert_closeness": float(np.nanmean(spearman)),
                   "expert_distance_argmax": float(distance[np.arange(len(chosen)), best].mean()),
                   "expert_distance_random": float(distance.mean()),
                   "expert_distance_closest": float(distance.min(1).mean())})
    return result


# --------------------------------------------------------------------------------------------
# 4. Evaluation
# --------------------------------------------------------------------------------------------


def evaluate(env: gym.Env, actor: StepActor, episodes: int, label: str) -> dict[str, Any]:
    started = time.monotonic()
    actor.times = []
    runs: list[Episode] = []
    for index in range(episodes):
        actor.reset()
        runs.append(play_episode(env, actor.act, seed=EVAL_SEED + index))
    successes = [bool(run.success) for run in runs]
    low, high = wilson_interval(sum(successes), episodes)
    result = {
        "episodes": episodes, "successes": sum(successes), "success_rate": sum(successes) / episodes,
        "ci95": [low, high], "mean_length": float(np.mean([len(run.steps) for run in runs])),
        "mean_return": float(np.mean([run.episode_return for run in runs])),
        "ms_per_action_p50": 1e3 * float(np.median(actor.times)), "actions": len(actor.times),
        "wall_s": round(time.monotonic() - started, 1), "per_episode_success": successes,
    }
    print(f"  {label:<22} success {result['success_rate']:.2f} [{low:.2f}, {high:.2f}]  "
          f"length {result['mean_length']:5.1f}  {result['ms_per_action_p50']:6.2f} ms/action  "
          f"{result['wall_s']:.0f} s", flush=True)
    return result


# --------------------------------------------------------------------------------------------
# 5. Latency
# --------------------------------------------------------------------------------------------


def q_spread(vgps: VGPSPolicy, batches: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """How far apart the critic puts one observation's K candidates (to size beta): median over
    ``batches`` of the max - min and of the standard deviation of the reduced Q-values."""
    ranges, stds, means = [], [], []
    with torch.inference_mode():
        for batch in batches:
            scores = vgps.steer(batch, 1).scores[0]
            ranges.append(float(scores.max() - scores.min()))
            stds.append(float(scores.std()))
            means.append(float(scores.mean()))
    return {"k": vgps.config.num_samples, "range_p50": float(np.median(ranges)), "std_p50": float(np.median(stds)),
            "mean_q_p50": float(np.median(means)), "observations": len(batches)}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, config: SessionConfig) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    started = time.monotonic()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="steerl-vgps-"))
    work.mkdir(parents=True, exist_ok=True)
    env = make_env(config)
    keys = tuple(config.learner.observation_keys) or tuple(env.observation_space.spaces)
    observation_space = gym.spaces.Dict({k: env.observation_space[k] for k in keys})
    action_dim = env.action_space.shape[0]
    results: dict[str, Any] = {"config": config.name, "task": config.robot.task.name, "observation_keys": list(keys),
                               "execution": "re-plan every step (action_steps = 1) in every arm",
                               "work_dir": str(work)}
    timings: dict[str, float] = {}

    source = Path(args.load_from) if args.load_from else None
    previous = json.loads((source / "vgps_setup.json").read_text()) if source is not None else {}

    # 1. data
    if source is not None:
        print(f"1. loading the data and the diffusion policy of {source}", flush=True)
        buffer = ReplayBuffer.load(source / "data", seed=config.seed)
        keys = tuple(buffer.observation_space.spaces)
        results["observation_keys"] = list(keys)
        results["data"] = previous["data"]
        results["loaded_from"] = str(source)
    else:
        plan = episode_plan(args.episodes, args.noisy_share, args.noise_levels)
        capacity = sum(count for _, count in plan) * config.robot.task.max_episode_steps + 10
        buffer = ReplayBuffer(observation_space, action_dim, capacity, seed=config.seed)
        print(f"1. recording {sum(c for _, c in plan)} scripted episodes, plan {plan}", flush=True)
        t0 = time.monotonic()
        levels = record_data(env, config, keys, plan, buffer)
        buffer.save(work / "data")
        timings["record_s"] = time.monotonic() - t0
        total = sum(level["episodes"] for level in levels)
        wins = sum(level["successes"] for level in levels)
        results["data"] = {"episodes": total, "successes": wins, "success_rate": wins / total,
                           "steps": len(buffer), "noisy_share": args.noisy_share, "levels": levels,
                           "max_episode_steps": config.robot.task.max_episode_steps, "buffer": str(work / "data")}
        print(f"   {wins}/{total} episodes succeeded ({wins / total:.0%}), {len(buffer)} transitions", flush=True)

    # 2. the generalist
    if source is not None:
        policy = load_policy(source / "diffusion")
        results["diffusion"] = previous["diffusion"]
    else:
        diffusion_config = DiffusionPolicyConfig(
            horizon=args.horizon, n_obs=args.n_obs, action_steps=1, observation_keys=keys,
            hidden_dim=args.diffusion_hidden, num_blocks=args.diffusion_blocks, batch_size=args.batch_size,
            train_timesteps=args.train_timesteps, inference_steps=args.ddim_steps, sampler="ddim",
            lr_warmup_steps=min(100, args.diffusion_steps // 10))
        print(f"2. training the diffusion policy: {args.diffusion_steps} steps", flush=True)
        t0 = time.monotonic()
        policy = train_diffusion_policy(diffusion_config, work / "data", args.diffusion_steps, seed=config.seed,
                                        log_every=max(1, args.diffusion_steps // 5),
                                        progress=lambda s, l: print(f"   step {s}: loss {l:.4f}", flush=True))
        timings["diffusion_train_s"] = time.monotonic() - t0
        policy.save(work / "diffusion")
        results["diffusion"] = {"config": dataclasses.asdict(diffusion_config), "steps": args.diffusion_steps,
                                "final_loss": policy.info["final_loss"], "train_s": round(timings["diffusion_train_s"], 1)}
    policy.network.eval()

    # 3. the critic
    sac = dataclasses.replace(config.learner.sac, utd_ratio=1, batch_size=args.critic_batch_size,
                              hidden_dims=tuple(args.critic_hidden), tau=args.critic_tau,
                              discount=args.critic_discount or config.learner.sac.discount,
                              gripper_critic=GripperCriticConfig(enabled=args.gripper_critic))
    if source is not None and not args.retrain_critic:
        print(f"3. loading the critic of {source}", flush=True)
        critic = load_critic(source / "critic")
        results["calql"] = previous["calql"]
    else:
        calql_config = CalQLConfig(sac=sac, observation_keys=keys, offline_steps=args.critic_steps,
                                   alpha_cql=args.alpha_cql, num_action_samples=args.cql_samples,
                                   log_every=max(1, args.critic_steps // 5))
        print(f"3. training the Cal-QL critic: {args.critic_steps} steps", flush=True)
        t0 = time.monotonic()
        agent = train_offline(calql_config, buffer, seed=config.seed, progress=lambda s, m: print(
            f"   step {s}: critic loss {m.get('critic_loss', float('nan')):.4f} q {m.get('q_mean', float('nan')):.3f} "
            f"cql {m.get('cql_regularizer', float('nan')):.3f} mc {m.get('mc_return_mean', float('nan')):.3f}",
            flush=True))
        timings["critic_train_s"] = time.monotonic() - t0
        save_offline_checkpoint(agent, work / "calql")
        critic = QCritic.from_agent(agent, "target")
        critic.save(work / "critic")
        results["calql"] = {"config": {"discount": sac.discount, "tau": sac.tau, "hidden_dims": list(sac.hidden_dims),
                                       "gripper_critic": sac.gripper_critic.enabled,
                                       "num_critics": sac.num_critics, "batch_size": sac.batch_size,
                                       **calql_config.extras()},
                            "steps": args.critic_steps, "train_s": round(timings["critic_train_s"], 1)}
    critic.eval()
    if source is None or args.retrain_critic:
        if source is not None:  # the loaded data and policy, copied beside the new critic
            if work.resolve() != source.resolve():
                buffer.save(work / "data")
                policy.save(work / "diffusion")
        (work / "vgps_setup.json").write_text(json.dumps({k: results[k] for k in ("data", "diffusion", "calql")},
                                                         indent=2))
    results["critic_diagnostics"] = critic_diagnostics(critic, buffer, policy, config, sac.discount)
    print("   critic: " + ", ".join(f"{k} {v:.3g}" for k, v in results["critic_diagnostics"].items()), flush=True)

    # Observations to measure latency and Q spread on: the first steps of a few evaluation episodes.
    probe_actor = StepActor(HistoryBase(policy), keys, policy.n_obs)
    probes = []
    for index in range(min(8, args.eval_episodes)):
        probe_actor.reset()
        observation, _ = env.reset(seed=EVAL_SEED + index)
        probes.append(probe_actor.batch(observation))

    # 4. arms
    base = HistoryBase(policy)
    arms: dict[str, Policy] = {"base": base}
    for k in args.ks:
        arms[f"vgps_k{k}"] = VGPSPolicy(base, critic, VGPSConfig(num_samples=k, temperature=args.beta, seed=config.seed))
    arms[f"random_k{args.random_k}"] = VGPSPolicy(base, critic, VGPSConfig(num_samples=args.random_k,
                                                                          random_control=True, seed=config.seed))
    for beta in args.betas:
        for k in args.ks:
            arms[f"vgps_k{k}_beta{beta:g}"] = VGPSPolicy(base, critic, VGPSConfig(num_samples=k, temperature=beta,
                                                                                   seed=config.seed))
    if args.oracle:
        oracle = ExpertDistanceCritic(config, keys, action_dim)
        arms[f"oracle_k{args.random_k}"] = VGPSPolicy(base, oracle, VGPSConfig(num_samples=args.random_k, temperature=0.0))
    if not args.skip_ddpm:
        arms[f"ddpm{policy.config.train_timesteps}"] = HistoryBase(policy, sampler="ddpm")
    descriptions = {"base": f"diffusion policy, one random DDIM-{policy.config.inference_steps} sample"}

    spreads = {}
    for k in args.ks:
        spreads[f"k{k}"] = q_spread(arms[f"vgps_k{k}"], probes)
    results["q_spread"] = spreads

    arm_results: dict[str, Any] = {}
    if args.latency_only:
        print("4. no evaluation (--latency-only)", flush=True)
    else:
        print(f"4. evaluating {len(arms)} arms x {args.eval_episodes} episodes (seeds {EVAL_SEED}...)", flush=True)
    t0 = time.monotonic()
    for name, arm_policy in ({} if args.latency_only else arms).items():
        actor = StepActor(arm_policy, keys, policy.n_obs)
        arm_results[name] = evaluate(env, actor, args.eval_episodes, name)
        if isinstance(arm_policy, VGPSPolicy):
            cfg = arm_policy.config
            arm_results[name]["k"] = cfg.num_samples
            arm_results[name]["beta"] = None if cfg.random_control else cfg.temperature
            arm_results[name]["random_control"] = cfg.random_control
        else:
            arm_results[name]["sampler"] = arm_policy.sampler or policy.config.sampler
            arm_results[name]["inference_steps"] = arm_policy.inference_steps or (
                policy.config.train_timesteps if arm_policy.sampler == "ddpm" else policy.config.inference_steps)
        if name != "base":
            arm_results[name]["vs_base"] = paired(arm_results[name]["per_episode_success"],
                                                  arm_results["base"]["per_episode_success"])
    timings["evaluation_s"] = time.monotonic() - t0
    results["arms"] = arm_results
    results["arm_descriptions"] = descriptions

    # 5. latency: one action selection on a recorded observation (batch of one), after warm-up
    # on one thread (as every arm ran) and on all the cores a deployment would give it.
    probe = probes[0]
    by_threads: dict[int, dict[str, Any]] = {}
    for threads in sorted({1, len(os.sched_getaffinity(0))}):
        print(f"5. latency per action, {threads} torch thread(s)", flush=True)
        torch.set_num_threads(threads)
        latency: dict[str, Any] = {}
        for name, arm_policy in arms.items():
            if name.startswith(("random", "oracle")) or "_beta" in name:
                continue

            def select(arm_policy: Policy = arm_policy) -> Any:
                with torch.inference_mode():
                    return arm_policy.sample(probe, 1)

            latency[name] = latency_ms(select, args.latency_warmup, args.latency_repeats)
            print(f"  {name:<22} p50 {latency[name]['p50_ms']:7.2f} ms", flush=True)
        base_ms = latency["base"]["p50_ms"]
        by_threads[threads] = {"latency": latency, "latency_ratios": {
            f"{name}_over_base": value["p50_ms"] / base_ms for name, value in latency.items() if name != "base"}}
    torch.set_num_threads(1)
    results["latency"], ratios = by_threads[1]["latency"], by_threads[1]["latency_ratios"]
    results["latency_ratios"] = ratios
    results["latency_by_torch_threads"] = {str(threads): value for threads, value in by_threads.items()}

    # targets
    targets: dict[str, bool] = {}
    ddpm = f"ddpm{policy.config.train_timesteps}"
    if arm_results:
        base_rate = arm_results["base"]["success_rate"]
        for k in args.ks:
            targets[f"vgps_k{k}_ge_base_plus_15pts"] = (
                arm_results[f"vgps_k{k}"]["success_rate"] - base_rate >= 0.15 - 1e-9)
        control = arm_results[f"random_k{args.random_k}"]["vs_base"]
        targets["random_control_not_better_than_base"] = bool(control["p_better_one_sided"] >= 0.05)
        if not args.skip_ddpm:
            targets["ddim_matches_ddpm_success"] = bool(arm_results[ddpm]["vs_base"]["p_two_sided"] >= 0.05)
    if 10 in args.ks:
        targets["vgps_k10_latency_le_1.5x_base"] = ratios["vgps_k10_over_base"] <= 1.5
    if not args.skip_ddpm:
        targets["ddim_ge_8x_faster_than_ddpm"] = ratios[f"{ddpm}_over_base"] >= 8.0
    results["targets"] = targets
    results["timings_s"] = {name: round(value, 1) for name, value in timings.items()}
    results["wall_s"] = round(time.monotonic() - started, 1)
    env.close()
    return results


def print_table(results: dict[str, Any]) -> None:
    print()
    if "data" in results:
        data = results["data"]
        print(f"offline data: {data['episodes']} episodes, {data['successes']} succeeded "
              f"({data['success_rate']:.0%}), {data['steps']} transitions")
    print(f"{'arm':<22} {'success':>8} {'95% CI':>14} {'vs base':>8} {'p (1-sided)':>11} {'ms/action':>10}")
    for name, arm in results["arms"].items():
        versus = arm.get("vs_base")
        diff = f"{100 * versus['difference']:+.0f} pt" if versus else ""
        p = f"{versus['p_better_one_sided']:.3g}" if versus else ""
        low, high = arm["ci95"]
        print(f"{name:<22} {arm['success_rate']:>8.2f} {f'[{low:.2f}, {high:.2f}]':>14} {diff:>8} {p:>11} "
              f"{results['latency'].get(name, {}).get('p50_ms', arm['ms_per_action_p50']):>10.2f}")
    print()
    for name, ratio in results["latency_ratios"].items():
        print(f"latency {name}: {ratio:.2f}x")
    print_targets(results["targets"])


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def float_list(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sim_panda_pick_cube")
    parser.add_argument("--max-episode-steps", type=int, default=50,
                        help="override robot.task.max_episode_steps (0: the config's)")
    parser.add_argument("--episodes", type=int, default=200, help="scripted episodes of offline data")
    parser.add_argument("--noisy-share", type=float, default=0.75,
                        help="share of the episodes recorded with action noise (the rest: none)")
    parser.add_argument("--noise-levels", type=float_list, default=[0.3, 0.6, 1.0],
                        help="action-noise std levels of the noisy episodes (comma-separated)")
    parser.add_argument("--diffusion-steps", type=int, default=3000)
    parser.add_argument("--critic-steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--horizon", type=int, default=8)
    parser.add_argument("--n-obs", type=int, default=2)
    parser.add_argument("--diffusion-hidden", type=int, default=256)
    parser.add_argument("--diffusion-blocks", type=int, default=3)
    parser.add_argument("--critic-hidden", type=int_list, default=[128, 128])
    parser.add_argument("--critic-batch-size", type=int, default=128)
    parser.add_argument("--critic-tau", type=float, default=0.02, help="target-network update rate")
    parser.add_argument("--critic-discount", type=float, default=None, help="default: the config's learner.sac")
    parser.add_argument("--alpha-cql", type=float, default=1.0, help="weight of the conservative regulariser")
    parser.add_argument("--cql-samples", type=int, default=4, help="actions per proposal in the regulariser")
    parser.add_argument("--gripper-critic", action=argparse.BooleanOptionalAction, default=True,
                        help="HIL-SERL's discrete gripper critic: the continuous critics (V-GPS's scorer) then "
                             "score x/y/z only and the chosen candidate keeps the base's gripper command")
    parser.add_argument("--retrain-critic", action="store_true", help="with --load-from: train a new critic")
    parser.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                        help="add the headroom arm: the K candidate closest to the clean scripted expert's action")
    parser.add_argument("--train-timesteps", type=int, default=100, help="DDPM steps (T)")
    parser.add_argument("--ddim-steps", type=int, default=10, help="DDIM steps of the base")
    parser.add_argument("--eval-episodes", type=int, default=100, help="episodes per arm")
    parser.add_argument("--ks", type=int_list, default=[10, 50], help="V-GPS K values")
    parser.add_argument("--beta", type=float, default=0.0, help="V-GPS temperature of the main arms (0: argmax)")
    parser.add_argument("--betas", type=float_list, default=[], help="extra temperatures, an arm per K each")
    parser.add_argument("--random-k", type=int, default=10, help="K of the random-pick control")
    parser.add_argument("--skip-ddpm", action="store_true", help="no DDPM arm")
    parser.add_argument("--latency-warmup", type=int, default=10)
    parser.add_argument("--latency-repeats", type=int, default=100)
    parser.add_argument("--latency-only", action="store_true",
                        help="with --load-from: measure the latency of the saved policy and critic, no episodes")
    parser.add_argument("--work-dir", type=Path, help="where the data, policy and critic go (default: a temp dir)")
    parser.add_argument("--load-from", type=Path, help="reuse the data, policy and critic of an earlier --work-dir")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="a smoke run (< 60 s): tiny data, training, 3 episodes")
    parser.add_argument("overrides", nargs="*", help="dotted.config.path=JSON value")
    args = parser.parse_args(argv)

    config = inproc_config(args.config, args.overrides)
    if args.max_episode_steps:
        config = with_override(config, "robot.task.max_episode_steps", args.max_episode_steps)
    if args.quick:
        config = with_override(config, "robot.task.max_episode_steps", 20)
        args.episodes, args.diffusion_steps, args.critic_steps, args.batch_size = 4, 20, 20, 32
        args.diffusion_hidden, args.diffusion_blocks, args.critic_hidden = 32, 1, [32, 32]
        args.critic_batch_size, args.cql_samples = 32, 2
        args.train_timesteps, args.eval_episodes = 20, 3
        args.latency_warmup, args.latency_repeats = 1, 3
    if any(k < 1 for k in args.ks) or args.random_k < 1 or args.eval_episodes < 1:
        parser.error("K values, --random-k and --eval-episodes must be >= 1")
    if args.latency_only and not args.load_from:
        parser.error("--latency-only needs --load-from (the data, policy and critic to measure)")
    if not 0.0 <= args.noisy_share <= 1.0:
        parser.error("--noisy-share must lie in [0, 1]")

    results = run(args, config)
    results = {"machine": machine_info(torch=torch.__version__, torch_threads=torch.get_num_threads()),
               "quick": args.quick, "command": " ".join(sys.argv), "overrides": args.overrides,
               "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **results}
    print_table(results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
