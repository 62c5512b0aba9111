"""The actor's link to the learner: transitions out, policy weights in, all off the control loop.

The control loop only ever calls :meth:`LearnerLink.submit` (append to a bounded queue) and
:meth:`LearnerLink.take_policy` (swap in a policy the link thread already loaded); neither waits
on the network. A background thread does the rest:

- says hello, learns the last transition the learner holds durably, drops what it holds up to
  there and (re)sends the rest, oldest first, one batch in flight at a time;
- forgets transitions only once the learner acknowledges them (they are in its log on disk), so a
  restart of the learner or a lost ack loses nothing, and the learner's sequence check drops the
  duplicates a resend creates;
- fetches newer weights when an ack announces them and builds the new policy off-thread;
- when the learner is away, keeps retrying (reconnecting with the same identity) while the actor
  goes on acting with its last weights.

:attr:`LearnerLink.latency_ms` is the link's round-trip time: a moving average over the requests
that carry no bulk data (transition acks of small batches, weight polls that bring no weights),
for the operator's progress line.

The queue is bounded by ``max_queue_mb``: if the learner stays away so long that it fills, the
oldest unsent transitions are dropped, counted in ``dropped`` and logged as errors.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from transport import steerl_pb2 as pb
from transport.codec import PROTOCOL_VERSION, encode_transition, spaces_to_pb
from transport.spaces import RobotSpaces
from transport.zmq_link import LinkTimeout, RemoteError, RpcClient

log = logging.getLogger("steerl.actor")

MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_BATCH_TRANSITIONS = 256
# At most this many batches a second: fewer, larger batches keep the learner's per-batch cost low.
MIN_BATCH_INTERVAL_S = 0.05
# With nothing to send, ask the learner for news (update count, weights) this often.
IDLE_POLL_S = 0.25
# Batches up to this size count as small requests for the round-trip measurement.
LATENCY_PROBE_MAX_BYTES = 256 * 1024
# Weight of the newest round trip in the moving average.
LATENCY_SMOOTHING = 0.2


@dataclass
class _Queued:
    """One executed step waiting for the learner's acknowledgement."""

    episode: int
    step: int
    # observation, action, reward, next_observation, terminated, truncated, intervened
    fields: tuple
    nbytes: int = 0

    def __post_init__(self) -> None:
        observation, action, _, next_observation, *_ = self.fields
        self.nbytes = (sum(v.nbytes for v in observation.values()) + sum(v.nbytes for v in next_observation.values())
                       + np.asarray(action).nbytes)


