"""Training sessions: the robot server, the learner and the actor as separate processes.

``steerl train`` runs all three on one machine with the same sockets as on real hardware: the
robot server and the learner as child processes, the actor in the foreground with a live progress
line. ``steerl learner`` and ``steerl actor`` run the two halves on separate machines.
``--env-id`` swaps the robot for any registered gymnasium environment (in-process), so the
learner can be checked on environments we did not write.

``--dashboard`` publishes the actor's telemetry to the operator console and takes its buttons
(:class:`~actor.console.ConsoleLink`) and starts ``steerl dashboard`` as a child process serving
the page; ``--console`` does the first only, for a dashboard already running (one that started the
session from its page).

``--teleop`` (or ``actor.teleop``) wraps the env in an
:class:`~actor.intervention.InterventionWrapper` around the configured teleop device and prints the
device's bindings; ``--save-videos N`` saves every N-th episode's camera images under
``RUN_DIR/videos/``. The progress line shows the episode and its step, the mean return, success and
intervention rates, learner updates/s, the learner link's round trip and the operator state.

With ``actor.policy_source: remote`` the actor takes its actions from a policy server
(``steerl policy-server``, started separately, typically on the GPU box) through a
:class:`~actor.remote_policy.RemotePolicy` and ignores the weights the learner publishes (it still
ships every transition to it); the progress line then shows the server's round trip and holds.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import gymnasium as gym
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from actor.acting import ActingLoop, ActingStats
from actor.console import ConsoleLink
from actor.env import RobotEnv, make_gym_env
from actor.learner_link import LearnerLink
from actor.remote_policy import RemotePolicy, connect_remote_policy
from actor.video import EpisodeVideoRecorder
from actor.rollout import connect_env, record_episodes, robot_server_process, steerl_child
from hardware_configs.schema import SessionConfig
from transport.spaces import RobotSpaces

log = logging.getLogger("steerl")

LEARNER_START_TIMEOUT_S = 120.0


def learner_process(config: SessionConfig, run_dir: Path, demos: str | None, resume: bool):
    """A ``steerl learner`` child; SIGTERM on exit makes it write a final checkpoint."""
    arguments = ["--run-dir", str(run_dir)] + (["--demos", str(demos)] if demos else []) + (
        ["--resume"] if resume else [])
    return steerl_child(config, "learner", *arguments, stop_timeout_s=120.0)


def dashboard_process(config: SessionConfig, runs_dir: str | Path):
    """A ``steerl dashboard`` child serving the console page for this session."""
    return steerl_child(config, "dashboard", "--runs-dir", str(runs_dir), stop_timeout_s=10.0)


def open_console(config: SessionConfig, stack: ExitStack, actor_id: str, total_steps: int, mode: str = "train",
                 policy_name: str = "") -> ConsoleLink:
    """The actor's console sockets, closed with ``stack``."""
    console = ConsoleLink(config.dashboard, actor_id, config.name, total_steps, mode=mode, policy_name=policy_name)
    stack.callback(console.close)
    return console


def actor_policy_loader(config: SessionConfig, spaces: RobotSpaces):
    """``bytes -> policy``: builds the actor-side policy from the weights the learner publishes
    (the SAC policy's tensors, or PA-RL's packed steered base policy)."""
    if config.learner.algorithm == "parl":
        from policies.base import policy_from_bytes

        def unpack(blob: bytes):
            policy = policy_from_bytes(blob)
            policy.published_bytes = blob  # what a best evaluation keeps
            return policy

        return unpack
    from policies.gaussian import TanhGaussianPolicy, load_policy_bytes

    template = TanhGaussianPolicy(config.learner.sac, spaces.observation_space(), spaces.action_space(),
                                  seed=config.seed)
    template.eval()

    def load(blob: bytes):
        policy = copy.deepcopy(template)
        load_policy_bytes(policy, blob)
        return policy

    return load


def open_env(config: SessionConfig, env_id: str | None, stack: ExitStack, start_server: bool = True) -> RobotEnv | gym.Env:
    if env_id:
        return make_gym_env(env_id)  # the env's own registered time limit
    server = None
    if start_server and config.env.connection == "zmq":
        server = stack.enter_context(robot_server_process(config))
    return connect_env(config, server)


def attach_reward_classifier(config: SessionConfig, env: gym.Env, console: Console) -> gym.Env:
    """``env`` with its reward replaced by ``actor.reward_classifier`` (unchanged when it is empty).

    It goes on the robot env itself, under any intervention wrapper: the classifier judges the
    state the robot reached, whoever commanded it."""
    if not config.actor.reward_classifier:
        return env
    from actor.reward_wrapper import RewardClassifierWrapper

    wrapped = RewardClassifierWrapper(env, config.actor.reward_classifier, config.actor.reward_threshold,
                                      list(config.actor.reward_proprio_checks) or None)
    console.print(f"reward: classifier {config.actor.reward_classifier} (threshold {wrapped.threshold:g}"
                  f"{', checks ' + ', '.join(config.actor.reward_proprio_checks) if config.actor.reward_proprio_checks else ''})")
    return wrapped


