"""ZeroMQ helpers: server and client sockets with size limits, timeouts and optional CURVE keys.

Servers bind a ROUTER socket and answer each request on the identity it came from, so that a
client that vanishes mid-request costs nothing but a dropped reply; :func:`answer_request` is the
one place where a server reads, checks and answers a request (the robot server, the learner and
the policy server all go through it). Clients use a DEALER socket
(:class:`RpcClient`) that matches replies to requests by ``request_id`` and discards stale ones,
so a timed-out request never gets confused with the next one (``stale_replies`` counts those
dropped). A client made with ``immediate=True`` queues requests only on a live connection: with the
server away, :meth:`RpcClient.call` raises :class:`PeerUnavailable` at its deadline instead of
queueing a request that a restarted server would answer long after it mattered.

CURVE: ``generate_keypair`` writes ZeroMQ certificate files (``NAME.key`` public,
``NAME.key_secret`` secret). A server given ``CurveServerKeys`` accepts only clients whose public
key file lies in its ``authorized_keys_dir``; everyone else is refused by ZeroMQ before a single
message reaches steerl.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from hardware_configs.schema import CurveClientKeys, CurveServerKeys
from transport import steerl_pb2 as pb
from transport.codec import PROTOCOL_VERSION, ProtocolError, error_envelope, parse_envelope

log = logging.getLogger(__name__)

# ZeroMQ drops (and disconnects) peers whose frames exceed this multiple of the configured limit,
# before they are ever allocated in Python; frames between the limit and this ceiling get a clear
# error reply from the application instead.
HARD_LIMIT_FACTOR = 4
BIND_RETRY_S = 3.0
# ``immediate`` clients: ZeroMQ heartbeats detect a peer that vanished without closing its
# connection (power loss, cable), so that the client stops sending into a dead connection.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
IMMEDIATE_SEND_HWM = 16


class LinkTimeout(TimeoutError):
    """No reply arrived within the timeout."""


class PeerUnavailable(LinkTimeout):
    """No connection to the peer within the timeout (``immediate`` clients): nothing was sent."""


class RemoteError(RuntimeError):
    """The peer answered with an Error message."""

    def __init__(self, error: pb.Error) -> None:
        name = pb.ErrorCode.Name(error.code)
        super().__init__(f"{name}: {error.message}")
        self.code = error.code
        self.field = error.field
        self.detail = error.message


def generate_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (secret, mode 600) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret_file, 0o600)
    return Path(public_file), Path(secret_file)


def _load_secret(path: str) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path}: not a secret key file (made by 'steerl keys generate')")
    return public, secret


def bind_server(context: zmq.Context, address: str, max_message_bytes: int,
                curve: CurveServerKeys | None = None) -> tuple[zmq.Socket, ThreadAuthenticator | None]:
    """A bound ROUTER socket (and its CURVE authenticator, to stop when done)."""
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes * HARD_LIMIT_FACTOR)
    socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
    authenticator = None
    if curve is not None:
        authenticator = ThreadAuthenticator(context, log=logging.getLogger("steerl.auth"))
        authenticator.start()
        authenticator.configure_curve(domain="*", location=curve.authorized_keys_dir)
        public, secret = _load_secret(curve.secret_key_file)
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_server = True
    try:
        bind_retrying(socket, address)
    except OSError:
        if authenticator is not None:
            authenticator.stop()
        raise
    return socket, authenticator


def bind_retrying(socket: zmq.Socket, address: str) -> None:
    """Bind ``socket`` to ``address``; on failure close it and raise ``OSError`` naming the address.

    A process restarted on the same port may find it still held for a moment by the old socket
    (ZeroMQ closes asynchronously): an address in use is retried for ``BIND_RETRY_S``."""
    deadline = time.monotonic() + BIND_RETRY_S
    while True:
        try:
            socket.bind(address)
            return
        except zmq.ZMQError as error:
            if error.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            socket.close(linger=0)
            raise OSError(f"cannot bind {address}: {error}") from None


def answer_request(
    socket: zmq.Socket,
    max_message_bytes: int,
    handle: Callable[[bytes, pb.Envelope], Optional[pb.Envelope]],
    *,
    server: str,
    accepts: Sequence[str],
    describe: Callable[[bytes], str] = lambda identity: f"client {identity.hex()[:10]}",
    logger: logging.Logger = log,
    internal_error: Optional[Callable[[Exception, str], ProtocolError]] = None,
) -> tuple[bytes, Optional[pb.Envelope]]:
    """Read one request from the ROUTER ``socket`` and work out its answer; never raises for what a
    client sent nor for a failing ``handle``.

    The request must be one ``[identity, payload]`` message whose payload parses as an envelope of at
    most ``max_message_bytes``, speaks this :data:`PROTOCOL_VERSION` and carries one of the
    ``accepts`` bodies; then ``handle(identity, envelope)`` makes the reply (None: the request is
    answered later). A :class:`ProtocolError` raised on the way becomes an Error reply and a warning
    naming the client (``describe``); any other exception is a bug or a device failure: logged with
    its traceback and answered ``ERROR_INTERNAL``, or with what ``internal_error(error, client)``
    returns (which may act first, e.g. hold the arm). Returns the client's identity and the reply,
    its ``protocol_version`` set. ``server`` names this side in the messages.
    """
    frames = socket.recv_multipart(copy=False)
    identity = frames[0].bytes
    request_id = 0
    try:
        if len(frames) != 2:
            raise ProtocolError(pb.ERROR_MALFORMED, f"expected one frame per message, got {len(frames) - 1}")
        envelope = parse_envelope(frames[1].buffer, max_message_bytes)
        request_id = envelope.request_id
        if envelope.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(pb.ERROR_PROTOCOL_VERSION,
                                f"client speaks protocol version {envelope.protocol_version}, this {server} speaks "
                                f"{PROTOCOL_VERSION}; upgrade the older side")
        kind = envelope.WhichOneof("body")
        if kind not in accepts:
            raise ProtocolError(pb.ERROR_UNEXPECTED_MESSAGE,
                                f"unexpected message type {kind!r}: a {server} accepts {', '.join(accepts)}")
        reply = handle(identity, envelope)
    except ProtocolError as error:
        logger.warning("refused request %d from %s: %s", request_id, describe(identity), error)
        reply = error_envelope(request_id, error)
    except Exception as error:  # a bug or a device failure must not take the server down
        if internal_error is not None:
            failure = internal_error(error, describe(identity))
        else:
            logger.exception("internal error serving %s", describe(identity))
            failure = ProtocolError(pb.ERROR_INTERNAL, f"internal error: {type(error).__name__}: {error}")
        reply = error_envelope(request_id, failure)
    if reply is not None:
        reply.protocol_version = PROTOCOL_VERSION
    return identity, reply


class RpcClient:
    """Request/reply over a DEALER socket with per-call timeouts and request-id matching."""

    def __init__(self, address: str, max_message_bytes: int = 64 * 1024 * 1024,
                 curve: CurveClientKeys | None = None, context: zmq.Context | None = None,
                 identity: bytes | None = None, immediate: bool = False) -> None:
        self.address = address
        # A stable identity lets the server recognise this client across reconnects.
        self.identity = identity or os.urandom(8)
        self.max_message_bytes = max_message_bytes
        self.immediate = immediate
        # Replies dropped because they answered an earlier request (they arrived after its timeout).
        self.stale_replies = 0
        self._curve = curve
        self._context = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._socket: zmq.Socket | None = None
        self._connect()

    def _connect(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        socket.setsockopt(zmq.IDENTITY, self.identity)
        if self.immediate:
            socket.setsockopt(zmq.IMMEDIATE, 1)
            socket.setsockopt(zmq.SNDHWM, IMMEDIATE_SEND_HWM)
            socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if self._curve is not None:
            public, secret = _load_secret(self._curve.secret_key_file)
            server_public, _ = zmq.auth.load_certificate(self._curve.server_public_key_file)
            socket.curve_secretkey = secret
            socket.curve_publickey = public
            socket.curve_serverkey = server_public
        socket.connect(self.address)
        self._socket = socket

    def reconnect(self) -> None:
        """Drop the socket (and any reply still in flight) and connect afresh."""
        if self._socket is not None:
            self._socket.close(linger=0)
        self._connect()

    def call(self, envelope: pb.Envelope, timeout_ms: int) -> pb.Envelope:
        """Send ``envelope`` and wait for its reply; raise RemoteError for an Error reply,
        LinkTimeout when none arrives in time (PeerUnavailable: ``immediate`` and not connected)."""
        assert self._socket is not None, "client is closed"
        request_id = next(self._ids)
        envelope.protocol_version = envelope.protocol_version or PROTOCOL_VERSION
        envelope.request_id = request_id
        deadline = time.monotonic() + timeout_ms / 1000.0
        if self.immediate:
            # With ZMQ_IMMEDIATE the socket is writable only while a connection is up.
            if not self._socket.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLOUT):
                raise PeerUnavailable(f"not connected to {self.address} within {timeout_ms} ms")
            try:
                self._socket.send(envelope.SerializeToString(), flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                raise PeerUnavailable(f"cannot send to {self.address}: the connection went away") from None
        else:
            self._socket.send(envelope.SerializeToString(), copy=False)
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._socket.poll(remaining_ms, zmq.POLLIN):
                raise LinkTimeout(f"no reply from {self.address} within {timeout_ms} ms")
            frame = self._socket.recv(copy=False).bytes
            try:
                reply = parse_envelope(frame, self.max_message_bytes)
            except ProtocolError as error:
                log.warning("dropping reply from %s: %s", self.address, error)
                continue
            if reply.request_id != request_id:
                self.stale_replies += 1
                log.debug("dropping stale reply %d (waiting for %d)", reply.request_id, request_id)
                continue
            if reply.WhichOneof("body") == "error":
                raise RemoteError(reply.error)
            return reply

    def send_raw(self, frame: bytes) -> None:
        """Send bytes as they are (tests of the server's handling of bad input)."""
        assert self._socket is not None
        self._socket.send(frame)

    def recv_raw(self, timeout_ms: int) -> bytes | None:
        assert self._socket is not None
        if not self._socket.poll(timeout_ms, zmq.POLLIN):
            return None
        return self._socket.recv()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
