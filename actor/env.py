"""The actor's view of the robot: a gymnasium environment backed by a robot link.

``make_env(config)`` returns a :class:`RobotEnv` whose link is either

- :class:`ZmqRobotLink`: the robot server process over ZeroMQ (``env.connection: zmq``), the way a
  real robot is always driven; or
- :class:`InprocRobotLink`: a :class:`~robot_server.cell.RobotCell` in this process
  (``env.connection: inproc``), with the very same safety, clock and episode logic.

Observations are a ``Dict`` of Box fields (``tcp_pose``, ``tcp_velocity``, ``gripper_width``,
``images/<camera>``, simulator-only ``task/...``); actions are ``Box(-1, 1, (4,))`` or ``(5,)``
with yaw. ``info`` carries the server's per-step report (``success``, ``watchdog_tripped``,
``safety/clipped_box``, ``emergency_stopped``...).

Emergency stop: :meth:`RobotEnv.emergency_stop` makes the robot hold the arm and refuse motion
until :meth:`RobotEnv.release_emergency_stop`; a ``reset``/``step`` refused for that reason (by
whichever client stopped the robot) raises :class:`RobotEmergencyStopped`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from hardware_configs.schema import SessionConfig
from transport import steerl_pb2 as pb
from transport.codec import PROTOCOL_VERSION, decode_observation, encode_tensor, spaces_from_pb
from transport.spaces import RobotSpaces
from transport.zmq_link import LinkTimeout, RemoteError, RpcClient

log = logging.getLogger("steerl.actor")


class RobotLinkError(RuntimeError):
    """The robot could not be reached or refused a request."""


class RobotEmergencyStopped(RobotLinkError):
    """The robot refused a motion request because it is emergency-stopped (nothing moved)."""


@dataclass
class StepOutcome:
    observation: dict[str, np.ndarray]
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, float]


class RobotLink(Protocol):
    """What the env needs from a robot: spaces, reset, step, close."""

    spaces: RobotSpaces

    def reset(self, seed: int | None) -> tuple[dict[str, np.ndarray], dict[str, float]]: ...

    def step(self, action: np.ndarray) -> StepOutcome: ...

    def close(self) -> None: ...


class InprocRobotLink:
    """A robot cell running inside this process."""

    def __init__(self, config: SessionConfig) -> None:
        from robot_server.cell import RobotCell  # the robot server's own logic, in-process

        self.cell = RobotCell(config)
        self.spaces = self.cell.spaces

    def reset(self, seed: int | None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        from robot_server.cell import EmergencyStopped

        try:
            observation, info, _ = self.cell.reset(seed)
        except EmergencyStopped as error:
            raise RobotEmergencyStopped(f"reset refused by the robot cell: {error}") from None
        return observation, info

    def step(self, action: np.ndarray) -> StepOutcome:
        from robot_server.cell import EmergencyStopped, EpisodeNotStarted
        from robot_server.backends import ArmFault
        from robot_server.safety import UnsafeAction

        try:
            result = self.cell.step(action)
        except EmergencyStopped as error:
            raise RobotEmergencyStopped(f"step refused by the robot cell: {error}") from None
        except (UnsafeAction, EpisodeNotStarted, ArmFault) as error:
            raise RobotLinkError(f"step refused by the robot cell: {error}") from None
        return StepOutcome(result.observation, result.reward, result.terminated, result.truncated, result.info)

    def emergency_stop(self, reason: str = "") -> dict[str, float]:
        """Hold the arm and refuse motion until released; returns the cell's status info."""
        return self.cell.emergency_stop(reason)

    def release_emergency_stop(self) -> dict[str, float]:
        """Allow motion again; returns the cell's status info."""
        return self.cell.release_emergency_stop()

    def close(self) -> None:
        self.cell.close()