class LearnerLink:
    """See the module docstring. ``load_policy(bytes) -> policy`` builds a policy from weights."""

    def __init__(self, address: str, actor_id: str, spaces: RobotSpaces,
                 load_policy: Callable[[bytes], Any] | None = None, timeout_ms: int = 2000,
                 max_queue_mb: int = 2048, curve=None) -> None:
        self.actor_id = actor_id
        self._spaces = spaces
        self._load_policy = load_policy
        self._timeout_ms = timeout_ms
        self._max_queue_bytes = max_queue_mb * 1024 * 1024
        self._client = RpcClient(address, curve=curve, identity=actor_id.encode()[:255])
        self._lock = threading.Condition()
        # Oldest first; a transition stays here until the learner acknowledges it.
        self._queue: collections.deque[_Queued] = collections.deque()
        self._queue_bytes = 0
        self._in_flight = 0  # how many at the head of the queue are in the batch being sent
        self._episodes: list[pb.EpisodeSummary] = []
        self._policy: Any = None
        self._policy_version = 0
        self._announced_version = 0
        self._hello: pb.LearnerHello | None = None
        self._hello_event = threading.Event()
        self.connected = False
        self.dropped = 0
        self.acked = 0
        self.rejected = 0
        self.learner_updates = 0
        self._latency_s: float | None = None
        self._new_address: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"learner-link-{actor_id}", daemon=True)
        self._thread.start()

    # -- control-loop side (never blocks on the network) --------------------------------------
    def wait_for_hello(self, timeout_s: float) -> pb.LearnerHello | None:
        """The learner's hello (resume point), or None if it did not answer in time."""
        self._hello_event.wait(timeout_s)
        return self._hello

    def submit(self, episode: int, step: int, observation: dict[str, np.ndarray], action: np.ndarray,
               reward: float, next_observation: dict[str, np.ndarray], terminated: bool, truncated: bool,
               intervened: bool = False) -> None:
        """Queue one executed step (encoding happens on the link thread)."""
        item = _Queued(episode, step, (observation, action, reward, next_observation, terminated, truncated,
                                       intervened))
        with self._lock:
            self._queue.append(item)
            self._queue_bytes += item.nbytes
            while self._queue_bytes > self._max_queue_bytes and len(self._queue) > self._in_flight + 1:
                oldest_unsent = self._queue[self._in_flight]
                del self._queue[self._in_flight]
                self._queue_bytes -= oldest_unsent.nbytes
                self.dropped += 1
                if self.dropped % 1000 == 1:
                    log.error("learner away too long: send queue full, %d oldest transitions dropped", self.dropped)
            self._lock.notify()

    def episode_finished(self, summary: pb.EpisodeSummary) -> None:
        with self._lock:
            self._episodes.append(summary)
            self._lock.notify()

    def take_policy(self) -> tuple[int, Any] | None:
        """A newer policy than the last one taken, already loaded, or None."""
        with self._lock:
            if self._policy is None:
                return None
            policy, self._policy = self._policy, None
            return self._policy_version, policy

    @property
    def latency_ms(self) -> float | None:
        """Round-trip time to the learner in milliseconds (moving average), None before any answer."""
        latency = self._latency_s
        return None if latency is None else latency * 1000.0

    def _measure(self, started_s: float) -> None:
        elapsed = time.monotonic() - started_s
        previous = self._latency_s
        self._latency_s = elapsed if previous is None else previous + LATENCY_SMOOTHING * (elapsed - previous)

    def retarget(self, address: str) -> None:
        """Talk to the learner at ``address`` from now on (a learner restarted on another machine):
        the link reconnects there, says hello and resends what the new learner does not hold."""
        with self._lock:
            self._new_address = address
            self._lock.notify()

    @property
    def address(self) -> str:
        return self._client.address

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted transition is acknowledged (or the timeout passes)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._queue and not self._episodes:
                    return True
            time.sleep(0.01)
        return False

    def close(self, flush_timeout_s: float = 5.0) -> None:
        self.flush(flush_timeout_s)
        self._stop.set()
        with self._lock:
            self._lock.notify()
        self._thread.join(timeout=5)
        self._client.close()

    # -- link thread --------------------------------------------------------------------------
    def _call(self, envelope: pb.Envelope) -> pb.Envelope:
        return self._client.call(envelope, self._timeout_ms)

    def _say_hello(self) -> None:
        request = pb.Envelope()
        request.actor_hello.protocol_version = PROTOCOL_VERSION
        request.actor_hello.actor_id = self.actor_id
        request.actor_hello.spaces.CopyFrom(spaces_to_pb(self._spaces))
        request.actor_hello.spaces_hash = self._spaces.digest()
        hello = self._call(request).learner_hello
        with self._lock:
            if hello.has_acked:
                self._forget_through((hello.acked_episode, hello.acked_step))
            self._in_flight = 0
        self._announced_version = hello.weights_version
        self._hello = hello
        self._hello_event.set()
        self.connected = True
        log.info("learner %s connected (resend %d transitions)", hello.learner_session, self.pending)

    def _forget_through(self, acked: tuple[int, int]) -> None:
        """Drop acknowledged transitions (caller holds the lock)."""
        while self._queue and (self._queue[0].episode, self._queue[0].step) <= acked:
            self._queue_bytes -= self._queue.popleft().nbytes
            self._in_flight = max(0, self._in_flight - 1)
            self.acked += 1

    def _next_batch(self) -> pb.Envelope | None:
        with self._lock:
            if not self._queue and not self._episodes:
                self._lock.wait(0.05)
            if not self._queue and not self._episodes:
                return None
            request = pb.Envelope()
            batch = request.transitions
            batch.actor_id = self.actor_id
            size = 0
            count = 0
            for item in self._queue:
                if count >= MAX_BATCH_TRANSITIONS or (count and size + item.nbytes > MAX_BATCH_BYTES):
                    break
                encode_transition(batch.transitions.add(), item.episode, item.step, *item.fields)
                size += item.nbytes
                count += 1
            self._in_flight = count
            batch.episodes.extend(self._episodes)
            return request

    def _run(self) -> None:
        last_contact = time.monotonic()
        while not self._stop.is_set():
            try:
                self._apply_new_address()
                if not self.connected:
                    self._say_hello()
                    last_contact = time.monotonic()
                request = self._next_batch()
                if request is None and time.monotonic() - last_contact > IDLE_POLL_S:
                    self._fetch_weights()
                    last_contact = time.monotonic()
                if request is not None:
                    last_contact = time.monotonic()
                    sent_at = time.monotonic()
                    sent_episodes = len(request.transitions.episodes)
                    ack = self._call(request).transition_ack
                    if request.ByteSize() <= LATENCY_PROBE_MAX_BYTES:
                        self._measure(sent_at)
                    with self._lock:
                        if ack.has_acked:
                            self._forget_through((ack.acked_episode, ack.acked_step))
                        del self._episodes[:sent_episodes]
                        self._in_flight = 0
                    self.rejected += len(ack.rejected)
                    self._announced_version = ack.weights_version
                    self.learner_updates = ack.learner_updates
                    if len(request.transitions.transitions) < MAX_BATCH_TRANSITIONS:
                        self._stop.wait(max(0.0, MIN_BATCH_INTERVAL_S - (time.monotonic() - sent_at)))
                if self._announced_version > self._policy_version:
                    self._fetch_weights()
            except LinkTimeout:
                if self.connected:
                    log.warning("learner not answering; acting on with the last weights and retrying")
                self.connected = False
                with self._lock:
                    self._in_flight = 0
                self._client.reconnect()
            except RemoteError as error:
                log.error("learner refused the actor: %s", error)
                self.connected = False
                self._stop.wait(1.0)

    def _apply_new_address(self) -> None:
        with self._lock:
            address, self._new_address = self._new_address, None
            if address is None or address == self._client.address:
                return
            self._in_flight = 0
        log.info("learner moved to %s: reconnecting", address)
        self._client.address = address
        self._client.reconnect()
        self.connected = False

    def _fetch_weights(self) -> None:
        """Ask for weights newer than ours (the reply also carries the learner's update count)."""
        request = pb.Envelope()
        request.weights_request.have_version = self._policy_version if self._load_policy else 2**63
        sent_at = time.monotonic()
        weights = self._call(request).weights
        if not weights.safetensors:
            self._measure(sent_at)
        self.learner_updates = weights.learner_updates
        self._announced_version = weights.version
        if weights.version <= self._policy_version or not weights.safetensors or self._load_policy is None:
            return
        policy = self._load_policy(weights.safetensors)
        with self._lock:
            self._policy = policy
            self._policy_version = weights.version
