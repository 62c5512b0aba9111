"""The reward classifier on the actor: a gymnasium wrapper that replaces the env's reward.

:class:`RewardClassifierWrapper` runs a trained :class:`learner.reward_classifier.RewardClassifier`
on every observation the env returns (the actor owns the camera frames, so the classifier runs
here, next to the policy, not on the learner). Per step::

    p        = classifier(images of the new observation)            # p(success), sigmoid output
    success  = p >= threshold  and  every proprioceptive check passes
    reward   = 1.0 if success else 0.0
    terminated = env's terminated or success

``info`` gains ``classifier_probability``, ``classifier_success`` (0/1) and
``classifier_latency_ms``; ``info["success"]`` becomes the classifier's decision (what the rest of
the stack counts as a success on a real robot, which has no flag of its own) and the env's own
values move to ``env_success`` (when the env reported one: the simulator does) and
``env_reward``, so that a simulated run can still be scored against the truth.

The simulator ends an episode on its own success too: then ``terminated`` stays true even if the
classifier disagrees (the reward is the classifier's, 0.0). A wrapper-ended episode leaves the
robot's own episode running; the next ``reset`` starts a fresh one.

Cost: one forward pass of a small network per step, about 1 ms for two 32 x 32 cameras and 2 ms for
two 64 x 64 cameras on one CPU thread (the actor runs torch with one thread; more threads on a busy
machine make a single small forward pass slower, not faster).

Proprioceptive checks guard against a classifier fooled by a look-alike view: a success also
needs, for example, the gripper closed on something (``"gripper_width[0] < 0.06"``) or the TCP
above the table (``"tcp_pose[2] > 0.05"``). Pass a :class:`ProprioCheck`, its text form, any
callable ``observation -> bool``, or a list of them (all must pass).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import gymnasium as gym
import numpy as np

CHECK_PATTERN = re.compile(r"^\s*([A-Za-z0-9_/]+)\s*(?:\[\s*(\d+)\s*\])?\s*(<|>)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class ProprioCheck:
    """``observation[field].flat[index] < below`` and/or ``> above`` (strict)."""

    field: str
    index: int = 0
    below: Optional[float] = None
    above: Optional[float] = None

    @classmethod
    def parse(cls, text: str) -> "ProprioCheck":
        """``"gripper_width[0] < 0.06"``, ``"tcp_pose[2] > 0.05"`` (index defaults to 0)."""
        match = CHECK_PATTERN.match(text)
        if not match:
            raise ValueError(f"proprioceptive check {text!r}: expected 'FIELD[INDEX] < VALUE' or 'FIELD[INDEX] > VALUE'")
        name, index, operator, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"proprioceptive check {text!r}: {value!r} is not a number") from None
        return cls(name, int(index or 0), below=number if operator == "<" else None,
                   above=number if operator == ">" else None)

    def validate(self, observation_space: gym.spaces.Dict) -> None:
        """Raise ``ValueError`` naming the field unless it exists and has element ``index``."""
        if self.below is None and self.above is None:
            raise ValueError(f"proprioceptive check on {self.field!r}: give below or above")
        spaces = getattr(observation_space, "spaces", {})
        if self.field not in spaces:
            raise ValueError(f"proprioceptive check: the observation has no field {self.field!r} "
                             f"(fields: {sorted(spaces)})")
        size = int(np.prod(spaces[self.field].shape))
        if not 0 <= self.index < size:
            raise ValueError(f"proprioceptive check: field {self.field!r} has {size} elements, index {self.index}")

    def __call__(self, observation: Mapping[str, np.ndarray]) -> bool:
        value = float(np.asarray(observation[self.field]).reshape(-1)[self.index])
        return (self.below is None or value < self.below) and (self.above is None or value > self.above)

    def __str__(self) -> str:
        parts = ([f"< {self.below:g}"] if self.below is not None else []) + (
            [f"> {self.above:g}"] if self.above is not None else [])
        return f"{self.field}[{self.index}] {' and '.join(parts)}"


CheckLike = Union[ProprioCheck, str, Callable[[Mapping[str, np.ndarray]], bool]]


def make_proprio_checks(checks: Union[None, CheckLike, Sequence[CheckLike]],
                        observation_space: gym.spaces.Dict) -> list[Callable[[Mapping[str, np.ndarray]], bool]]:
    """Normalise ``checks`` (None, one, or a list of checks / their text forms / callables) into a
    list of callables; text and :class:`ProprioCheck` entries are validated against the space."""
    if checks is None:
        return []
    if isinstance(checks, (str, ProprioCheck)) or callable(checks):
        checks = [checks]  # type: ignore[list-item]
    normalised = []
    for check in checks:  # type: ignore[union-attr]
        if isinstance(check, str):
            check = ProprioCheck.parse(check)
        if isinstance(check, ProprioCheck):
            check.validate(observation_space)
        elif not callable(check):
            raise TypeError(f"proprioceptive check {check!r} is neither a ProprioCheck, a string nor a callable")
        normalised.append(check)
    return normalised


class RewardClassifierWrapper(gym.Wrapper):
    """Reward = the classifier's success decision; the episode ends on success (see the module docstring).

    Args:
        env: a gymnasium env with ``images/<camera>`` observation fields.
        classifier: a classifier file (checked against ``env.observation_space``) or a loaded
            :class:`~learner.reward_classifier.RewardClassifier`.
        threshold: success when ``p >= threshold``; None: the threshold stored in the file.
        proprio_check: optional extra condition(s) on the observation (see the module docstring).
    """

    def __init__(self, env: gym.Env, classifier: Union[str, Path, Any], threshold: Optional[float] = None,
                 proprio_check: Union[None, CheckLike, Sequence[CheckLike]] = None) -> None:
        super().__init__(env)
        from learner.reward_classifier import RewardClassifier, load_reward_classifier

        if isinstance(classifier, RewardClassifier):
            classifier.check_observation_space(env.observation_space)
            self.classifier = classifier.eval()
        else:
            self.classifier = load_reward_classifier(classifier, env.observation_space)
        self.threshold = self.classifier.threshold if threshold is None else float(threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        self.checks = make_proprio_checks(proprio_check, env.observation_space)
        self.steps = 0
        self.total_latency_s = 0.0

    @property
    def mean_latency_ms(self) -> float:
        """Mean time per step spent in the classifier and checks (ms)."""
        return 1000.0 * self.total_latency_s / max(self.steps, 1)

    def classify(self, observation: Mapping[str, np.ndarray]) -> tuple[float, bool]:
        """``(p(success), success decision)`` of one observation."""
        probability = self.classifier.probability(observation)
        success = probability >= self.threshold and all(check(observation) for check in self.checks)
        return probability, bool(success)

    def step(self, action):
        observation, env_reward, terminated, truncated, info = self.env.step(action)
        started = time.perf_counter()
        probability, success = self.classify(observation)
        latency_s = time.perf_counter() - started
        self.steps += 1
        self.total_latency_s += latency_s
        info = dict(info)
        if "success" in info:
            info["env_success"] = info["success"]
        info["env_reward"] = float(env_reward)
        info["success"] = float(success)
        info["classifier_probability"] = probability
        info["classifier_success"] = float(success)
        info["classifier_latency_ms"] = 1000.0 * latency_s
        return observation, float(success), bool(terminated or success), bool(truncated and not success), info
