"""Human intervention as a gymnasium wrapper: a teleop device may override the policy's action.

``InterventionWrapper(env, device)``: on every ``step(policy_action)`` it hands the device the
observation the policy acted on and the policy's action (:meth:`TeleopDevice.observe`), reads the
device without blocking, and executes

- the device's action if the operator is active (entries the device leaves NaN, such as an untouched
  gripper, keep the policy's value), clipped to the action space;
- the policy's action otherwise, and whenever the device is faulted or disconnected.

``info`` gains ``intervened`` (1.0 / 0.0), ``executed_action`` (float32, what the robot got: store
this as the transition's action), ``operator_events`` (names of the :class:`OperatorEvent` s of this
step, e.g. ``("MARK_SUCCESS",)``; ``OperatorEvent[name]`` gives the member back) and, while the
device is faulted, ``teleop_fault``. The last step of an episode also carries ``intervention_rate``
(intervened steps / steps). The wrapper only reports events; acting on them (ending an episode on
MARK_SUCCESS, pausing, stopping) is the acting loop's job.

``overrides_enabled = False`` (evaluation episodes: they measure the policy alone) keeps reading
the device, so its events still arrive, but never executes its action.
"""

from __future__ import annotations

import logging
from typing import Any

import gymnasium as gym
import numpy as np

from actor.teleop import TeleopDevice, TeleopReading

log = logging.getLogger("steerl.teleop")


class InterventionWrapper(gym.Wrapper):
    """See the module docstring. Starts ``device`` if it is not started; ``close()`` closes both."""

    def __init__(self, env: gym.Env, device: TeleopDevice) -> None:
        super().__init__(env)
        if not isinstance(env.action_space, gym.spaces.Box):
            raise ValueError(f"InterventionWrapper needs a Box action space, got {env.action_space}")
        if env.action_space.shape != (device.action_dim,):
            raise ValueError(f"teleop device {device.name!r} makes {device.action_dim}-dim actions but the env's "
                             f"action space is {env.action_space.shape}")
        self.device = device
        if not device.started:
            device.start()
        self._low = env.action_space.low.astype(np.float32)
        self._high = env.action_space.high.astype(np.float32)
        self._observation: Any = None
        self._device_error_logged = False
        self.overrides_enabled = True
        self.episode_steps = 0
        self.episode_interventions = 0
        self.total_steps = 0
        self.total_interventions = 0

    @property
    def episode_intervention_rate(self) -> float:
        """Share of this episode's steps (so far) the operator controlled."""
        return self.episode_interventions / self.episode_steps if self.episode_steps else 0.0

    @property
    def total_intervention_rate(self) -> float:
        """Share of all steps through this wrapper the operator controlled."""
        return self.total_interventions / self.total_steps if self.total_steps else 0.0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        observation, info = self.env.reset(seed=seed, options=options)
        self._observation = observation
        self.episode_steps = 0
        self.episode_interventions = 0
        self._guarded(self.device.on_episode_start)
        return observation, info

    def _guarded(self, call, *args) -> Any:
        """A device call that must not take the control loop down: an exception is a fault."""
        try:
            return call(*args)
        except Exception as error:  # noqa: BLE001 - a broken device must never stop the robot's loop
            if not self._device_error_logged:
                log.error("teleop device %s raised %s: %s; the policy keeps acting", self.device.name,
                          type(error).__name__, error)
                self._device_error_logged = True
            return error

    def _read(self, policy_action: np.ndarray) -> TeleopReading:
        if self._observation is not None:
            self._guarded(self.device.observe, self._observation, policy_action)
        reading = self._guarded(self.device.read)
        if isinstance(reading, Exception):
            return TeleopReading(np.full_like(policy_action, np.nan), False, (), False,
                                 f"{type(reading).__name__}: {reading}")
        return reading

    def step(self, action):
        policy_action = np.asarray(action, dtype=np.float32).reshape(self._low.shape)
        reading = self._read(policy_action)
        intervened = bool(self.overrides_enabled and reading.active and reading.connected and reading.fault is None)
        if intervened:
            operator = np.asarray(reading.action, dtype=np.float32)
            executed = np.where(np.isfinite(operator), operator, policy_action)
            executed = np.clip(executed, self._low, self._high).astype(np.float32)
        else:
            executed = policy_action.copy()
        observation, reward, terminated, truncated, info = self.env.step(executed)
        self._observation = observation
        self.episode_steps += 1
        self.total_steps += 1
        self.episode_interventions += intervened
        self.total_interventions += intervened
        info = dict(info)
        info["intervened"] = 1.0 if intervened else 0.0
        info["executed_action"] = executed
        info["operator_events"] = tuple(event.name for event in reading.events)
        if reading.fault is not None:
            info["teleop_fault"] = reading.fault
        if terminated or truncated:
            info["intervention_rate"] = self.episode_intervention_rate
        return observation, reward, terminated, truncated, info

    def close(self) -> None:
        try:
            self.device.close()
        finally:
            super().close()


def find_intervention_wrapper(env: gym.Env) -> InterventionWrapper | None:
    """The first :class:`InterventionWrapper` in ``env``'s wrapper chain (None if there is none)."""
    layer: Any = env
    while layer is not None:
        if isinstance(layer, InterventionWrapper):
            return layer
        layer = getattr(layer, "env", None)
    return None