def attach_teleop(config: SessionConfig, env: gym.Env, console: Console) -> gym.Env:
    """``env`` wrapped in an InterventionWrapper around the device of ``actor.teleop`` (unchanged when
    it is empty), with the device's bindings printed."""
    if not config.actor.teleop:
        return env
    from actor.intervention import InterventionWrapper
    from actor.operator import format_bindings
    from actor.teleop import make_teleop_device
    from hardware_configs.teleop import load_teleop_config

    teleop_config = load_teleop_config(config.actor.teleop)
    device = make_teleop_device(teleop_config, env.action_space.shape[0], robot=config.robot)
    wrapped = InterventionWrapper(env, device)  # starts the device
    console.print(format_bindings(teleop_config, Path(config.actor.teleop).stem), markup=False, highlight=False)
    return wrapped


def progress_line(stats: ActingStats, link: LearnerLink, updates_per_s: float,
                  remote: RemotePolicy | None = None) -> str:
    """The operator's live view: episode and step, return, success and intervention rates, the
    learner's updates/s and the link's round trip, and a pause or emergency stop in capitals; with a
    remote policy, the policy server's round trip and held steps, and ``[HOLDING: reason]``."""
    evaluation = "-" if stats.eval_success_rate is None else f"{stats.eval_success_rate:.0%}"
    latency = link.latency_ms
    if remote is None:
        policy = f"policy v{stats.policy_version}"
    else:
        round_trip = remote.stats.round_trip_ms
        held = sum(remote.stats.holds.values())
        policy = (f"policy {remote.stats.policy_name or '-'} v{remote.stats.policy_version} "
                  f"{'-' if round_trip is None else f'{round_trip:.0f} ms'}" + (f" held {held}" if held else ""))
    line = (f"ep {stats.episode} step {stats.episode_step:>3}  return {stats.mean_return:6.2f}  "
            f"success {stats.success_rate:4.0%}  interv {stats.intervention_rate:4.0%}  eval {evaluation}  "
            f"updates {link.learner_updates} ({updates_per_s:.0f}/s)  "
            f"link {'-' if latency is None else f'{latency:.0f} ms'}  "
            f"{stats.steps_per_s:.0f} steps/s  {policy}")
    if stats.discarded_episodes:
        line += f"  discarded {stats.discarded_episodes}"
    if stats.operator_state != "running":
        line += f"  [{stats.operator_state.upper()}]"
    if not link.connected:
        line += "  [learner away]"
    if remote is not None and remote.stats.holding:
        line += f"  [HOLDING: policy server {remote.stats.last_reason}]"
    return line


def run_actor(config: SessionConfig, env, total_steps: int, actor_id: str, console: Console,
              learner: subprocess.Popen | None = None, video: EpisodeVideoRecorder | None = None,
              operator_console: ConsoleLink | None = None) -> ActingStats:
    """Connect to the learner (and, with ``actor.policy_source: remote``, to the policy server) and
    act for ``total_steps`` env steps with a live progress line (and the operator console's
    telemetry and buttons with ``operator_console``)."""
    import torch

    torch.set_num_threads(1)  # one small policy per step: leave the cores to the sim and the learner
    spaces = RobotSpaces.from_gym(env.observation_space, env.action_space).select(config.learner.observation_keys)
    remote = None
    if config.actor.policy_source == "remote":
        server = config.actor.policy_server
        console.print(f"policy: remote, waiting for the policy server at {server.address} "
                      f"(up to {server.connect_timeout_ms / 1000:g} s)")
        remote = connect_remote_policy(server, spaces, client_name=actor_id)
        console.print(f"policy: {remote.server.policy_name} ({remote.server.policy_kind}) served at {server.address}, "
                      f"deadline {server.timeout_ms} ms per action")
    try:
        return _act_with_progress(config, env, total_steps, actor_id, console, spaces, remote, learner, video,
                                  operator_console)
    finally:
        if remote is not None:
            remote.close()


