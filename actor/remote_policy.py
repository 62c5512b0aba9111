"""The actor's side of the policy server: ``RemotePolicy.act(observation) -> action`` over ZeroMQ.

With ``actor.policy_source: remote`` the acting loop asks a policy server (learner/policy_server.py,
``steerl policy-server``) for every action instead of running a policy itself. Each request has a
deadline (``actor.policy_server.timeout_ms``); the control loop never waits longer than that.

Holding. When no usable action arrives in time, :meth:`RemotePolicy.act` returns the *hold action*
instead, and the loop steps the robot with it. It is never the previous action, nor any action the
server computed for an older observation. The hold action is a zero-motion command: zero Cartesian
(and yaw) deltas and the gripper command the arm last executed (:class:`HoldAction`). This is what
the robot server itself treats as "stay where you are": it targets ``measured TCP + delta``
(robot_server/safety.py), so a zero delta holds the measured pose, while the gripper entry is
absolute, so repeating the last command keeps a grasp instead of dropping the object (at the start
of an episode it is "open", the state reset leaves the gripper in). A zero-motion *step* was chosen
over the protocol's ``HoldRequest`` and over not stepping (the watchdog hold) because the control
loop keeps its rhythm, the robot server's watchdog stays fed, operator events and the episode time
limit keep working, and every held step brings a fresh observation for the next request; the
emergency-stop latch is the operator's, and a server outage must not need an operator to release it.
Held steps are executed steps: they reach the learner like any other, with the hold action.

Each hold is counted by reason in :attr:`RemotePolicy.stats` (``holds``; :class:`HoldReason`) and
logged (the first of an outage at once, then a summary at most every ``HOLD_LOG_INTERVAL_S``); the
first answer after an outage is logged with the number of steps held. Reasons: ``timeout`` (sent,
no reply by the deadline), ``disconnected`` (no connection to the server by the deadline, nothing
sent), ``server_error`` (the server refused the request or the policy failed), ``incompatible`` (a
restarted server refused the handshake) and ``bad_reply`` (not finite float32 actions of the
expected shape).

Late replies. Requests carry increasing ids; a reply to an older request (it arrived after its
deadline) is discarded, never executed, and counted in ``stats.late_replies``.

Reconnecting. The socket reconnects by itself (ZeroMQ), queues requests only on a live connection
(nothing stale is delivered to a restarted server) and detects a vanished server by heartbeats. A
restarted server does not know the client and answers ``ERROR_NOT_CONTROLLER``; the client then
handshakes again and resends, within the same deadline.

Not thread-safe: one control loop uses one ``RemotePolicy``.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import zmq

from hardware_configs.schema import CurveClientKeys, PolicyClientConfig
from transport import steerl_pb2 as pb
from transport.codec import PROTOCOL_VERSION, ProtocolError, decode_tensor, encode_tensor, spaces_from_pb, spaces_to_pb
from transport.spaces import RobotSpaces
from transport.zmq_link import LinkTimeout, PeerUnavailable, RemoteError, RpcClient

log = logging.getLogger("steerl.actor")

# The gripper entry of the action: -1 open, +1 closed (hardware_configs.schema.ActionConfig).
GRIPPER_OPEN = -1.0
HOLD_LOG_INTERVAL_S = 5.0
# While waiting for a server at start-up, each handshake attempt waits this long.
CONNECT_ATTEMPT_MS = 1000
GOODBYE_TIMEOUT_MS = 100


class HoldReason(str, enum.Enum):
    """Why an action request yielded the hold action."""

    TIMEOUT = "timeout"
    DISCONNECTED = "disconnected"
    SERVER_ERROR = "server_error"
    INCOMPATIBLE = "incompatible"
    BAD_REPLY = "bad_reply"


class PolicyServerError(RuntimeError):
    """No usable actions from the policy server; ``reason`` says why."""

    reason: HoldReason = HoldReason.SERVER_ERROR


class PolicyServerUnavailable(PolicyServerError):
    """The server did not answer in time (``reason``: timeout or disconnected)."""

    def __init__(self, message: str, reason: HoldReason) -> None:
        super().__init__(message)
        self.reason = reason


class PolicyServerIncompatible(PolicyServerError):
    """The server refused the handshake; the message says what differs (fields, kind, version)."""

    reason = HoldReason.INCOMPATIBLE


class PolicyServerRefused(PolicyServerError):
    """The server answered a request with an error; ``code`` and ``field`` as it sent them."""

    reason = HoldReason.SERVER_ERROR

    def __init__(self, error: RemoteError) -> None:
        super().__init__(str(error))
        self.code = error.code
        self.field = error.field


class PolicyServerBadReply(PolicyServerError):
    """The reply did not hold finite float32 actions of the expected shape."""

    reason = HoldReason.BAD_REPLY


class HoldAction:
    """The zero-motion action for the robot's action layout ``[dx, dy, dz, (dyaw,) gripper]``:
    zero deltas, and the gripper command the arm last executed (see the module docstring)."""

    def __init__(self, action_dim: int) -> None:
        if action_dim < 2:
            raise ValueError(f"a robot action has at least a delta and the gripper; got dimension {action_dim}")
        self.action_dim = action_dim
        self._gripper = GRIPPER_OPEN

    @property
    def gripper(self) -> float:
        return self._gripper

    def begin_episode(self) -> None:
        """Reset opens the gripper."""
        self._gripper = GRIPPER_OPEN

    def note_executed(self, action: np.ndarray) -> None:
        """Remember the gripper command of the action the robot executed (policy's or operator's)."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape == (self.action_dim,) and np.isfinite(action[-1]):
            self._gripper = float(np.clip(action[-1], -1.0, 1.0))

    def __call__(self) -> np.ndarray:
        action = np.zeros(self.action_dim, dtype=np.float32)
        action[-1] = self._gripper
        return action


