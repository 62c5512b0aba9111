"""The policy server: actions for actors whose policy needs a GPU (OpenVLA, diffusion, V-GPS), over ZeroMQ.

One ROUTER socket serves every actor (transport/steerl.proto, "actor <-> policy server"):

- ``PolicyHandshake`` -> ``PolicyHandshakeReply``: the client announces its observation fields and
  action (with their digest) and, optionally, the policy kind it expects. The server compares them
  with the policy's spaces (a ``RobotSpaces`` the policy declares as ``spaces``, or given to the
  server; without either, the first client's spaces become the server's) and refuses a mismatch
  with ``ERROR_INCOMPATIBLE``, naming every field that differs or both kinds. The reply names the
  fields each request must carry, the policy's kind, name and version, and the request limits.
- ``ActionRequest`` -> ``ActionReply`` (or ``Error``): one observation (reply ``[K, A]``) or a
  batch of them (reply ``[B, K, A]``), an optional instruction, ``K`` and the deterministic flag.
  Every field is checked (present, known, dtype, shape, finite, batch size, ``K``); a bad request is
  answered with ``ERROR_INVALID_ARGUMENT`` naming the field (``action_request.observation.fields[tcp_pose]``)
  and never reaches the policy.
- ``Goodbye`` -> ``GoodbyeReply``: the client is forgotten.

Micro-batching. When a request arrives, the server keeps reading for up to ``batch_wait_ms`` (the
wait ends early once every client that sent a request within the last ``ACTIVE_WINDOW_S`` has one
pending, so a single actor never waits), then samples each group of requests that share ``K``,
the deterministic flag and whether they carry an instruction in one ``policy.sample`` call of at
most ``max_batch_size`` observations, and replies to each request with its rows. If a batched call
fails, each request of it is retried alone, so one request cannot fail another client's. A client
keeps one request in flight: a newer request of a client supersedes its older one still pending
(the client gave up on it), so a backlog after a stall costs one sample, not one per stale request.

Never crashing: unparsable, oversized or unexpected messages and policy failures get an ``Error``
reply and a log line; the loop goes on. The policy's output is checked too (shape ``[B, K, A]``,
finite): a policy that returns NaN gets ``ERROR_INTERNAL`` sent, never the NaN. Binding beyond
loopback needs CURVE keys (``PolicyServerConfig.validate``), as for the robot server.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zmq

from hardware_configs.schema import PolicyServerConfig
from policies.base import Policy, load_policy
from transport import steerl_pb2 as pb
from transport.codec import (
    PROTOCOL_VERSION,
    ProtocolError,
    decode_tensor,
    encode_tensor,
    error_envelope,
    spaces_from_pb,
    spaces_to_pb,
)
from transport.spaces import RobotSpaces
from transport.zmq_link import answer_request, bind_server

log = logging.getLogger("steerl.policy_server")

IDLE_POLL_MS = 50
# Clients not heard from for this long are forgotten (they must handshake again).
CLIENT_EXPIRY_S = 300.0
# A client that sent a request this recently is expected to send another: the batching wait ends
# once every such client has a request pending.
ACTIVE_WINDOW_S = 1.0
MAX_INSTRUCTION_CHARS = 2048
# At most one "replies are late" warning per this many seconds.
LATE_WARNING_INTERVAL_S = 10.0
REQUEST_TYPES = ("policy_handshake", "action_request", "goodbye")


@dataclass
class PolicyServerStats:
    """Counters of a policy server (read them from any thread)."""

    requests: int = 0
    replies: int = 0
    sample_calls: int = 0
    sampled_observations: int = 0
    # Pending requests dropped because the same client sent a newer one.
    superseded: int = 0
    # Replies sent after the client's stated timeout (it held the arm instead of using them).
    late_replies: int = 0
    # Error replies by code name (ERROR_INVALID_ARGUMENT...).
    errors: Counter = field(default_factory=Counter)
    last_batch_size: int = 0
    last_inference_ms: float = 0.0


@dataclass(frozen=True)
class _Served:
    """The policy served, with its name and version (swapped as one by :meth:`PolicyServer.set_policy`)."""

    policy: Policy
    name: str
    version: int


@dataclass
class _Client:
    name: str
    last_seen_s: float
    last_request_s: float = -math.inf


@dataclass
class _Request:
    """A validated action request waiting for its sample call."""

    identity: bytes
    request_id: int
    # Every field with a leading batch dimension (1 for an unbatched request).
    observation: dict[str, np.ndarray]
    rows: int
    batched: bool
    instruction: str
    num_samples: int
    deterministic: bool
    timeout_ms: int
    received_s: float

    @property
    def group(self) -> tuple[int, bool, bool]:
        """Requests of one group can share a sample call."""
        return self.num_samples, self.deterministic, bool(self.instruction)


class PolicyServer:
    """Serves one :class:`~policies.base.Policy` over ZeroMQ (see the module docstring).

    Args:
        policy: the policy to serve (already on its device).
        config: address, CURVE keys, batching and request limits.
        name: reported to clients (default: the policy's kind).
        spaces: the observation fields and action the policy takes; default: the policy's own
            ``spaces`` attribute when it is a ``RobotSpaces``, else the first client's.
        instruction_key: the observation key under which a request's instruction reaches
            ``policy.sample`` (a list of ``B`` strings), as the policy expects it.
    """

    def __init__(self, policy: Policy, config: PolicyServerConfig | None = None, *, name: str = "",
                 spaces: RobotSpaces | None = None, instruction_key: str = "instruction",
                 context: zmq.Context | None = None) -> None:
        self.config = config or PolicyServerConfig()
        self.config.validate()
        self._served = _Served(policy, name or policy.kind or type(policy).__name__, 1)
        declared = getattr(policy, "spaces", None)
        self._spaces: RobotSpaces | None = spaces or (declared if isinstance(declared, RobotSpaces) else None)
        self.instruction_key = instruction_key
        self.session_id = uuid.uuid4().hex[:12]
        self.stats = PolicyServerStats()
        self._clients: dict[bytes, _Client] = {}
        self._stop = threading.Event()
        self._batch_wait_s = self.config.batch_wait_ms / 1000.0
        self._last_late_warning_s = -math.inf
        self._socket, self._authenticator = bind_server(context or zmq.Context.instance(), self.config.address,
                                                        self.config.max_message_bytes, self.config.curve)
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    @classmethod
    def from_directory(cls, directory: str | Path, config: PolicyServerConfig | None = None,
                       device: torch.device | str = "cpu", name: str = "", **kwargs) -> "PolicyServer":
        """Load any registered policy kind from ``directory`` (:func:`policies.base.load_policy`)
        onto ``device`` and serve it, named after the directory unless ``name`` is given; ``kwargs``
        as for the constructor."""
        policy = load_policy(directory, device)
        return cls(policy, config, name=name or Path(directory).resolve().name, **kwargs)

    # -- the policy ---------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._served.policy

    @property
    def policy_name(self) -> str:
        return self._served.name

    @property
    def policy_version(self) -> int:
        return self._served.version

    @property
    def spaces(self) -> RobotSpaces | None:
        """The observation fields and action served (None until a policy or client defines them)."""
        return self._spaces

    def set_policy(self, policy: Policy, name: str = "") -> int:
        """Serve ``policy`` from the next sample call on (e.g. newer weights); returns the new
        version. It must be of the same kind and, if it declares spaces, take the served spaces.
        Safe to call from another thread: a sample call uses one policy, name and version."""
        served = self._served
        if policy.kind != served.policy.kind:
            raise ValueError(f"set_policy: kind {policy.kind!r} differs from the served kind {served.policy.kind!r}; "
                             "clients were admitted for that kind (start another server)")
        declared = getattr(policy, "spaces", None)
        if isinstance(declared, RobotSpaces) and self._spaces is not None:
            differences = declared.differences(self._spaces, "the new policy", "the served policy")
            if differences:
                raise ValueError("set_policy: " + "; ".join(differences))
        self._served = _Served(policy, name or served.name, served.version + 1)
        log.info("now serving %s v%d", self._served.name, self._served.version)
        return self._served.version

    # -- lifecycle ----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """Stop cleanly on SIGINT/SIGTERM (main thread only)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.stop())

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        """Serve until :meth:`stop`; then close the socket."""
        log.info("policy server %s serving %s (%s) on %s on %s", self.session_id, self.policy_name,
                 self.policy.kind, self.policy.device, self.address)
        try:
            while not self._stop.is_set():
                self.serve_once(IDLE_POLL_MS)
        finally:
            self.close()

    def close(self) -> None:
        if self._socket.closed:
            return
        self._socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        log.info("policy server %s stopped", self.session_id)

    # -- one round: read, batch, sample, reply ------------------------------------------------
    def serve_once(self, timeout_ms: int = 0) -> int:
        """Wait up to ``timeout_ms`` for a message, gather what arrives within the batching wait,
        serve it all; returns the number of messages read."""
        if not self._socket.poll(timeout_ms, zmq.POLLIN):
            self._expire_clients()
            return 0
        pending: dict[bytes, _Request] = {}
        read = 0
        deadline = time.monotonic() + self._batch_wait_s
        while True:
            while self._pending_rows(pending) < self.config.max_batch_size and self._socket.poll(0, zmq.POLLIN):
                self._receive(pending)
                read += 1
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or self._batch_complete(pending):
                break
            if not self._socket.poll(max(1, math.ceil(remaining_s * 1000)), zmq.POLLIN):
                break
        for chunk in self._chunks(list(pending.values())):
            self._sample_and_reply(chunk)
        self._expire_clients()
        return read

    def _pending_rows(self, pending: dict[bytes, _Request]) -> int:
        return sum(request.rows for request in pending.values())

    def _batch_complete(self, pending: dict[bytes, _Request]) -> bool:
        """No point waiting: nothing to sample, the batch is full, or every recently active client
        has a request in."""
        if not pending or self._pending_rows(pending) >= self.config.max_batch_size:
            return True
        now = time.monotonic()
        return all(identity in pending for identity, client in self._clients.items()
                   if now - client.last_request_s <= ACTIVE_WINDOW_S)

    def _chunks(self, requests: list[_Request]) -> list[list[_Request]]:
        """Requests grouped by (K, deterministic, instruction or not), in arrival order, each group
        cut into sample calls of at most ``max_batch_size`` observations."""
        groups: dict[tuple[int, bool, bool], list[list[_Request]]] = {}
        for request in requests:
            chunks = groups.setdefault(request.group, [[]])
            if chunks[-1] and sum(r.rows for r in chunks[-1]) + request.rows > self.config.max_batch_size:
                chunks.append([])
            chunks[-1].append(request)
        return [chunk for chunks in groups.values() for chunk in chunks]

    def _receive(self, pending: dict[bytes, _Request]) -> None:
        identity, reply = answer_request(
            self._socket, self.config.max_message_bytes,
            lambda client, envelope: self._dispatch(client, envelope, pending), server="policy server",
            accepts=REQUEST_TYPES, describe=self._describe, logger=log)
        if reply is not None:
            self._reply(identity, reply)

    def _dispatch(self, identity: bytes, envelope: pb.Envelope,
                  pending: dict[bytes, _Request]) -> pb.Envelope | None:
        """The reply to send now, or None when the request joined the pending batch
        (:func:`answer_request` checked the request's version and type)."""
        kind = envelope.WhichOneof("body")
        reply = pb.Envelope(request_id=envelope.request_id)
        if kind == "policy_handshake":
            reply.policy_handshake_reply.CopyFrom(self._handshake(identity, envelope.policy_handshake))
            return reply
        client = self._clients.get(identity)
        if client is None:
            raise ProtocolError(pb.ERROR_NOT_CONTROLLER, f"{kind}: send a policy_handshake first")
        now = time.monotonic()
        client.last_seen_s = now
        if kind == "goodbye":
            self._clients.pop(identity, None)
            reply.goodbye_reply.SetInParent()
            return reply
        self.stats.requests += 1
        client.last_request_s = now
        # The client waits for this request only: an older one still pending is dropped, even when
        # this one turns out to be invalid.
        previous = pending.pop(identity, None)
        if previous is not None:
            self.stats.superseded += 1
            log.debug("%s: request %d superseded by %d", client.name, previous.request_id, envelope.request_id)
        pending[identity] = self._admit(identity, envelope, now)
        return None

    # -- handshake ----------------------------------------------------------------------------
    def _handshake(self, identity: bytes, request: pb.PolicyHandshake) -> pb.PolicyHandshakeReply:
        if request.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(pb.ERROR_PROTOCOL_VERSION,
                                f"policy_handshake: client protocol version {request.protocol_version}, "
                                f"server {PROTOCOL_VERSION}")
        kind = self.policy.kind
        if request.policy_kind and request.policy_kind != kind:
            raise ProtocolError(pb.ERROR_INCOMPATIBLE,
                                f"policy_handshake: the client expects a {request.policy_kind!r} policy, this server "
                                f"serves {self.policy_name!r} of kind {kind!r}", "policy_handshake.policy_kind")
        if not request.HasField("spaces"):
            raise ProtocolError(pb.ERROR_INVALID_ARGUMENT, "policy_handshake.spaces: missing",
                                "policy_handshake.spaces")
        client_spaces = spaces_from_pb(request.spaces)
        if client_spaces.digest() != request.spaces_hash:
            raise ProtocolError(pb.ERROR_INVALID_ARGUMENT, "policy_handshake.spaces_hash does not match its spaces",
                                "policy_handshake.spaces_hash")
        name = request.client_name or identity.hex()[:10]
        if self._spaces is None:
            self._spaces = client_spaces
            log.info("client %r defined the served spaces %s (fields: %s)", name, client_spaces.digest(),
                     ", ".join(sorted(client_spaces.observation)))
        else:
            differences = client_spaces.differences(self._spaces, "client", "policy", extra_fields_differ=False)
            if differences:
                raise ProtocolError(pb.ERROR_INCOMPATIBLE,
                                    f"policy_handshake: the client's spaces do not fit the policy {self.policy_name!r} "
                                    f"(client {client_spaces.digest()}, policy {self._spaces.digest()}): "
                                    + "; ".join(differences), "policy_handshake.spaces")
        self._clients[identity] = _Client(name=name, last_seen_s=time.monotonic())
        log.info("client %r connected", name)
        return pb.PolicyHandshakeReply(
            protocol_version=PROTOCOL_VERSION, session_id=self.session_id, spaces=spaces_to_pb(self._spaces),
            spaces_hash=self._spaces.digest(), policy_kind=kind, policy_name=self.policy_name,
            policy_version=self.policy_version, max_samples=self.config.max_samples,
            max_batch_size=self.config.max_batch_size)

    # -- request validation -------------------------------------------------------------------
    def _admit(self, identity: bytes, envelope: pb.Envelope, now: float) -> _Request:
        """A validated request, or ProtocolError naming the offending field."""
        request = envelope.action_request
        spaces = self._spaces
        assert spaces is not None, "a handshake defines the spaces before any request"
        if not 1 <= request.num_samples <= self.config.max_samples:
            raise ProtocolError(pb.ERROR_INVALID_ARGUMENT,
                                f"action_request.num_samples: {request.num_samples}, this server takes "
                                f"1..{self.config.max_samples}", "action_request.num_samples")
        if len(request.instruction) > MAX_INSTRUCTION_CHARS:
            raise ProtocolError(pb.ERROR_INVALID_ARGUMENT,
                                f"action_request.instruction: {len(request.instruction)} characters, at most "
                                f"{MAX_INSTRUCTION_CHARS}", "action_request.instruction")
        fields = request.observation.fields
        expected = sorted(spaces.observation)
        for name in sorted(set(fields) - set(expected)):
            where = f"action_request.observation.fields[{name}]"
            raise ProtocolError(pb.ERROR_INVALID_ARGUMENT,
                                f"{where}: not a field of this policy (it takes: {', '.join(expected)})", where)
        observation: dict[str, np.ndarray] = {}
        rows: int | None = None
        for name in expected:
            where = f"action_request.observation.fields[{name}]"
            if name not in fields:
                raise ProtocolError(pb.ERROR_INVALID_ARGUMENT,
                                    f"{where}: missing (this policy takes: {', '.join(expected)})", where)
            array = decode_tensor(fields[name], where)
            spec = spaces.observation[name]
            if array.dtype.name != spec.dtype:
                raise ProtocolError(pb.ERROR_INVALID_ARGUMENT,
                                    f"{where}: dtype {array.dtype.name}, expected {spec.dtype}", where)
            shape = tuple(spec.shape)
            if request.batched:
                if array.shape[1:] != shape or array.ndim != len(shape) + 1:
                    raise ProtocolError(pb.ERROR_INVALID_ARGUMENT,
                                        f"{where}: shape {array.shape}, expected (B, {', '.join(map(str, shape))}) "
                                        "in a batched request", where)
                if rows is not None and array.shape[0] != rows:
                    raise ProtocolError(pb.ERROR_INVALID_ARGUMENT,
                                        f"{where}: batch of {array.shape[0]}, the other fields have {rows}", where)
                rows = array.shape[0]
            elif array.shape != shape:
                raise ProtocolError(pb.ERROR_INVALID_ARGUMENT, f"{where}: shape {array.shape}, expected {shape}", where)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ProtocolError(pb.ERROR_INVALID_ARGUMENT, f"{where}: non-finite values (NaN or inf)", where)
            observation[name] = array if request.batched else array[None]
        rows = 1 if rows is None else rows
        if not 1 <= rows <= self.config.max_batch_size:
            raise ProtocolError(pb.ERROR_INVALID_ARGUMENT,
                                f"action_request.observation: a batch of {rows} observations, this server takes "
                                f"1..{self.config.max_batch_size}", "action_request.observation")
        return _Request(identity, envelope.request_id, observation, rows, request.batched, request.instruction,
                        request.num_samples, request.deterministic, request.timeout_ms, now)

    # -- sampling -----------------------------------------------------------------------------
    def _sample_and_reply(self, chunk: list[_Request]) -> None:
        """One sample call for ``chunk``; on failure, each request alone (or its error reply)."""
        served = self._served
        try:
            actions, elapsed_ms = self._sample(served.policy, chunk)
        except Exception as error:
            if len(chunk) > 1:
                log.warning("a batched sample call of %d requests failed (%s: %s); serving them one by one",
                            len(chunk), type(error).__name__, error)
                for request in chunk:
                    self._sample_and_reply([request])
                return
            log.exception("policy %s failed on a request of %s", served.name, self._describe(chunk[0].identity))
            failure = ProtocolError(pb.ERROR_INTERNAL,
                                    f"policy {served.name!r} failed: {type(error).__name__}: {error}")
            self._reply(chunk[0].identity, error_envelope(chunk[0].request_id, failure))
            return
        rows = actions.shape[0]
        self.stats.sample_calls += 1
        self.stats.sampled_observations += rows
        self.stats.last_batch_size, self.stats.last_inference_ms = rows, elapsed_ms
        offset = 0
        now = time.monotonic()
        for request in chunk:
            part = actions[offset:offset + request.rows]
            offset += request.rows
            reply = pb.Envelope(request_id=request.request_id)
            encode_tensor(part if request.batched else part[0], reply.action_reply.actions)
            reply.action_reply.policy_name = served.name
            reply.action_reply.policy_version = served.version
            reply.action_reply.inference_ms = elapsed_ms
            reply.action_reply.batch_size = rows
            self._note_lateness(request, now)
            self.stats.replies += 1
            self._reply(request.identity, reply)

    def _sample(self, policy: Policy, chunk: list[_Request]) -> tuple[np.ndarray, float]:
        """``policy.sample`` on the stacked observations of ``chunk``: float32 ``[rows, K, A]`` on the
        host, checked, and the call's wall time in milliseconds."""
        num_samples, deterministic, with_instruction = chunk[0].group
        assert self._spaces is not None
        observations: dict[str, object] = {
            name: np.concatenate([request.observation[name] for request in chunk]) for name in self._spaces.observation}
        if with_instruction:
            observations[self.instruction_key] = [request.instruction for request in chunk for _ in range(request.rows)]
        rows = sum(request.rows for request in chunk)
        started = time.perf_counter()
        with torch.inference_mode():
            samples = policy.sample(observations, num_samples, deterministic=deterministic)
            actions = samples.detach().to("cpu", torch.float32).numpy()  # waits for the device
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        expected = (rows, num_samples, *self._spaces.action.shape)
        if actions.shape != expected:
            raise ValueError(f"the policy returned actions of shape {actions.shape}, expected {expected}")
        if not np.isfinite(actions).all():
            raise ValueError("the policy returned non-finite actions (NaN or inf); none were sent")
        return actions, elapsed_ms

    def _note_lateness(self, request: _Request, now: float) -> None:
        waited_ms = (now - request.received_s) * 1000.0
        if not request.timeout_ms or waited_ms <= request.timeout_ms:
            return
        self.stats.late_replies += 1
        if now - self._last_late_warning_s >= LATE_WARNING_INTERVAL_S:
            self._last_late_warning_s = now
            log.warning("reply to %s took %.0f ms on this server alone, past its %d ms timeout (%d late replies so "
                        "far): it held the arm instead; the policy (%.0f ms a call) is too slow for that timeout",
                        self._describe(request.identity), waited_ms, request.timeout_ms, self.stats.late_replies,
                        self.stats.last_inference_ms)

    # -- plumbing -----------------------------------------------------------------------------
    def _reply(self, identity: bytes, envelope: pb.Envelope) -> None:
        if envelope.WhichOneof("body") == "error":
            self.stats.errors[pb.ErrorCode.Name(envelope.error.code)] += 1
        envelope.protocol_version = PROTOCOL_VERSION
        try:
            self._socket.send_multipart([identity, envelope.SerializeToString()], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("reply to %s dropped: client not reading", self._describe(identity))

    def _describe(self, identity: bytes) -> str:
        client = self._clients.get(identity)
        return f"{client.name!r}" if client else f"unknown client {identity.hex()[:10]}"

    def _expire_clients(self) -> None:
        now = time.monotonic()
        for identity, client in list(self._clients.items()):
            if now - client.last_seen_s > CLIENT_EXPIRY_S:
                log.info("forgetting silent client %r", client.name)
                del self._clients[identity]
