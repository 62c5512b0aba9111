"""A simulated person at the PyBullet cell: the scripted expert, intervening the way an operator does.

:class:`SimulatedOperator` is a :class:`~actor.teleop.TeleopDevice` driven step by step through
:meth:`~SimulatedOperator.observe` (the :class:`~actor.intervention.InterventionWrapper` calls it
with the observation the policy acted on and the policy's action). Each step it

1. judges whether the task is moving forward: the :class:`~policies.scripted.ScriptedExpert`'s
   :meth:`~policies.scripted.ScriptedExpert.progress` (the hand closing in on the cube, the cube
   rising) gaining at least ``min_progress_m`` on the best seen since the last gain. A policy that
   solves the task its own way is left alone however different its actions are from the expert's;
2. while watching: after ``patience_steps`` steps without progress (stuck, dithering or drifting
   away) it decides to step in;
3. takes over ``reaction_delay_steps`` later and steers for ``hold_steps`` with the expert's action
   plus Gaussian noise (``noise_std``) on the motion, then hands back and watches again;
4. never exceeds its budget: an intervened step must keep the intervened share at most
   ``max_episode_share`` of this episode's steps so far and ``max_total_share`` of all steps so far
   (a running cap, so the share holds at every step, including the last of an episode that ends
   early). A step the budget forbids is left to the policy.

All randomness comes from one generator seeded by ``seed``: the same seed, env seeds and policy give
the same interventions.
"""

from __future__ import annotations

import numpy as np

from actor.teleop import TeleopDevice, TeleopReading, action_layout
from hardware_configs.schema import RobotConfig
from hardware_configs.teleop import SimulatedOperatorConfig
from policies.scripted import ScriptedExpert


class SimulatedOperator(TeleopDevice):
    """See the module docstring. ``robot`` must have ``task.privileged_state: true``."""

    def __init__(self, config: SimulatedOperatorConfig, robot: RobotConfig, action_dim: int | None = None) -> None:
        self.config = config
        self.name = "simulated operator"
        self.action_dim = action_dim if action_dim is not None else robot.action.dim
        if self.action_dim != robot.action.dim:
            raise ValueError(f"action_dim {self.action_dim} does not match the robot's {robot.action.dim}-dim action")
        layout = action_layout(self.action_dim)
        self._gripper_index = layout["gripper"]
        self._motion = np.array([index for name, index in layout.items() if name != "gripper"])
        self._expert = ScriptedExpert(robot)
        self._rng = np.random.default_rng(config.seed)
        self._started = False
        self.total_steps = 0
        self.total_interventions = 0
        self.takeovers = 0
        self.on_episode_start()

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        self._started = True

    def close(self) -> None:
        self._started = False

    def on_episode_start(self) -> None:
        self.episode_steps = 0
        self.episode_interventions = 0
        self._phase = "watching"
        self._best_progress = -np.inf
        self._steps_without_progress = 0
        self._countdown = 0
        self._reading = TeleopReading(self._idle_action(), False)

    def read(self) -> TeleopReading:
        """This step's decision (made by the last :meth:`observe`)."""
        return self._reading

    def made_progress(self, observation: dict[str, np.ndarray]) -> bool:
        """Whether the task has moved forward by ``min_progress_m`` since it last did (updates the mark)."""
        progress = self._expert.progress(observation)
        if progress >= self._best_progress + self.config.min_progress_m:  # the first step: -inf + m
            self._best_progress = progress
            return True
        return False

    def observe(self, observation: dict[str, np.ndarray], policy_action: np.ndarray) -> None:
        """Decide this step: watch, react, or steer (see the module docstring).

        ``policy_action`` is what the policy proposes; the operator judges the state the policy's
        earlier actions led to, as a person watching the arm does.
        """
        stalled = not self.made_progress(observation)
        if self._phase == "watching":
            self._steps_without_progress = self._steps_without_progress + 1 if stalled else 0
            if self._steps_without_progress >= self.config.patience_steps:
                self._phase, self._countdown = "reacting", self.config.reaction_delay_steps
                self._steps_without_progress = 0
        if self._phase == "reacting":
            if self._countdown == 0:
                self._phase, self._countdown = "holding", self.config.hold_steps
                self.takeovers += 1
            else:
                self._countdown -= 1
        intervene = self._phase == "holding" and self._within_budget()
        if self._phase == "holding":
            self._countdown -= 1
            if self._countdown == 0:
                self._phase = "watching"
        self.episode_steps += 1
        self.total_steps += 1
        if intervene:
            self.episode_interventions += 1
            self.total_interventions += 1
            self._reading = TeleopReading(self._noisy(self._expert.act(observation)), True)
        else:
            self._reading = TeleopReading(self._idle_action(), False)

    def _within_budget(self) -> bool:
        """Whether one more intervened step keeps both running shares within their caps."""
        episode_ok = self.episode_interventions + 1 <= self.config.max_episode_share * (self.episode_steps + 1) + 1e-9
        total_ok = self.total_interventions + 1 <= self.config.max_total_share * (self.total_steps + 1) + 1e-9
        return episode_ok and total_ok

    def _noisy(self, expert: np.ndarray) -> np.ndarray:
        action = expert.astype(np.float32).copy()
        if self.config.noise_std > 0:
            noise = self._rng.normal(0.0, self.config.noise_std, len(self._motion))
            action[self._motion] = np.clip(action[self._motion] + noise, -1.0, 1.0)
        return action

    def _idle_action(self) -> np.ndarray:
        action = np.zeros(self.action_dim, dtype=np.float32)
        action[self._gripper_index] = np.nan
        return action
