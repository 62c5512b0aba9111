"""The acting loop: observe, act, step the robot, ship the transition — never waiting on the learner.

Per step the loop picks an action (uniform random during the first ``actor.random_steps`` steps,
then the newest policy the learner published, or, with ``actor.policy_source: remote``, the
:class:`~actor.remote_policy.RemotePolicy` set as :attr:`ActingLoop.policy`, which returns a
zero-motion hold action whenever the policy server does not answer in time), steps the env, and
hands the transition to the :class:`~actor.learner_link.LearnerLink`, whose thread does the
network work. New weights are swapped in between steps. Every ``actor.eval_every_episodes``
episodes it runs ``actor.eval_episodes`` deterministic evaluation episodes (also shipped as data,
marked as evaluation in their summaries, and counted in ``env_steps``: every step the robot took is).

Warm start (``learner.warm_start.checkpoint`` set, learner/wsrl.py) and PA-RL (``learner.algorithm:
parl``, learner/parl.py): the learner publishes the pre-trained policy (the steered base policy)
when it is built, and the actor acts with it from the first step: no random steps, and
:meth:`ActingLoop.run` waits (up to ``PRETRAINED_POLICY_WAIT_S``, then fails) for those weights
rather than act before they arrive.

Human in the loop: when a teleop device overrides the policy (the env is wrapped in an
:class:`~actor.intervention.InterventionWrapper`), the transition carries the action the robot
EXECUTED (``info["executed_action"]``), flagged ``intervened``, and each episode's intervention rate
(intervened steps / steps) goes into :class:`ActingStats` and the learner's ``EpisodeSummary``.
Operator events (mark success or failure, re-record, pause, emergency stop, resume) come from
``info["operator_events"]`` and from reading the device directly before every step, after every
reset and while paused; :mod:`actor.operator` lists exactly what each one does. In short: a success
mark stores the last step as terminal with reward ``SUCCESS_REWARD`` (1.0) and ends the episode; a
failure mark stores it truncated and ends it; a re-record discards the episode (the learner drops
its transitions, the statistics leave it out); a pause stops stepping (the server's watchdog holds
the arm), cutting the episode if it outlasted the watchdog; an emergency stop latches a hold on the
robot server at once and the loop sends nothing until resume. The last step of an episode is held
back until the next step begins (or the episode ends), so that a label can still apply to it.

``--save-videos`` (:class:`~actor.video.EpisodeVideoRecorder`): every N-th episode's camera images
are written as MP4 files, from the observations the loop already has.

Operator console (:class:`~actor.console.ConsoleLink`, ``steerl train --dashboard``, ``steerl
deploy``): after every reset and step the loop publishes its state, the action, the robot's status
and (rate-limited) the camera images; while paused, the state alone. The console's buttons arrive as
operator events through the same :class:`~actor.operator.OperatorControl` as the teleop device's,
and its stop button ends :meth:`ActingLoop.run` after the episode under way.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actor.console import ConsoleLink
from actor.env import RobotEmergencyStopped, RobotEnv
from actor.intervention import find_intervention_wrapper
from actor.learner_link import LearnerLink
from actor.operator import SUCCESS_REWARD, EpisodeEnd, OperatorControl, OperatorState, find_teleop_device
from actor.remote_policy import RemotePolicy
from actor.teleop import TeleopDevice
from actor.video import EpisodeVideoRecorder
from hardware_configs.schema import SessionConfig
from policies.gaussian import policy_state_to_bytes
from transport import steerl_pb2 as pb

log = logging.getLogger("steerl.actor")

# With a warm start or PA-RL, how long run() waits for the learner's first (pre-trained) weights.
PRETRAINED_POLICY_WAIT_S = 60.0


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
    # Share of each recent episode's steps the operator controlled.
    recent_intervention_rates: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    # The episode running now: its number, steps and return so far.
    episode: int = 0
    episode_step: int = 0
    episode_return: float = 0.0
    # running / paused / e-stopped (OperatorState values).
    operator_state: str = "running"
    # Episodes ended by the operator: success / failure marks, re-recorded (discarded), interrupted.
    operator_ends: collections.Counter = field(default_factory=collections.Counter)
    discarded_episodes: int = 0
    # The evaluation with the highest success rate so far (the latest among equals): its
    # eval_history entry plus the policy version, and the weights it evaluated (safetensors bytes).
    best_eval: dict[str, float] | None = None
    # One entry per finished training episode (not evaluation, not re-recorded):
    # {"env_steps", "success", "intervention_rate"}.
    episode_history: list[dict[str, float]] = field(default_factory=list)
    best_policy_weights: bytes | None = None

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.recent_successes)) if self.recent_successes else 0.0

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.recent_returns)) if self.recent_returns else 0.0

    @property
    def intervention_rate(self) -> float:
        """Mean share of intervened steps over the recent episodes."""
        return float(np.mean(self.recent_intervention_rates)) if self.recent_intervention_rates else 0.0


@dataclass
class EpisodeOutcome:
    """How the last episode ended (:attr:`ActingLoop.last_episode`)."""

    episode: int
    episode_return: float
    length: int
    success: bool
    interventions: int
    discarded: bool = False
    # Set when the operator ended it (success / failure mark, re-record, interruption).
    ended_by: EpisodeEnd | None = None

    @property
    def intervention_rate(self) -> float:
        return self.interventions / self.length if self.length else 0.0


@dataclass
class _HeldStep:
    """An executed step not shipped yet (a label may still change it)."""

    step: int
    observation: dict[str, np.ndarray]
    action: np.ndarray
    reward: float
    next_observation: dict[str, np.ndarray]
    terminated: bool
    truncated: bool
    intervened: bool

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


class ActingLoop:
    """Runs episodes on ``env`` with the learner's newest policy (see module docstring)."""

    def __init__(self, config: SessionConfig, env: RobotEnv, link: LearnerLink | None,
                 observation_keys: tuple[str, ...], first_episode: int = 0,
                 teleop: TeleopDevice | None = None, video: EpisodeVideoRecorder | None = None,
                 episode_seed: int | None = None, console: ConsoleLink | None = None) -> None:
        """``teleop``: the device read directly between steps (default: the device of an
        InterventionWrapper around ``env``); ``video``: saves every N-th episode's camera images;
        ``episode_seed``: seeds the sequence of episode seeds (default: ``config.seed``);
        ``console``: publishes telemetry to and takes buttons from the operator console."""
        self.config = config
        self.env = env
        self.link = link
        self.keys = observation_keys or tuple(env.observation_space.spaces)
        self.policy: Any = None
        self.stats = ActingStats()
        self.video = video
        self.console = console
        self.operator = OperatorControl(teleop if teleop is not None else find_teleop_device(env), env,
                                        watchdog_s=config.robot.safety.watchdog_ms / 1000.0,
                                        sources=[console.read_events] if console is not None else ())
        self._last_action: np.ndarray | None = None
        self._intervened = False
        self._evaluating = False
        self.last_episode: EpisodeOutcome | None = None
        # Called with the stats during long episodes and while paused (set by run()).
        self.on_progress: Callable[[ActingStats], None] | None = None
        self._last_report = 0.0
        self._episode = first_episode
        # A loop that resumes a stream (first_episode > 0) draws other episode seeds than its first life.
        seed = config.seed if episode_seed is None else episode_seed
        self._rng = np.random.default_rng(seed if first_episode == 0 else [seed, first_episode])
        env.action_space.seed(config.seed)
        # A warm-started run acts with the pre-trained policy from the first step.
        self.warm_start = config.learner.warm_start.enabled
        # ... and so does PA-RL's base policy (learner.algorithm: parl).
        self.acts_from_first_step = self.warm_start or config.learner.algorithm == "parl"
        self.random_steps = 0 if self.acts_from_first_step else config.actor.random_steps
        self._stop_requested = False

    def _select(self, observation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {key: observation[key] for key in self.keys}

    def _swap_policy(self) -> None:
        if self.link is None:
            return
        fresh = self.link.take_policy()
        if fresh is not None:
            self.stats.policy_version, self.policy = fresh

    def _action(self, observation: dict[str, np.ndarray], deterministic: bool) -> np.ndarray:
        exploring = self.stats.env_steps < self.random_steps and not deterministic
        if self.policy is None or exploring:
            return self.env.action_space.sample()
        return np.asarray(self.policy.act(self._select(observation), deterministic=deterministic), dtype=np.float32)

    # -- operator plumbing --------------------------------------------------------------------
    def _report(self, state: OperatorState | None = None, force: bool = False) -> None:
        """Refresh the stats the progress line shows and call ``on_progress`` (at most 4 times a second)."""
        self.stats.operator_state = (state or self.operator.state).value
        if state is not None and self.console is not None:  # waiting: the page shows the state alone
            self._publish(None)
        now = time.monotonic()
        if self.on_progress is not None and (force or state is not None or now - self._last_report >= 0.25):
            self._last_report = now
            self.on_progress(self.stats)

    def _reset(self) -> dict[str, np.ndarray]:
        """Wait out a pause or stop (events between episodes apply here), then reset the robot."""
        while True:
            self.operator.poll()
            self.operator.service(episode_running=False, steps_taken=0, report=self._report)
            try:
                observation, info = self.env.reset(seed=int(self._rng.integers(2**31)))
            except RobotEmergencyStopped as error:
                self.operator.robot_refused(str(error))
                continue
            self.operator.begin_episode()
            self.operator.note_robot_info(info)
            if isinstance(self.policy, RemotePolicy):
                self.policy.begin_episode()  # a hold keeps the gripper as the reset left it
            self.operator.poll()  # events that arrived during the reset are applied before the first step
            self.stats.episode, self.stats.episode_step, self.stats.episode_return = self._episode, 0, 0.0
            if self.video is not None:
                self.video.begin(self._episode)
                self.video.add(observation)
            self._last_action, self._intervened = None, False
            self._publish(observation)
            return observation

    def _ship(self, held: _HeldStep) -> None:
        if self.link is not None:
            self.link.submit(self._episode, held.step, self._select(held.observation), held.action, held.reward,
                             self._select(held.next_observation), held.terminated, held.truncated,
                             intervened=held.intervened)

    # -- episodes -----------------------------------------------------------------------------
    def run_episode(self, deterministic: bool = False) -> tuple[float, int, bool]:
        """One episode; returns (return, length, success). How operator events end or pause it:
        see the module docstring; :attr:`last_episode` has the details (discarded, ended_by)."""
        self._evaluating = deterministic
        observation = self._reset()
        episode_return, length, interventions, info = 0.0, 0, 0, {}
        held: _HeldStep | None = None
        while True:
            self.operator.poll()
            end = self.operator.service(episode_running=True, steps_taken=length, report=self._report)
            if end is EpisodeEnd.INTERRUPTED and held is None:
                observation = self._reset()  # no step taken yet: just start over
                continue
            if held is not None and held.done:
                if end is EpisodeEnd.INTERRUPTED:
                    end = None  # the task had ended it already; the wait changed nothing
                break
            if end is not None:
                break
            self._swap_policy()
            action = self._action(observation, deterministic)
            try:
                next_observation, reward, terminated, truncated, info = self.env.step(action)
            except RobotEmergencyStopped as error:  # stopped by someone else: nothing moved
                self.operator.robot_refused(str(error))
                continue
            self.operator.note_command()
            self.operator.note_robot_info(info)
            if held is not None:  # the episode went on past it: no label can change it any more
                self._ship(held)
            executed = np.asarray(info.get("executed_action", action), dtype=np.float32)
            if isinstance(self.policy, RemotePolicy):
                self.policy.note_executed(executed)  # the gripper command a hold keeps
            intervened = bool(info.get("intervened", 0.0))
            self.operator.receive(info.get("operator_events", ()))
            held = _HeldStep(length, observation, executed, float(reward), next_observation, bool(terminated),
                             bool(truncated), intervened)
            episode_return += reward
            length += 1
            interventions += intervened
            self.stats.env_steps += 1  # evaluation steps too: they reach the learner as data
            self.stats.episode_step, self.stats.episode_return = length, episode_return
            if self.video is not None:
                self.video.add(next_observation)
            self._last_action, self._intervened = executed, intervened
            self._publish(next_observation)
            observation = next_observation
            self._report()
        return self._finish(held, end, episode_return, length, interventions, info, deterministic)

    def _finish(self, held: _HeldStep | None, end: EpisodeEnd | None, episode_return: float, length: int,
                interventions: int, info: dict, deterministic: bool) -> tuple[float, int, bool]:
        """Apply the operator's label to the held last step, ship it and the episode summary."""
        success = bool(info.get("success", 0.0))
        discarded = end is EpisodeEnd.DISCARD
        if held is not None and not discarded:
            if end is EpisodeEnd.SUCCESS:
                episode_return += SUCCESS_REWARD - held.reward
                held.reward, held.terminated, held.truncated = SUCCESS_REWARD, True, False
                success = True
            elif end is EpisodeEnd.FAILURE:
                held.truncated, success = True, False
            elif end is EpisodeEnd.INTERRUPTED and not held.done:
                held.truncated, success = True, False
            self._ship(held)
        outcome = EpisodeOutcome(self._episode, episode_return, length, success and not discarded, interventions,
                                 discarded, end)
        if end is not None:
            self.stats.operator_ends[end.value] += 1
            log.info("episode %d ended by the operator: %s (%d steps)", self._episode, end.value, length)
        if self.link is not None:
            self.link.episode_finished(pb.EpisodeSummary(
                episode=self._episode, episode_return=episode_return, length=length, success=outcome.success,
                evaluation=deterministic, interventions=interventions,
                intervention_rate=outcome.intervention_rate, discarded=discarded))
        if self.console is not None:
            self.console.episode_finished(pb.ConsoleEpisode(
                episode=self._episode, env_steps=self.stats.env_steps, episode_return=episode_return, length=length,
                success=outcome.success, intervention_rate=outcome.intervention_rate, evaluation=deterministic,
                discarded=discarded, ended_by=end.value if end is not None else ""))
        if self.video is not None and self.video.recording:
            label = "discarded" if discarded else ("success" if outcome.success else (
                end.value if end is not None else "failure"))
            self.video.end(label)
        self.last_episode = outcome
        self._episode += 1
        return episode_return, length, outcome.success

    @contextlib.contextmanager
    def _operator_overrides(self, enabled: bool) -> Iterator[None]:
        """Within the block, an :class:`~actor.intervention.InterventionWrapper` on the env (if any)
        executes the operator's actions only when ``enabled`` (its events still arrive)."""
        wrapper = find_intervention_wrapper(self.env)
        if wrapper is None:
            yield
            return
        previous, wrapper.overrides_enabled = wrapper.overrides_enabled, enabled
        try:
            yield
        finally:
            wrapper.overrides_enabled = previous

    def evaluate(self, episodes: int) -> float:
        """Success rate of the deterministic policy over ``episodes`` episodes (re-recorded ones are
        run again, up to three times the number asked for)."""
        successes: list[bool] = []
        with self._operator_overrides(False):  # evaluation measures the policy alone
            for _ in range(3 * episodes):
                success = self.run_episode(deterministic=True)[2]
                if self.last_episode is not None and self.last_episode.discarded:
                    continue
                successes.append(success)
                if len(successes) == episodes:
                    break
        rate = float(np.mean(successes)) if successes else 0.0
        entry = {"env_steps": self.stats.env_steps, "success_rate": rate,
                 "wall_s": round(time.monotonic() - self.stats.started_at, 1)}
        self.stats.eval_success_rate = rate
        self.stats.eval_history.append(entry)
        best = self.stats.best_eval
        # The learner's policy (not a remote one served elsewhere): its tensors, or the packed bundle it came in.
        weights = getattr(self.policy, "published_bytes", None)
        if weights is None and hasattr(self.policy, "state_dict"):
            weights = policy_state_to_bytes(self.policy)
        if weights is not None and (best is None or rate >= best["success_rate"]):
            self.stats.best_eval = {**entry, "episodes": len(successes), "policy_version": self.stats.policy_version}
            self.stats.best_policy_weights = weights
        return rate

    def _wait_for_learner(self, on_progress: Callable[[ActingStats], None] | None) -> None:
        """Between episodes: hold back until the learner's updates keep up (sim pacing)."""
        ratio = self.config.actor.max_steps_per_update
        if not ratio or self.link is None:
            return
        learner = self.config.learner
        first_update_after = learner.warm_start.warmup_steps if self.warm_start else learner.learning_starts
        while self.link.connected:  # a learner that is away is not waited for
            steps_to_cover = self.stats.env_steps - first_update_after
            if self.link.learner_updates * ratio >= steps_to_cover:
                return
            if on_progress is not None:
                on_progress(self.stats)
            self.operator.poll()  # an emergency stop acts at once, the rest waits for the next episode
            time.sleep(0.02)

    def wait_for_pretrained_policy(self, timeout_s: float = PRETRAINED_POLICY_WAIT_S) -> None:
        """Warm start and PA-RL: take the learner's first published weights (the pre-trained policy) before
        the first step; raises ``RuntimeError`` when none arrive within ``timeout_s``."""
        if self.policy is not None or self.link is None:
            return
        log.info("waiting up to %.0f s for the pre-trained policy from the learner", timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            self._swap_policy()
            if self.policy is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no policy weights from the learner within {timeout_s:.0f} s; a "
                                   "warm-started or PA-RL actor does not act without the pre-trained policy")
            self.operator.poll()  # an emergency stop acts at once
            if self.on_progress is not None:
                self.on_progress(self.stats)
            time.sleep(0.02)
        log.info("acting with the pre-trained policy (weights version %d) from the first step",
                 self.stats.policy_version)

    def request_stop(self) -> None:
        """Make :meth:`run` return once the episode under way has ended (safe from any thread)."""
        self._stop_requested = True

    @property
    def stop_requested(self) -> bool:
        """:meth:`request_stop` was called, or the console's stop button pressed."""
        return self._stop_requested or (self.console is not None and self.console.stop_requested)

    def _publish(self, observation: dict[str, np.ndarray] | None) -> None:
        """Telemetry for the console: the state, and with ``observation`` its camera images (when
        the console's rate limit allows; status-only otherwise)."""
        console = self.console
        if console is None:
            return
        images = None
        if observation is not None:
            if not console.due():
                return
            images = {key[len("images/"):]: value for key, value in observation.items() if key.startswith("images/")}
        stats, link = self.stats, self.link
        latency = getattr(link, "latency_ms", None)
        fields = {
            "observed_unix_s": time.time(), "env_steps": stats.env_steps, "episode": self._episode,
            "episode_step": stats.episode_step, "episode_return": stats.episode_return,
            "operator_state": self.operator.state.value, "intervened": self._intervened,
            "evaluating": self._evaluating, "policy_version": stats.policy_version,
            "mean_return": stats.mean_return, "success_rate": stats.success_rate,
            "intervention_rate": stats.intervention_rate, "steps_per_s": stats.steps_per_s,
            "has_eval": stats.eval_success_rate is not None, "eval_success_rate": stats.eval_success_rate or 0.0,
            "learner_connected": bool(getattr(link, "connected", False)),
            "learner_updates": int(getattr(link, "learner_updates", 0)),
            "link_latency_ms": -1.0 if latency is None else float(latency),
        }
        console.publish(fields, self.operator.robot_info, images, self._last_action, self.operator.events_seen)

    def run(self, total_steps: int, on_progress: Callable[[ActingStats], None] | None = None) -> ActingStats:
        """Act until ``total_steps`` training env steps are done (or :meth:`request_stop`)."""
        if on_progress is not None:
            self.on_progress = on_progress
        if self.acts_from_first_step:
            self.wait_for_pretrained_policy()
        start, start_steps = time.perf_counter(), self.stats.env_steps
        every = self.config.actor.eval_every_episodes
        while self.stats.env_steps < total_steps and not self.stop_requested:
            self._wait_for_learner(on_progress)
            episode_return, _, success = self.run_episode()
            self.stats.episodes += 1
            outcome = self.last_episode
            if outcome is not None and outcome.discarded:
                self.stats.discarded_episodes += 1  # re-recorded: not an outcome of the policy
            else:
                self.stats.recent_returns.append(episode_return)
                self.stats.recent_successes.append(success)
                if outcome is not None:
                    self.stats.recent_intervention_rates.append(outcome.intervention_rate)
                    self.stats.episode_history.append({"env_steps": self.stats.env_steps, "success": float(success),
                                                       "intervention_rate": round(outcome.intervention_rate, 4)})
            self.stats.steps_per_s = (self.stats.env_steps - start_steps) / (time.perf_counter() - start)
            if every and self.stats.episodes % every == 0 and self.policy is not None and not self.stop_requested:
                self.evaluate(self.config.actor.eval_episodes)
            if on_progress is not None:
                on_progress(self.stats)
        return self.stats
