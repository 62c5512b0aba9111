"""The learner's network side: actors send transitions in and fetch policy weights out.

One ROUTER socket serves every actor (transport/steerl.proto, "actor <-> learner"):

- ``ActorHello`` -> ``LearnerHello``: the actor learns the last of its transitions the learner
  holds durably, resends what came after and numbers new episodes after it.
- ``TransitionBatch`` -> ``TransitionAck``: every transition is checked (numbers in order, arrays
  valid for the spaces); the good ones are appended to the write-ahead log (fsync) and handed to
  ``on_transition``; only then is the batch acknowledged. Duplicates (a resend after a lost ack,
  a restarted actor) are counted and dropped; bad transitions are counted with their reason,
  logged and never stored. Steps that never arrived (a step number skipped inside an episode, an
  episode that does not begin at step 0) are counted per actor in ``missing`` and logged: with a
  working link there are none, whatever restarts happen on either side.
- ``WeightsRequest`` -> ``Weights``: the newest published policy (safetensors bytes) if the actor's
  version is older.

Discarded episodes: an ``EpisodeSummary`` with ``discarded`` set (the operator asked to re-record)
makes the service call ``on_discard(stream_id, episode)`` (the learner drops the episode's rows from
its buffers) and remember the episode number per actor (the newest ``DISCARD_MEMORY`` of them, kept
in the checkpoint's stream table): a transition of that episode that arrives later (a batch
boundary split the episode from its summary, or a resend) is acknowledged but never stored. Discard
summaries are written to the transition log with the batch, so replaying the log after a crash
discards the episode again.

The service never blocks: :meth:`LearnerService.poll` handles what has arrived and returns, so the
training loop interleaves it with gradient updates.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zmq

from learner.transition_log import TransitionLog
from transport import steerl_pb2 as pb
from transport.codec import (
    ProtocolError,
    decode_transition,
    spaces_from_pb,
)
from transport.spaces import RobotSpaces
from transport.zmq_link import answer_request, bind_server

log = logging.getLogger("steerl.learner")
REQUEST_TYPES = ("actor_hello", "transitions", "weights_request")

Sequence = tuple[int, int]  # (episode, step)

# Per actor, how many discarded episode numbers are remembered (to refuse their late transitions).
DISCARD_MEMORY = 64


@dataclass
class ActorStats:
    """What the learner knows about one actor stream."""

    stream_id: int
    acked: Sequence | None = None
    accepted: int = 0
    duplicates: int = 0
    rejected: Counter = field(default_factory=Counter)
    # Episodes the operator discarded (newest last, at most DISCARD_MEMORY) and the transitions of
    # them dropped on arrival.
    discarded_episodes: list[int] = field(default_factory=list)
    discarded_transitions: int = 0
    # Steps of this stream that never arrived (see missing_between).
    missing: int = 0


def missing_between(previous: Sequence | None, current: Sequence) -> int:
    """How many steps of a stream were skipped between two consecutive arrivals: the gap inside
    an episode, or the steps before ``current`` when it opens a new episode (episodes begin at step
    0; an episode cut short by a dying actor has no steps after its cut, so it counts nothing)."""
    episode, step = current
    if previous is not None and previous[0] == episode:
        return step - previous[1] - 1
    return step


class LearnerService:
    """Transitions in, weights out (see module docstring)."""

    def __init__(self, address: str, transition_log: TransitionLog | None,
                 on_transition: Callable[[int, dict], None],
                 on_episode: Callable[[str, pb.EpisodeSummary], None] | None = None,
                 on_spaces: Callable[[RobotSpaces], None] | None = None,
                 on_discard: Callable[[int, int], None] | None = None,
                 max_message_bytes: int = 256 * 1024 * 1024, curve=None,
                 context: zmq.Context | None = None) -> None:
        self.session = uuid.uuid4().hex[:12]
        self._socket, self._authenticator = bind_server(context or zmq.Context.instance(), address,
                                                        max_message_bytes, curve)
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._max_bytes = max_message_bytes
        self.transition_log = transition_log
        self._on_transition = on_transition
        self._on_episode = on_episode
        self._on_spaces = on_spaces
        self._on_discard = on_discard
        self.spaces: RobotSpaces | None = None
        self.actors: dict[str, ActorStats] = {}
        self.weights_version = 0
        self._weights = b""
        self.learner_updates = 0
        self.transitions_received = 0

    # -- state the checkpoint keeps -----------------------------------------------------------
    def stream_table(self) -> dict[str, dict]:
        return {actor: {"stream_id": s.stream_id, "acked": list(s.acked) if s.acked else None,
                        "accepted": s.accepted, "missing": s.missing,
                        "discarded_episodes": list(s.discarded_episodes)}
                for actor, s in self.actors.items()}

    def restore_stream_table(self, table: dict[str, dict]) -> None:
        for actor, entry in table.items():
            acked = tuple(entry["acked"]) if entry["acked"] is not None else None
            self.actors[actor] = ActorStats(stream_id=int(entry["stream_id"]), acked=acked,
                                            accepted=int(entry.get("accepted", 0)), missing=int(entry.get("missing", 0)),
                                            discarded_episodes=[int(e) for e in entry.get("discarded_episodes", [])])

    def set_spaces(self, spaces: RobotSpaces) -> None:
        self.spaces = spaces

    @property
    def weights_bytes(self) -> int:
        """Size of the newest published weights (what each actor fetches per version)."""
        return len(self._weights)

    def publish(self, weights: bytes, learner_updates: int) -> None:
        """Make ``weights`` (safetensors bytes of the policy) the newest version."""
        self._weights = weights
        self.weights_version += 1
        self.learner_updates = learner_updates

    # -- transitions --------------------------------------------------------------------------
    def _stats(self, actor_id: str) -> ActorStats:
        if actor_id not in self.actors:
            self.actors[actor_id] = ActorStats(stream_id=len(self.actors))
        return self.actors[actor_id]

    def ingest(self, batch: pb.TransitionBatch, write_log: bool = True) -> pb.TransitionAck:
        """Check, log durably and store a batch; the ack says what the learner now holds."""
        stats = self._stats(batch.actor_id)
        ack = pb.TransitionAck()
        fresh = pb.TransitionBatch(actor_id=batch.actor_id)
        decoded = []
        last = stats.acked
        discard = [summary for summary in batch.episodes if summary.discarded]
        for summary in discard:
            self._remember_discarded(stats, summary.episode)
        for message in batch.transitions:
            sequence = (message.episode, message.step)
            if last is not None and sequence <= last:
                stats.duplicates += 1
                ack.duplicates += 1
                continue
            skipped = missing_between(last, sequence)
            if skipped:
                stats.missing += skipped
                log.warning("actor %s: %d step(s) missing before transition %s", batch.actor_id, skipped, sequence)
            if message.episode in stats.discarded_episodes:
                stats.discarded_transitions += 1  # acknowledged (the actor may forget it), never stored
                last = sequence
                continue
            try:
                transition = decode_transition(message)
                self._check(transition)
            except (ProtocolError, ValueError) as error:
                reason = str(error)
                stats.rejected[re.sub(r"^transition\[\d+:\d+\]\.", "", reason)] += 1
                ack.rejected.append(f"{sequence}: {reason}")
                log.warning("actor %s: rejected transition %s: %s", batch.actor_id, sequence, reason)
                last = sequence
                continue
            fresh.transitions.append(message)
            decoded.append(transition)
            last = sequence
        fresh.episodes.extend(discard)  # logged, so that replaying the log discards the episode again
        if write_log and self.transition_log is not None and (fresh.transitions or fresh.episodes):
            # Synced once per poll, before any ack of this poll leaves (group commit).
            self.transition_log.append(fresh, sync=False)
        for transition in decoded:
            self._on_transition(stats.stream_id, transition)
        stats.accepted += len(decoded)
        self.transitions_received += len(decoded)
        stats.acked = last
        if self._on_discard is not None:
            for summary in discard:
                self._on_discard(stats.stream_id, summary.episode)
        if self._on_episode is not None:
            for summary in batch.episodes:
                self._on_episode(batch.actor_id, summary)
        ack.accepted = len(decoded)
        if stats.acked is not None:
            ack.has_acked = True
            ack.acked_episode, ack.acked_step = stats.acked
        ack.weights_version = self.weights_version
        ack.learner_updates = self.learner_updates
        return ack

    @staticmethod
    def _remember_discarded(stats: ActorStats, episode: int) -> None:
        if episode in stats.discarded_episodes:
            return
        stats.discarded_episodes.append(int(episode))
        del stats.discarded_episodes[:-DISCARD_MEMORY]
        log.info("actor stream %d: episode %d discarded by the operator", stats.stream_id, episode)

    def _check(self, transition: dict) -> None:
        """Refuse a transition that does not fit the spaces (the replay checks again on add)."""
        if self.spaces is None:
            raise ValueError("no actor has announced the spaces yet")
        for part in ("observation", "next_observation"):
            fields = transition[part]
            for name, spec in self.spaces.observation.items():
                value = fields.get(name)
                if value is None:
                    raise ValueError(f"{part}.{name}: missing")
                if value.shape != tuple(spec.shape) or value.dtype.name != spec.dtype:
                    raise ValueError(f"{part}.{name}: expected {spec.dtype}{tuple(spec.shape)}, "
                                     f"got {value.dtype.name}{value.shape}")
                if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                    raise ValueError(f"{part}.{name}: non-finite values")
        action, spec = transition["action"], self.spaces.action
        if action.shape != tuple(spec.shape) or action.dtype.name != spec.dtype:
            raise ValueError(f"action: expected {spec.dtype}{tuple(spec.shape)}, got {action.dtype.name}{action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError("action: non-finite values")
        if not np.isfinite(transition["reward"]):
            raise ValueError("reward: non-finite")

    def replay_log(self) -> int:
        """Feed the transition log (after a checkpoint was loaded) through dedup into the buffers."""
        if self.transition_log is None:
            return 0
        before = self.transitions_received
        for batch in self.transition_log.replay():
            self.ingest(batch, write_log=False)
        return self.transitions_received - before

    # -- socket -------------------------------------------------------------------------------
    def poll(self, timeout_ms: int = 0, max_messages: int = 16) -> int:
        """Serve what has arrived (waiting up to ``timeout_ms`` for the first); returns the count."""
        served = 0
        replies: list[tuple[bytes, pb.Envelope]] = []
        while served < max_messages and self._socket.poll(timeout_ms if served == 0 else 0, zmq.POLLIN):
            identity, reply = answer_request(
                self._socket, self._max_bytes, lambda _identity, envelope: self._dispatch(envelope), server="learner",
                accepts=REQUEST_TYPES, describe=lambda peer: f"actor {peer.hex()[:10]}", logger=log)
            assert reply is not None  # the learner answers every request at once
            replies.append((identity, reply))
            served += 1
        if replies and self.transition_log is not None:
            self.transition_log.sync()
        for identity, reply in replies:
            try:
                self._socket.send_multipart([identity, reply.SerializeToString()], flags=zmq.NOBLOCK)
            except zmq.Again:
                log.warning("reply to actor dropped: not reading")
        return served

    def _dispatch(self, envelope: pb.Envelope) -> pb.Envelope:
        """The reply to a checked request (:func:`answer_request` checked its version and type)."""
        kind = envelope.WhichOneof("body")
        reply = pb.Envelope(request_id=envelope.request_id)
        if kind == "actor_hello":
            reply.learner_hello.CopyFrom(self._hello(envelope.actor_hello))
        elif kind == "transitions":
            if envelope.transitions.actor_id not in self.actors:
                raise ProtocolError(pb.ERROR_UNEXPECTED_MESSAGE, "transitions: send an actor_hello first")
            reply.transition_ack.CopyFrom(self.ingest(envelope.transitions))
        else:  # weights_request
            reply.weights.version = self.weights_version
            reply.weights.learner_updates = self.learner_updates
            if envelope.weights_request.have_version < self.weights_version:
                reply.weights.safetensors = self._weights
        return reply

    def _hello(self, hello: pb.ActorHello) -> pb.LearnerHello:
        if not hello.actor_id:
            raise ProtocolError(pb.ERROR_INVALID_ARGUMENT, "actor_hello.actor_id: empty", "actor_hello.actor_id")
        spaces = spaces_from_pb(hello.spaces)
        if spaces.digest() != hello.spaces_hash:
            raise ProtocolError(pb.ERROR_INVALID_ARGUMENT, "actor_hello.spaces_hash does not match its spaces")
        if self.spaces is None:
            self.spaces = spaces
            if self._on_spaces is not None:
                self._on_spaces(spaces)
        elif spaces.digest() != self.spaces.digest():
            raise ProtocolError(pb.ERROR_INCOMPATIBLE,
                                f"actor {hello.actor_id!r} acts in spaces {spaces.digest()}, this learner trains "
                                f"on {self.spaces.digest()}: observation or action fields differ")
        stats = self._stats(hello.actor_id)
        reply = pb.LearnerHello(learner_session=self.session, weights_version=self.weights_version)
        if stats.acked is not None:
            reply.has_acked = True
            reply.acked_episode, reply.acked_step = stats.acked
        log.info("actor %r connected (stream %d, %d transitions held)", hello.actor_id, stats.stream_id, stats.accepted)
        return reply

    def close(self) -> None:
        self._socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        if self.transition_log is not None:
            self.transition_log.close()
