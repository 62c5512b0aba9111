"""The acting loop: observe, act, step the robot, ship the transition — never waiting on the learner.

Per step the loop picks an action (uniform random during the first ``actor.random_steps`` steps,
then the newest policy the learner published), steps the env, and hands the transition to the
:class:`~actor.learner_link.LearnerLink`, whose thread does the network work. New weights are
swapped in between steps. Every ``actor.eval_every_episodes`` episodes it runs
``actor.eval_episodes`` deterministic evaluation episodes (also shipped as data, marked as
evaluation in their summaries, and counted in ``env_steps``: every step the robot took is).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actor.env import RobotEnv
from actor.learner_link import LearnerLink
from hardware_configs.schema import SessionConfig
from transport import steerl_pb2 as pb

log = logging.getLogger("steerl.actor")


@dataclass
class ActingStats:
    """What the progress line shows."""

    env_steps: int = 0
    episodes: int = 0
    policy_version: int = 0
    recent_returns: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    recent_successes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    eval_success_rate: float | None = None
    # One entry per evaluation: {"env_steps", "success_rate", "wall_s"} (wall_s since the loop began).
    eval_history: list[dict[str, float]] = field(default_factory=list)
    steps_per_s: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.recent_successes)) if self.recent_successes else 0.0

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.recent_returns)) if self.recent_returns else 0.0


class ActingLoop:
    """Runs episodes on ``env`` with the learner's newest policy (see module docstring)."""

    def __init__(self, config: SessionConfig, env: RobotEnv, link: LearnerLink | None,
                 observation_keys: tuple[str, ...], first_episode: int = 0) -> None:
        self.config = config
        self.env = env
        self.link = link
        self.keys = observation_keys or tuple(env.observation_space.spaces)
        self.policy: Any = None
        self.stats = ActingStats()
        self._episode = first_episode
        self._rng = np.random.default_rng(config.seed)
        env.action_space.seed(config.seed)

    def _select(self, observation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {key: observation[key] for key in self.keys}

    def _swap_policy(self) -> None:
        if self.link is None:
            return
        fresh = self.link.take_policy()
        if fresh is not None:
            self.stats.policy_version, self.policy = fresh

    def _action(self, observation: dict[str, np.ndarray], deterministic: bool) -> np.ndarray:
        exploring = self.stats.env_steps < self.config.actor.random_steps and not deterministic
        if self.policy is None or exploring:
            return self.env.action_space.sample()
        return np.asarray(self.policy.act(self._select(observation), deterministic=deterministic), dtype=np.float32)

    def run_episode(self, deterministic: bool = False) -> tuple[float, int, bool]:
        """One episode; returns (return, length, success)."""
        observation, _ = self.env.reset(seed=int(self._rng.integers(2**31)))
        episode_return, length, info = 0.0, 0, {}
        while True:
            self._swap_policy()
            action = self._action(observation, deterministic)
            next_observation, reward, terminated, truncated, info = self.env.step(action)
            if self.link is not None:
                self.link.submit(self._episode, length, self._select(observation), action, reward,
                                 self._select(next_observation), terminated, truncated)
            episode_return += reward
            length += 1
            self.stats.env_steps += 1  # evaluation steps too: they reach the learner as data
            observation = next_observation
            if terminated or truncated:
                break
        success = bool(info.get("success", 0.0))
        if self.link is not None:
            self.link.episode_finished(pb.EpisodeSummary(
                episode=self._episode, episode_return=episode_return, length=length, success=success,
                evaluation=deterministic))
        self._episode += 1
        return episode_return, length, success

    def evaluate(self, episodes: int) -> float:
        successes = [self.run_episode(deterministic=True)[2] for _ in range(episodes)]
        rate = float(np.mean(successes))
        self.stats.eval_success_rate = rate
        self.stats.eval_history.append({"env_steps": self.stats.env_steps, "success_rate": rate,
                                        "wall_s": round(time.monotonic() - self.stats.started_at, 1)})
        return rate

    def _wait_for_learner(self, on_progress: Callable[[ActingStats], None] | None) -> None:
        """Between episodes: hold back until the learner's updates keep up (sim pacing)."""
        ratio = self.config.actor.max_steps_per_update
        if not ratio or self.link is None:
            return
        while self.link.connected:  # a learner that is away is not waited for
            steps_to_cover = self.stats.env_steps - self.config.learner.learning_starts
            if self.link.learner_updates * ratio >= steps_to_cover:
                return
            if on_progress is not None:
                on_progress(self.stats)
            time.sleep(0.02)

    def run(self, total_steps: int, on_progress: Callable[[ActingStats], None] | None = None) -> ActingStats:
        """Act until ``total_steps`` training env steps are done."""
        start, start_steps = time.perf_counter(), self.stats.env_steps
        every = self.config.actor.eval_every_episodes
        while self.stats.env_steps < total_steps:
            self._wait_for_learner(on_progress)
            episode_return, _, success = self.run_episode()
            self.stats.episodes += 1
            self.stats.recent_returns.append(episode_return)
            self.stats.recent_successes.append(success)
            self.stats.steps_per_s = (self.stats.env_steps - start_steps) / (time.perf_counter() - start)
            if every and self.stats.episodes % every == 0 and self.policy is not None:
                self.evaluate(self.config.actor.eval_episodes)
            if on_progress is not None:
                on_progress(self.stats)
        return self.stats