def start_acting(config: SessionConfig, env, actor_id: str, spaces: RobotSpaces, remote: RemotePolicy | None = None,
                 check_learner: Callable[[], None] | None = None, video: EpisodeVideoRecorder | None = None,
                 episode_seed: int | None = None, console: ConsoleLink | None = None) -> tuple[ActingLoop, LearnerLink]:
    """The learner link, once the learner has said hello, and an acting loop that numbers its
    episodes after the last one the learner holds from ``actor_id`` (a restarted actor resumes the
    count). ``check_learner`` raises if the learner is known to be gone (called while waiting)."""
    # A remote policy replaces the learner's published weights: the link then only ships transitions.
    loader = None if remote is not None else actor_policy_loader(config, spaces)
    link = LearnerLink(config.learner.address, actor_id, spaces, load_policy=loader,
                       timeout_ms=config.actor.timeout_ms, max_queue_mb=config.actor.send_queue_mb,
                       curve=config.actor.learner_curve)
    try:
        deadline = time.monotonic() + LEARNER_START_TIMEOUT_S
        hello = None
        while hello is None:
            hello = link.wait_for_hello(1.0)
            if check_learner is not None:
                check_learner()
            if hello is None and time.monotonic() > deadline:
                raise RuntimeError(f"no learner answered at {config.learner.address}")
    except BaseException:
        link.close(flush_timeout_s=0)
        raise
    first_episode = hello.acked_episode + 1 if hello.has_acked else 0
    loop = ActingLoop(config, env, link, tuple(spaces.observation), first_episode=first_episode, video=video,
                      episode_seed=episode_seed, console=console)
    loop.policy = remote
    return loop, link


