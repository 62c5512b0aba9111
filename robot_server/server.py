"""The robot server process: a :class:`RobotCell` behind a ZeroMQ ROUTER socket.

Protocol (transport/steerl.proto): each client opens with a ``Handshake`` (protocol version, role,
hashes of the config sections it was built from) and gets the spaces back. One client at a time
holds the controller role and may ``reset``/``step``; observers may ``observe``. A controller
that says ``Goodbye`` or stays silent for ``controller_lease_ms`` loses the role, and the arm is held.

Robustness rules: any frame that is oversized, unparsable, of the wrong message type, of another
protocol version or carries a bad action gets an ``Error`` reply naming the problem; nothing a
client sends can crash the loop or move the arm outside a valid ``step``. The loop also runs the
watchdog between requests, so a silent controller's arm is held within ``watchdog_ms``.

Emergency stop: a ``HoldRequest`` from any client that completed the handshake (controller or
observer) holds the arm at once and latches the emergency-stopped state; from then on ``reset`` and
``step`` are refused with ``ERROR_EMERGENCY_STOPPED`` (the arm does not move) until the controller
sends a ``ReleaseRequest``. The latch does not depend on the watchdog, on the controller lease or
on the client staying connected; every reply's info carries ``emergency_stopped`` (0/1).
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import zmq

from hardware_configs.schema import SessionConfig
from robot_server.backends import ArmFault
from robot_server.cell import EmergencyStopped, EpisodeNotStarted, RobotCell
from robot_server.safety import UnsafeAction
from transport import steerl_pb2 as pb
from transport.codec import (
    PROTOCOL_VERSION,
    ProtocolError,
    decode_tensor,
    encode_observation,
    info_to_pb,
    spaces_to_pb,
)
from transport.zmq_link import answer_request, bind_server

log = logging.getLogger("steerl.robot_server")

IDLE_POLL_MS = 50
# Clients not heard from for this long are forgotten (they must handshake again).
CLIENT_EXPIRY_S = 300.0
CONTROLLER_REQUESTS = ("reset", "step")
REQUEST_TYPES = ("handshake", "reset", "step", "observe", "goodbye", "hold", "release")


@dataclass
class _Client:
    name: str
    role: int
    last_seen_s: float


class RobotServer:
    """Serves one RobotCell over ZeroMQ until :meth:`stop` (or SIGINT/SIGTERM with
    :meth:`install_signal_handlers`)."""

    def __init__(self, config: SessionConfig, cell: RobotCell | None = None,
                 context: zmq.Context | None = None) -> None:
        self.config = config
        self.cell = cell if cell is not None else RobotCell(config)
        self.session_id = uuid.uuid4().hex[:12]
        self._context = context or zmq.Context.instance()
        self._socket, self._authenticator = bind_server(
            self._context, config.server.address, config.server.max_message_bytes, config.server.curve
        )
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._clients: dict[bytes, _Client] = {}
        self._controller: bytes | None = None
        self._stop = threading.Event()
        self._lease_s = config.server.controller_lease_ms / 1000.0
        self.errors_sent = 0
        self._handshake_reply = pb.HandshakeReply(
            protocol_version=PROTOCOL_VERSION,
            session_id=self.session_id,
            spaces=spaces_to_pb(self.cell.spaces),
            spaces_hash=self.cell.spaces.digest(),
            config_hashes=self.cell.config_hashes,
            control_rate_hz=config.robot.control.rate_hz,
            backend=config.robot.backend,
            config_name=config.name,
        )

    # -- lifecycle ----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """Stop cleanly on SIGINT/SIGTERM (main thread only)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.stop())

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        """Answer requests and run the watchdog until stopped; then hold the arm and close."""
        log.info("robot server %s serving %s (%s backend) on %s", self.session_id, self.config.name,
                 self.config.robot.backend, self.address)
        # Everything allocated so far lives as long as the server: keep the cyclic collector from
        # re-scanning it, which otherwise costs a multi-millisecond pause in the control loop.
        gc.collect()
        gc.freeze()
        try:
            while not self._stop.is_set():
                until_watchdog = self.cell.check_watchdog()
                timeout_ms = IDLE_POLL_MS if until_watchdog is None else min(
                    IDLE_POLL_MS, max(1, int(until_watchdog * 1000) + 1))
                if self._socket.poll(timeout_ms, zmq.POLLIN):
                    self._serve_one()
                self._expire_clients()
        finally:
            self.close()

    def close(self) -> None:
        if self._socket.closed:
            return
        self.cell.close()
        self._socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        log.info("robot server %s stopped", self.session_id)

    # -- request handling ---------------------------------------------------------------------
    def _serve_one(self) -> None:
        identity, reply = answer_request(
            self._socket, self.config.server.max_message_bytes, self._dispatch, server="robot server",
            accepts=REQUEST_TYPES, describe=self._describe, logger=log, internal_error=self._internal_error)
        self._reply(identity, reply)

    def _internal_error(self, error: Exception, client: str) -> ProtocolError:
        """Hold the arm after anything but a refused request, and say so."""
        self.cell.hold()
        if isinstance(error, ArmFault):  # the arm refused a command; the backend has already held it
            log.error("arm fault serving %s: %s", client, error)
            return ProtocolError(pb.ERROR_INTERNAL, f"arm fault: {error}")
        log.exception("internal error serving %s", client)
        return ProtocolError(pb.ERROR_INTERNAL, f"internal error: {type(error).__name__}: {error}; the arm is held")

    def _reply(self, identity: bytes, envelope: pb.Envelope) -> None:
        if envelope.WhichOneof("body") == "error":
            self.errors_sent += 1
        envelope.protocol_version = PROTOCOL_VERSION
        try:
            self._socket.send_multipart([identity, envelope.SerializeToString()], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("reply to %s dropped: client not reading", self._describe(identity))

    def _describe(self, identity: bytes) -> str:
        client = self._clients.get(identity)
        return f"{client.name!r}" if client else f"unknown client {identity.hex()[:10]}"

    def _dispatch(self, identity: bytes, envelope: pb.Envelope) -> pb.Envelope:
        """The reply to a checked request (:func:`answer_request` checked its version and type)."""
        kind = envelope.WhichOneof("body")
        reply = pb.Envelope(request_id=envelope.request_id)
        if kind == "handshake":
            reply.handshake_reply.CopyFrom(self._handshake(identity, envelope.handshake))
            return reply
        client = self._clients.get(identity)
        if client is None:
            raise ProtocolError(pb.ERROR_NOT_CONTROLLER, f"{kind}: send a handshake first")
        client.last_seen_s = time.monotonic()
        if kind == "goodbye":
            self._forget(identity)
            reply.goodbye_reply.SetInParent()
        elif kind == "observe":
            observation, info, stamp = self.cell.observe()
            encode_observation(observation, stamp, reply.observe_reply.observation)
            info_to_pb(info, reply.observe_reply.info)
        elif kind == "hold":
            reason = envelope.hold.reason or "no reason given"
            info_to_pb(self.cell.emergency_stop(f"{reason}, from {client.name!r}"), reply.hold_reply.info)
        else:
            if identity != self._controller:
                raise ProtocolError(pb.ERROR_NOT_CONTROLLER,
                                    f"{kind}: client {client.name!r} is not the controller")
            if kind == "release":
                info_to_pb(self.cell.release_emergency_stop(), reply.release_reply.info)
            elif kind == "reset":
                seed = envelope.reset.seed if envelope.reset.has_seed else None
                try:
                    observation, info, stamp = self.cell.reset(seed)
                except EmergencyStopped as error:
                    raise ProtocolError(pb.ERROR_EMERGENCY_STOPPED, str(error)) from None
                encode_observation(observation, stamp, reply.reset_reply.observation)
                info_to_pb(info, reply.reset_reply.info)
            else:
                self._step(envelope.step, reply.step_reply)
        return reply

    def _step(self, request: pb.StepRequest, out: pb.StepReply) -> None:
        if not request.HasField("action"):
            raise ProtocolError(pb.ERROR_INVALID_ARGUMENT, "step.action: missing", "step.action")
        action = decode_tensor(request.action, "step.action")
        try:
            result = self.cell.step(np.asarray(action))
        except UnsafeAction as error:
            raise ProtocolError(pb.ERROR_INVALID_ARGUMENT, f"step.{error}", f"step.{error.field}") from None
        except EpisodeNotStarted as error:
            raise ProtocolError(pb.ERROR_UNEXPECTED_MESSAGE, str(error)) from None
        except EmergencyStopped as error:
            raise ProtocolError(pb.ERROR_EMERGENCY_STOPPED, str(error)) from None
        encode_observation(result.observation, result.stamp_s, out.observation)
        out.reward = result.reward
        out.terminated = result.terminated
        out.truncated = result.truncated
        info_to_pb(result.info, out.info)

    def _handshake(self, identity: bytes, request: pb.Handshake) -> pb.HandshakeReply:
        if request.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(pb.ERROR_PROTOCOL_VERSION,
                                f"handshake: client protocol version {request.protocol_version}, "
                                f"server {PROTOCOL_VERSION}")
        if request.role not in (pb.ROLE_CONTROLLER, pb.ROLE_OBSERVER):
            raise ProtocolError(pb.ERROR_INVALID_ARGUMENT, "handshake.role: must be CONTROLLER or OBSERVER",
                                "handshake.role")
        if request.spaces_hash and request.spaces_hash != self._handshake_reply.spaces_hash:
            raise ProtocolError(pb.ERROR_INCOMPATIBLE,
                                f"handshake: the client expects spaces {request.spaces_hash}, this robot "
                                f"serves {self._handshake_reply.spaces_hash} (observation or action fields differ)",
                                "handshake.spaces_hash")
        differing = sorted(
            section for section, digest in request.config_hashes.items()
            if self.cell.config_hashes.get(section, digest) != digest
        )
        unknown = sorted(set(request.config_hashes) - set(self.cell.config_hashes))
        if differing or unknown:
            detail = f"config sections differ from the server's ({self.config.name}): {', '.join(differing)}"
            if unknown:
                detail += f"; sections unknown to the server: {', '.join(unknown)}"
            raise ProtocolError(pb.ERROR_INCOMPATIBLE, f"handshake: {detail}", "handshake.config_hashes")

        now = time.monotonic()
        name = request.client_name or identity.hex()[:10]
        if request.role == pb.ROLE_CONTROLLER and self._controller not in (None, identity):
            holder = self._clients[self._controller]
            silent_s = now - holder.last_seen_s
            if silent_s < self._lease_s:
                raise ProtocolError(pb.ERROR_NOT_CONTROLLER,
                                    f"handshake: the robot is controlled by {holder.name!r} "
                                    f"(last seen {silent_s:.1f} s ago); control frees after "
                                    f"{self._lease_s:.1f} s of silence or its goodbye")
            log.warning("controller %r silent for %.1f s: control passes to %r", holder.name, silent_s, name)
            self._forget(self._controller)
        self._clients[identity] = _Client(name=name, role=request.role, last_seen_s=now)
        if request.role == pb.ROLE_CONTROLLER:
            self._controller = identity
        elif self._controller == identity:
            self._controller = None
        log.info("client %r connected as %s", name, pb.Role.Name(request.role))
        return self._handshake_reply

    def _forget(self, identity: bytes) -> None:
        client = self._clients.pop(identity, None)
        if identity == self._controller:
            self._controller = None
            self.cell.hold()
            if client is not None:
                log.info("controller %r released the robot; arm held", client.name)

    def _expire_clients(self) -> None:
        if not self._clients:
            return
        now = time.monotonic()
        for identity, client in list(self._clients.items()):
            if now - client.last_seen_s > CLIENT_EXPIRY_S:
                log.info("forgetting silent client %r", client.name)
                self._forget(identity)