@dataclass
class RemotePolicyStats:
    """What the client counted (the progress line and the logs show it)."""

    requests: int = 0
    # Requests answered with actions that were used.
    answered: int = 0
    # Requests that yielded the hold action, by HoldReason value.
    holds: Counter = field(default_factory=Counter)
    handshakes: int = 0
    # Held steps since the last answer (0 while the server answers).
    consecutive_holds: int = 0
    last_reason: str = ""
    round_trip_ms: float | None = None
    # Of the last answer: the server's sample call time, the observations that call held, and the
    # policy that answered (a server may swap in newer weights, or be restarted with another policy).
    inference_ms: float | None = None
    batch_size: int = 0
    policy_name: str = ""
    policy_version: int = 0
    late_replies: int = 0

    @property
    def holding(self) -> bool:
        return self.consecutive_holds > 0


class RemotePolicy:
    """Actions from a policy server, with a deadline per request (see the module docstring).

    Args:
        address: the policy server's endpoint.
        spaces: the observation fields this actor can send and its action (the env's spaces,
            selected by ``learner.observation_keys``).
        timeout_ms: the deadline of every request of :meth:`act`.
        instruction: the language instruction sent with every request ("" for none).
        policy_kind: refuse a server that serves another kind ("" accepts any).
        curve: CURVE keys when the server binds beyond loopback.
        client_name: how the server's log names this client.
    """

    def __init__(self, address: str, spaces: RobotSpaces, *, timeout_ms: int = 150, instruction: str = "",
                 policy_kind: str = "", curve: CurveClientKeys | None = None, client_name: str = "",
                 max_message_bytes: int = 64 * 1024 * 1024, context: zmq.Context | None = None) -> None:
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        self.address = address
        self.spaces = spaces
        self.timeout_ms = timeout_ms
        self.instruction = instruction
        self.policy_kind = policy_kind
        self.client_name = client_name or f"actor-{os.getpid()}"
        self.stats = RemotePolicyStats()
        self.hold_action = HoldAction(int(np.prod(spaces.action.shape)))
        self._client = RpcClient(address, max_message_bytes=max_message_bytes, curve=curve, context=context,
                                 immediate=True)
        self._server: pb.PolicyHandshakeReply | None = None
        self._fields: tuple[str, ...] = ()
        self._last_hold_log_s = -float("inf")

    @classmethod
    def from_config(cls, config: PolicyClientConfig, spaces: RobotSpaces, client_name: str = "") -> "RemotePolicy":
        """A client for ``actor.policy_server`` (not connected yet: see :meth:`connect`)."""
        return cls(config.address, spaces, timeout_ms=config.timeout_ms, instruction=config.instruction,
                   policy_kind=config.policy_kind, curve=config.curve, client_name=client_name,
                   max_message_bytes=config.max_message_bytes)

    # -- what the server serves ---------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether the handshake with the current server is done."""
        return self._server is not None

    @property
    def server(self) -> pb.PolicyHandshakeReply | None:
        """The last handshake reply: session, policy kind, name and version, served fields."""
        return self._server

    # -- connecting ---------------------------------------------------------------------------
    def connect(self, timeout_s: float) -> pb.PolicyHandshakeReply:
        """Handshake, retrying until ``timeout_s`` passes (a server may still be loading its policy).
        Raises PolicyServerIncompatible at once when refused, PolicyServerUnavailable at the end."""
        deadline = time.monotonic() + timeout_s
        last_error: PolicyServerUnavailable | None = None
        while time.monotonic() < deadline:
            attempt = min(deadline, time.monotonic() + CONNECT_ATTEMPT_MS / 1000.0)
            try:
                return self._handshake(attempt)
            except PolicyServerUnavailable as error:
                last_error = error
                time.sleep(max(0.0, min(0.05, attempt - time.monotonic())))
        raise PolicyServerUnavailable(f"no policy server answered at {self.address} within {timeout_s:g} s"
                                      + (f" ({last_error})" if last_error else ""),
                                      last_error.reason if last_error else HoldReason.TIMEOUT)

    def _handshake(self, deadline: float) -> pb.PolicyHandshakeReply:
        envelope = pb.Envelope()
        handshake = envelope.policy_handshake
        handshake.protocol_version = PROTOCOL_VERSION
        handshake.client_name = self.client_name
        handshake.spaces.CopyFrom(spaces_to_pb(self.spaces))
        handshake.spaces_hash = self.spaces.digest()
        handshake.policy_kind = self.policy_kind
        reply = self._call(envelope, deadline, "policy_handshake_reply").policy_handshake_reply
        try:
            served = spaces_from_pb(reply.spaces)
        except ProtocolError as error:
            raise PolicyServerBadReply(
                f"policy server {self.address}: unreadable spaces in its handshake: {error}") from None
        # The server checked the fit; a server that still asks for fields this actor lacks is refused here.
        differences = self.spaces.differences(served, "this actor", "the policy server", extra_fields_differ=False)
        if differences:
            raise PolicyServerIncompatible(f"policy server {self.address}: " + "; ".join(differences))
        self._server = reply
        self._fields = tuple(sorted(served.observation))
        self.stats.handshakes += 1
        log.info("policy server %s at %s: %s (%s) v%d, fields %s", reply.session_id, self.address, reply.policy_name,
                 reply.policy_kind, reply.policy_version, ", ".join(self._fields))
        return reply

    # -- acting -------------------------------------------------------------------------------
    def act(self, observation: Mapping[str, np.ndarray], deterministic: bool = False) -> np.ndarray:
        """One observation -> one float32 action ``[A]`` from the server, or the hold action when
        none arrives by the deadline (see the module docstring). Raises only for a local mistake:
        an observation that lacks a field the server takes (KeyError)."""
        deadline = time.monotonic() + self.timeout_ms / 1000.0
        try:
            actions = self._request(observation, 1, deterministic, batched=False, deadline=deadline)
        except PolicyServerError as error:
            return self._hold(error)
        if self.stats.consecutive_holds:
            log.info("policy server %s answering again after %d held steps", self.address, self.stats.consecutive_holds)
            self.stats.consecutive_holds = 0
        self.stats.answered += 1
        return actions[0]

    def sample(self, observations: Mapping[str, np.ndarray], num_samples: int, deterministic: bool = False,
               timeout_ms: int | None = None) -> np.ndarray:
        """A batch of observations (leading dimension ``B``) -> float32 ``[B, K, A]``. Unlike
        :meth:`act` it never holds: a failure raises a :class:`PolicyServerError`."""
        deadline = time.monotonic() + (timeout_ms or self.timeout_ms) / 1000.0
        return self._request(observations, num_samples, deterministic, batched=True, deadline=deadline)

    def begin_episode(self) -> None:
        """The robot was reset (the hold action's gripper is open again)."""
        self.hold_action.begin_episode()

    def note_executed(self, action: np.ndarray) -> None:
        """The action the robot executed this step (the hold action keeps its gripper command)."""
        self.hold_action.note_executed(action)

    def _request(self, observation: Mapping[str, np.ndarray], num_samples: int, deterministic: bool, batched: bool,
                 deadline: float) -> np.ndarray:
        if self._server is None:
            self._handshake(deadline)
        envelope = pb.Envelope()
        request = envelope.action_request
        missing = [name for name in self._fields if name not in observation]
        if missing:
            raise KeyError(f"the observation lacks fields the policy server takes: {missing} "
                           f"(it has: {', '.join(sorted(observation))})")
        rows = None
        for name in self._fields:
            array = np.asarray(observation[name])
            encode_tensor(array, request.observation.fields[name])
            rows = array.shape[0] if batched and array.ndim else rows
        request.batched = batched
        request.instruction = self.instruction
        request.num_samples = num_samples
        request.deterministic = deterministic
        request.timeout_ms = self.timeout_ms
        self.stats.requests += 1
        started = time.monotonic()
        try:
            reply = self._call(envelope, deadline, "action_reply")
        except PolicyServerRefused as error:
            if error.code != pb.ERROR_NOT_CONTROLLER:
                raise
            # A restarted server does not know this client: handshake again and resend.
            log.info("policy server %s does not know this client (restarted?): handshaking again", self.address)
            self._server = None
            self._handshake(deadline)
            reply = self._call(envelope, deadline, "action_reply")
        self.stats.round_trip_ms = (time.monotonic() - started) * 1000.0
        answer = reply.action_reply
        self.stats.inference_ms, self.stats.batch_size = answer.inference_ms, answer.batch_size
        self.stats.policy_name, self.stats.policy_version = answer.policy_name, answer.policy_version
        expected = (num_samples, *self.spaces.action.shape)
        return self._checked_actions(answer, expected if rows is None else (rows, *expected))

    @staticmethod
    def _checked_actions(answer: pb.ActionReply, expected: tuple[int, ...]) -> np.ndarray:
        try:
            actions = decode_tensor(answer.actions, "action_reply.actions")
        except ProtocolError as error:
            raise PolicyServerBadReply(str(error)) from None
        if actions.dtype != np.float32 or actions.shape != expected:
            raise PolicyServerBadReply(
                f"action_reply.actions: {actions.dtype}{actions.shape}, expected float32{expected}")
        if not np.isfinite(actions).all():
            raise PolicyServerBadReply("action_reply.actions: non-finite values")
        return actions.copy()

    def _call(self, envelope: pb.Envelope, deadline: float, expected: str) -> pb.Envelope:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            raise PolicyServerUnavailable("the deadline passed before the request could be sent", HoldReason.TIMEOUT)
        try:
            reply = self._client.call(envelope, remaining_ms)
        except PeerUnavailable as error:
            raise PolicyServerUnavailable(str(error), HoldReason.DISCONNECTED) from None
        except LinkTimeout as error:
            raise PolicyServerUnavailable(str(error), HoldReason.TIMEOUT) from None
        except RemoteError as error:
            if error.code in (pb.ERROR_INCOMPATIBLE, pb.ERROR_PROTOCOL_VERSION):
                self._server = None
                raise PolicyServerIncompatible(
                    f"policy server {self.address} refused this actor: {error.detail}") from None
            raise PolicyServerRefused(error) from None
        finally:
            self.stats.late_replies = self._client.stale_replies
        if reply.WhichOneof("body") != expected:
            raise PolicyServerBadReply(f"expected {expected}, got {reply.WhichOneof('body')}")
        return reply

    def _hold(self, error: PolicyServerError) -> np.ndarray:
        """Count and log why, and return the hold action."""
        stats = self.stats
        stats.holds[error.reason.value] += 1
        stats.consecutive_holds += 1
        stats.last_reason = error.reason.value
        now = time.monotonic()
        level = logging.ERROR if error.reason is HoldReason.INCOMPATIBLE else logging.WARNING
        if stats.consecutive_holds == 1:
            self._last_hold_log_s = now
            log.log(level, "policy server %s: %s (%s); holding the arm until it answers", self.address,
                    error.reason.value, error)
        elif now - self._last_hold_log_s >= HOLD_LOG_INTERVAL_S:
            self._last_hold_log_s = now
            log.log(level, "policy server %s: %d steps held so far (last: %s, %s); counts: %s", self.address,
                    stats.consecutive_holds, error.reason.value, error, dict(stats.holds))
        return self.hold_action()

    def close(self) -> None:
        """Say goodbye (briefly; the server forgets silent clients anyway) and close the socket."""
        if self._server is not None:
            envelope = pb.Envelope()
            envelope.goodbye.SetInParent()
            try:
                self._client.call(envelope, GOODBYE_TIMEOUT_MS)
            except (LinkTimeout, RemoteError):
                pass
            self._server = None
        self._client.close()


def connect_remote_policy(config: PolicyClientConfig, spaces: RobotSpaces, client_name: str = "") -> RemotePolicy:
    """A :class:`RemotePolicy` for ``actor.policy_server``, handshaken: waits up to
    ``connect_timeout_ms`` for the server; raises PolicyServerIncompatible / PolicyServerUnavailable."""
    policy = RemotePolicy.from_config(config, spaces, client_name)
    try:
        policy.connect(config.connect_timeout_ms / 1000.0)
    except PolicyServerError:
        policy.close()
        raise
    return policy