class ZmqRobotLink:
    """A robot server over ZeroMQ, with the handshake done on construction."""

    def __init__(self, config: SessionConfig, client_name: str | None = None,
                 role: int = pb.ROLE_CONTROLLER, expected_spaces_hash: str = "") -> None:
        from robot_server.cell import config_section_hashes

        self._timeout_ms = config.env.timeout_ms
        self._client = RpcClient(config.env.address, curve=config.env.curve)
        handshake = pb.Envelope(protocol_version=PROTOCOL_VERSION)
        handshake.handshake.protocol_version = PROTOCOL_VERSION
        handshake.handshake.client_name = client_name or f"actor-{os.getpid()}"
        handshake.handshake.role = role
        handshake.handshake.spaces_hash = expected_spaces_hash
        handshake.handshake.config_hashes.update(config_section_hashes(config))
        self._handshake = handshake
        reply = self._call(handshake, "handshake").handshake_reply
        self.session_id = reply.session_id
        self.spaces = spaces_from_pb(reply.spaces)
        self.server_config_name = reply.config_name
        # Joining again later must find the very same spaces (a restarted server with other fields is refused).
        handshake.handshake.spaces_hash = self.spaces.digest()
        log.info("connected to robot server %s (%s, %s backend)", reply.session_id, reply.config_name,
                 reply.backend)

    def _call(self, envelope: pb.Envelope, what: str, rejoin: bool = False) -> pb.Envelope:
        """One request; with ``rejoin``, a controller that the server no longer knows (it stayed
        silent past the server's client expiry, e.g. while the actor waited for its learner, or the
        server restarted) handshakes again and repeats the request once."""
        try:
            return self._client.call(envelope, self._timeout_ms)
        except LinkTimeout as error:
            self._client.reconnect()
            raise RobotLinkError(f"{what}: {error}") from None
        except RemoteError as error:
            if (rejoin and error.code == pb.ERROR_NOT_CONTROLLER
                    and self._handshake.handshake.role == pb.ROLE_CONTROLLER):
                log.warning("%s refused (%s): handshaking with the robot server again", what, error)
                reply = self._call(self._handshake, "handshake").handshake_reply
                log.info("rejoined robot server %s as controller", reply.session_id)
                self.session_id = reply.session_id
                return self._call(envelope, what)
            if error.code == pb.ERROR_EMERGENCY_STOPPED:
                raise RobotEmergencyStopped(f"{what} refused by the robot server: {error}") from None
            raise RobotLinkError(f"{what} refused by the robot server: {error}") from None

    def reset(self, seed: int | None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        request = pb.Envelope()
        request.reset.has_seed = seed is not None
        request.reset.seed = seed or 0
        # Only a reset rejoins: it starts a new episode anyway, where a repeated step would act on
        # an episode the server has already ended.
        reply = self._call(request, "reset", rejoin=True).reset_reply
        return decode_observation(reply.observation), dict(reply.info)

    def step(self, action: np.ndarray) -> StepOutcome:
        request = pb.Envelope()
        encode_tensor(np.asarray(action, dtype=np.float32), request.step.action)
        reply = self._call(request, "step").step_reply
        return StepOutcome(decode_observation(reply.observation), reply.reward, reply.terminated,
                           reply.truncated, dict(reply.info))

    def observe(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        request = pb.Envelope()
        request.observe.SetInParent()
        reply = self._call(request, "observe").observe_reply
        return decode_observation(reply.observation), dict(reply.info)

    def emergency_stop(self, reason: str = "") -> dict[str, float]:
        """Send a ``HoldRequest``: the server holds the arm and refuses motion until released.
        Returns the server's status info (``emergency_stopped`` = 1)."""
        request = pb.Envelope()
        request.hold.reason = reason
        return dict(self._call(request, "hold").hold_reply.info)

    def release_emergency_stop(self) -> dict[str, float]:
        """Send a ``ReleaseRequest`` (controller only); returns the server's status info."""
        request = pb.Envelope()
        request.release.SetInParent()
        return dict(self._call(request, "release").release_reply.info)

    def close(self) -> None:
        try:
            request = pb.Envelope()
            request.goodbye.SetInParent()
            self._client.call(request, min(self._timeout_ms, 500))
        except (LinkTimeout, RemoteError):
            pass
        self._client.close()


class RobotEnv(gym.Env):
    """A gymnasium env over a :class:`RobotLink`; see the module docstring."""

    metadata = {"render_modes": []}

    def __init__(self, link: RobotLink) -> None:
        self.link = link
        self.observation_space = link.spaces.observation_space()
        self.action_space = link.spaces.action_space()
        self._keys = list(self.observation_space.spaces)

    def _ordered(self, observation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self._keys) - set(observation)
        if missing:
            raise RobotLinkError(f"observation is missing fields {sorted(missing)}")
        return {key: observation[key] for key in self._keys}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        observation, info = self.link.reset(seed)
        return self._ordered(observation), info

    def step(self, action):
        outcome = self.link.step(np.asarray(action, dtype=np.float32))
        return (self._ordered(outcome.observation), outcome.reward, outcome.terminated,
                outcome.truncated, outcome.info)

    @property
    def supports_emergency_stop(self) -> bool:
        """Whether the link can latch an emergency stop on the robot side."""
        return hasattr(self.link, "emergency_stop") and hasattr(self.link, "release_emergency_stop")

    def emergency_stop(self, reason: str = "") -> dict[str, float]:
        """Hold the arm now and make the robot refuse motion until :meth:`release_emergency_stop`."""
        if not self.supports_emergency_stop:
            raise RobotLinkError(f"{type(self.link).__name__} has no emergency stop")
        return self.link.emergency_stop(reason)

    def release_emergency_stop(self) -> dict[str, float]:
        """Clear the robot's emergency stop (nothing moves until the next reset or step)."""
        if not self.supports_emergency_stop:
            raise RobotLinkError(f"{type(self.link).__name__} has no emergency stop")
        return self.link.release_emergency_stop()

    def close(self) -> None:
        self.link.close()


def make_env(config: SessionConfig, client_name: str | None = None) -> RobotEnv:
    """The robot of ``config`` as a gymnasium env (over ZeroMQ or in-process, per ``env.connection``)."""
    if config.env.connection == "inproc":
        return RobotEnv(InprocRobotLink(config))
    return RobotEnv(ZmqRobotLink(config, client_name=client_name))


class DictBoxObservation(gym.ObservationWrapper):
    """Presents a Box (or Dict-of-Box) observation as a Dict of float32 Box fields (``state`` for a
    plain Box), the shape of observation steerl's learner consumes."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        source = env.observation_space
        boxes = source.spaces if isinstance(source, gym.spaces.Dict) else {"state": source}
        for name, box in boxes.items():
            if not isinstance(box, gym.spaces.Box):
                raise ValueError(f"observation field {name!r} is {type(box).__name__}; only Box fields are supported")
        self._plain = not isinstance(source, gym.spaces.Dict)
        self.observation_space = gym.spaces.Dict({
            name: box if box.dtype == np.uint8 else gym.spaces.Box(
                np.maximum(box.low, np.finfo(np.float32).min).astype(np.float32),
                np.minimum(box.high, np.finfo(np.float32).max).astype(np.float32), box.shape, np.float32)
            for name, box in boxes.items()
        })

    def observation(self, observation):
        fields = {"state": observation} if self._plain else observation
        return {name: np.asarray(value, dtype=self.observation_space[name].dtype) for name, value in fields.items()}


def make_gym_env(env_id: str, max_episode_steps: int | None = None) -> gym.Env:
    """Any registered gymnasium env (``Id-v0`` or ``module:Id-v0``) with a Box action space, its
    actions rescaled to [-1, 1] and its observation presented as a Dict of float32 Box fields."""
    env = gym.make(env_id, max_episode_steps=max_episode_steps)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise ValueError(f"{env_id}: action space {env.action_space} is not a Box")
    shape = env.action_space.shape
    env = gym.wrappers.RescaleAction(env, np.full(shape, -1.0, np.float32), np.full(shape, 1.0, np.float32))
    return DictBoxObservation(env)
