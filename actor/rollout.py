"""Run episodes on a robot with a fixed policy (scripted expert or random), with live progress.

This is the acting loop without a learner: it starts the robot server as a child process (the
same process and sockets as on real hardware) unless one is already running, connects a
:class:`~actor.env.RobotEnv` and reports each episode's return, length and success.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from actor.env import RobotEnv, RobotLinkError, make_env
from hardware_configs.schema import SessionConfig, save_config

log = logging.getLogger("steerl.actor")

SERVER_START_TIMEOUT_S = 60.0


@contextmanager
def steerl_child(config: SessionConfig, command: str, *arguments: str,
                 stop_timeout_s: float = 10.0) -> Iterator[subprocess.Popen]:
    """``steerl COMMAND --config <config> ARGUMENTS`` as a child process, stopped with SIGTERM
    (then killed after ``stop_timeout_s``) on exit."""
    with tempfile.TemporaryDirectory(prefix=f"steerl-{command}-") as tmp:
        config_file = save_config(config, Path(tmp) / f"{config.name}.yaml")
        child = subprocess.Popen([sys.executable, "-m", "tools.cli", command, "--config", str(config_file),
                                  *arguments])
        try:
            yield child
        finally:
            child.terminate()
            try:
                child.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def robot_server_process(config: SessionConfig):
    """A ``steerl robot-server`` child running ``config``."""
    return steerl_child(config, "robot-server")


def connect_env(config: SessionConfig, server: subprocess.Popen | None = None,
                timeout_s: float = SERVER_START_TIMEOUT_S) -> RobotEnv:
    """Connect to the robot, retrying while a freshly started server comes up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return make_env(config)
        except RobotLinkError as error:
            if server is not None and server.poll() is not None:
                raise RobotLinkError(f"the robot server exited with code {server.returncode}") from None
            if time.monotonic() > deadline:
                raise RobotLinkError(f"robot server not reachable after {timeout_s:.0f} s: {error}") from None


def make_policy(name: str, config: SessionConfig, env: RobotEnv) -> Callable[[dict], np.ndarray]:
    if name == "random":
        env.action_space.seed(config.seed)
        return lambda observation: env.action_space.sample()
    from policies.scripted import ScriptedExpert

    return ScriptedExpert(config.robot).act


@dataclass
class Episode:
    """One played episode: its steps as (observation, action, reward, next_observation,
    terminated, truncated), its return and whether it succeeded."""

    steps: list[tuple]
    episode_return: float
    success: bool


def play_episode(env: RobotEnv, policy: Callable[[dict], np.ndarray], seed: int) -> Episode:
    """Run one episode of ``policy`` from ``env.reset(seed=seed)``."""
    observation, _ = env.reset(seed=seed)
    steps, info = [], {}
    while True:
        action = policy(observation)
        next_observation, reward, terminated, truncated, info = env.step(action)
        steps.append((observation, action, reward, next_observation, terminated, truncated))
        observation = next_observation
        if terminated or truncated:
            break
    return Episode(steps, float(sum(step[2] for step in steps)), bool(info.get("success", 0.0)))


def record_episodes(env: RobotEnv, policy: Callable[[dict], np.ndarray], episodes: int, first_seed: int,
                    keep_failures: bool = False, max_attempts: int | None = None) -> tuple[list[Episode], int]:
    """Play episodes from seeds ``first_seed, first_seed + 1, ...`` until ``episodes`` successful
    ones (any, with ``keep_failures``) are kept or ``max_attempts`` (default ``5 * episodes``) are
    played; returns ``(kept episodes, attempts)``."""
    kept: list[Episode] = []
    attempts, limit = 0, max_attempts if max_attempts is not None else 5 * episodes
    while len(kept) < episodes and attempts < limit:
        episode = play_episode(env, policy, seed=first_seed + attempts)
        attempts += 1
        if episode.success or keep_failures:
            kept.append(episode)
    return kept, attempts


def run_episodes(env: RobotEnv, policy: Callable[[dict], np.ndarray], episodes: int, seed: int,
                 on_episode: Callable[[int, float, int, bool, float], None]) -> list[bool]:
    """Run ``episodes`` episodes; ``on_episode(index, return, length, success, steps_per_s)``."""
    successes = []
    for index in range(episodes):
        start = time.perf_counter()
        episode = play_episode(env, policy, seed + index)
        successes.append(episode.success)
        on_episode(index, episode.episode_return, len(episode.steps), episode.success,
                   len(episode.steps) / (time.perf_counter() - start))
    return successes


def run_rollout(config: SessionConfig, episodes: int, policy: str, start_server: bool = True,
                config_source: str = "") -> int:
    console = Console()
    console.print(f"[bold]steerl rollout[/] {config.name} ({config_source or config.name}): "
                  f"{config.robot.backend} backend, task {config.robot.task.name}, {config.env.connection} link, "
                  f"{config.robot.control.mode} clock at {config.robot.control.rate_hz:g} Hz, policy {policy}")
    spawn = start_server and config.env.connection == "zmq"
    with (robot_server_process(config) if spawn else _nothing()) as server:
        env = connect_env(config, server)
        act = make_policy(policy, config, env)
        columns = [TextColumn("[bold blue]episodes"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("success {task.fields[rate]:>4.0%}  return {task.fields[ret]:6.2f}  "
                              "{task.fields[sps]:6.0f} steps/s"), TimeElapsedColumn()]
        try:
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("rollout", total=episodes, rate=0.0, ret=0.0, sps=0.0)
                wins: list[bool] = []

                def report(index: int, ret: float, length: int, success: bool, sps: float) -> None:
                    wins.append(success)
                    progress.update(task, advance=1, rate=float(np.mean(wins)), ret=ret, sps=sps)
                    progress.console.log(f"episode {index}: return {ret:.2f}, {length} steps, "
                                         f"{'success' if success else 'no success'}")

                successes = run_episodes(env, act, episodes, config.seed, report)
        finally:
            env.close()
    console.print(f"[bold]success rate {np.mean(successes):.0%}[/] over {episodes} episodes")
    return 0


@contextmanager
def _nothing() -> Iterator[None]:
    yield None