def _act_with_progress(config: SessionConfig, env, total_steps: int, actor_id: str, console: Console,
                       spaces: RobotSpaces, remote: RemotePolicy | None, learner: subprocess.Popen | None,
                       video: EpisodeVideoRecorder | None, operator_console: ConsoleLink | None) -> ActingStats:
    """:func:`run_actor` once the policy is settled: the learner link, the loop, the progress line."""

    def check_learner() -> None:
        if learner is not None and learner.poll() is not None:
            raise RuntimeError(f"the learner exited with code {learner.returncode}")

    loop, link = start_acting(config, env, actor_id, spaces, remote, check_learner, video, console=operator_console)
    columns = [TextColumn("[bold blue]env steps"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[line]}"), TimeElapsedColumn()]
    rate = {"updates": 0, "time": time.monotonic(), "per_s": 0.0}
    try:
        with Progress(*columns, console=console, refresh_per_second=4) as progress:
            task = progress.add_task("train", total=total_steps, line="")

            def show(stats: ActingStats) -> None:
                if learner is not None and learner.poll() is not None:
                    raise RuntimeError(f"the learner process exited with code {learner.returncode}; "
                                       "its log says why (resume with --resume)")
                now = time.monotonic()
                if now - rate["time"] > 2.0:
                    rate["per_s"] = (link.learner_updates - rate["updates"]) / (now - rate["time"])
                    rate["updates"], rate["time"] = link.learner_updates, now
                line = progress_line(stats, link, rate["per_s"], remote)
                progress.update(task, completed=min(stats.env_steps, total_steps), line=line)

            loop.run(total_steps, on_progress=show)
            if config.actor.eval_episodes and not loop.stop_requested:
                loop.evaluate(config.actor.eval_episodes)
                show(loop.stats)
    finally:
        link.close(flush_timeout_s=30)
    return loop.stats


def run_training(config: SessionConfig, run_dir: str | Path, total_steps: int, demos: str | None = None,
                 resume: bool = False, env_id: str | None = None, save_videos: int = 0, with_console: bool = False,
                 with_dashboard: bool = False) -> int:
    """``steerl train``: robot server + learner + actor on this machine (``save_videos``: every
    N-th episode's camera images into ``RUN_DIR/videos``; 0 for none; ``with_console``: the operator
    console's sockets; ``with_dashboard``: those and a ``steerl dashboard`` child serving the page)."""
    console = Console()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    source = env_id or f"{config.robot.backend} {config.robot.task.name}"
    console.print(f"[bold]steerl train[/] {config.name}: {source}, {total_steps} env steps, run dir {run_dir}"
                  f"{', demos ' + str(demos) if demos else ''}")
    warm_start = config.learner.warm_start
    if warm_start.enabled:
        console.print(f"warm start (WSRL) from {warm_start.checkpoint}: its policy acts from the first step, "
                      f"updates begin after {warm_start.warmup_steps} env steps, offline share "
                      f"{warm_start.offline_ratio:.0%}")
    with ExitStack() as stack:
        learner = stack.enter_context(learner_process(config, run_dir, demos, resume))
        env = open_env(config, env_id, stack)
        stack.callback(env.close)
        env = attach_teleop(config, attach_reward_classifier(config, env, console), console)
        if hasattr(env, "device"):
            stack.callback(env.device.close)  # the env itself is closed by the callback above
        video = None
        if save_videos:
            video = EpisodeVideoRecorder(run_dir / "videos", save_videos, config.robot.control.rate_hz)
            stack.callback(video.close)
        actor_id = f"actor-{config.name}"
        operator_console = None
        if with_console or with_dashboard:
            operator_console = open_console(config, stack, actor_id, total_steps)
        if with_dashboard:
            stack.enter_context(dashboard_process(config, run_dir.parent))
            console.print(f"operator console: http://{config.dashboard.host}:{config.dashboard.port}/")
        started = time.monotonic()
        stats = run_actor(config, env, total_steps, actor_id=actor_id, console=console, learner=learner,
                          video=video, operator_console=operator_console)
    if stats.best_policy_weights is not None and stats.best_eval is not None:
        from learner.learner import write_best_policy

        best_dir = write_best_policy(run_dir, stats.best_policy_weights, stats.best_eval)
        console.print(f"best periodic evaluation: {stats.best_eval['success_rate']:.0%} at "
                      f"{stats.best_eval['env_steps']} env steps; its policy is in {best_dir}")
    summary = {
        "config": config.name,
        "env_steps": stats.env_steps,
        "episodes": stats.episodes,
        "final_eval_success_rate": stats.eval_success_rate,
        "eval_history": stats.eval_history,
        "best_eval": stats.best_eval,
        "episode_history": stats.episode_history,
        "wall_time_s": time.monotonic() - started,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    final = "-" if stats.eval_success_rate is None else f"{stats.eval_success_rate:.0%}"
    console.print(f"[bold]done[/]: {stats.env_steps} env steps, final evaluation success {final}; "
                  f"TensorBoard logs in {run_dir / 'tensorboard'}")
    return 0


def run_evaluation(config: SessionConfig, checkpoint: str | Path, episodes: int, env_id: str | None = None,
                   seed: int | None = None) -> dict:
    """``steerl eval``: success rate of a checkpoint's deterministic policy over ``episodes``
    (episode seeds drawn from ``seed``, default ``config.seed``)."""
    from learner.learner import load_policy_from_checkpoint

    policy, keys = load_policy_from_checkpoint(config, checkpoint)
    return evaluate_policy(config, policy, keys, episodes, env_id, seed)


def evaluate_policy(config: SessionConfig, policy, keys: tuple[str, ...], episodes: int, env_id: str | None = None,
                    seed: int | None = None, deterministic: bool = True) -> dict:
    """Success rate and mean return of ``policy`` (anything with ``act(observation, deterministic)``
    reading ``keys``) over ``episodes`` episodes on the config's robot, seeds drawn from ``seed``."""
    with ExitStack() as stack:
        env = open_env(config, env_id, stack)
        stack.callback(env.close)
        loop = ActingLoop(config, env, None, keys, episode_seed=seed)
        loop.policy = policy
        returns, successes = [], []
        for _ in range(episodes):
            episode_return, _, success = loop.run_episode(deterministic=deterministic)
            returns.append(episode_return)
            successes.append(success)
    return {"episodes": episodes, "success_rate": float(np.mean(successes)), "mean_return": float(np.mean(returns))}


def record_demos(config: SessionConfig, episodes: int, out: str | Path, keep_failures: bool = False,
                 noise_std: float = 0.0, clean_episodes: int = 0) -> dict:
    """``steerl record-demos``: scripted-expert episodes saved as a replay buffer on disk; with
    ``clean_episodes``, that many noise-free successful episodes come first in the same buffer
    (mixed-quality offline data: a few clean demonstrations among noisy attempts)."""
    from learner.replay import ReplayBuffer
    from policies.scripted import ScriptedExpert

    with ExitStack() as stack:
        env = open_env(config, None, stack)
        stack.callback(env.close)
        capacity = max(1000, (episodes + clean_episodes) * config.robot.task.max_episode_steps)
        buffer = ReplayBuffer(env.observation_space, env.action_space.shape[0], capacity=capacity, seed=config.seed)
        kept, attempted = [], 0
        # Clean episodes from seeds after the noisy ones': the two sets never share a cube placement.
        for count, noise, first_seed, keep in ((clean_episodes, 0.0, config.seed + 100_000, False),
                                               (episodes, noise_std, config.seed, keep_failures)):
            if count:
                expert = ScriptedExpert(config.robot, noise_std=noise, seed=config.seed)
                played, tried = record_episodes(env, expert.act, count, first_seed, keep)
                kept, attempted = kept + played, attempted + tried
        for episode in kept:
            for step in episode.steps:
                buffer.add(*step)
    buffer.save(out)
    return {"episodes": len(kept), "attempted": attempted, "transitions": len(buffer), "path": str(out)}
