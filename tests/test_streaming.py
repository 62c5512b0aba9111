"""Actor -> learner streaming over real ZeroMQ sockets: acknowledged, deduplicated, durable.

Each observation carries its own (episode, step) so the tests can check that the learner ends up
with every submitted transition exactly once, whatever restarts happen in between.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from actor.learner_link import LearnerLink
from learner.service import LearnerService
from learner.transition_log import TransitionLog
from transport import steerl_pb2 as pb
from transport.spaces import FieldSpec, RobotSpaces

from conftest import free_tcp_address

SPACES = RobotSpaces(observation={"x": FieldSpec("float32", (2,), -1e6, 1e6)},
                     action=FieldSpec("float32", (1,), -1.0, 1.0))


class Learner:
    """A LearnerService polled on a thread, recording what it stores."""

    def __init__(self, address: str, log_dir, stored: list) -> None:
        self.stored = stored
        self.service = LearnerService(address, TransitionLog(log_dir), self._store)
        self.service.set_spaces(SPACES)
        self.replayed = self.service.replay_log()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _store(self, stream_id: int, transition: dict) -> None:
        episode, step = transition["observation"]["x"]
        self.stored.append((stream_id, int(episode), int(step)))

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.service.poll(timeout_ms=10)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.service.close()


def _submit_episode(link: LearnerLink, episode: int, length: int, bad_step: int | None = None) -> None:
    for step in range(length):
        observation = {"x": np.array([episode, step], np.float32)}
        next_observation = {"x": np.array([episode, step + 1], np.float32)}
        if step == bad_step:
            next_observation = {"x": np.array([np.nan, step + 1], np.float32)}
        link.submit(episode, step, observation, np.zeros(1, np.float32), 0.0, next_observation,
                    terminated=step == length - 1, truncated=False)


def test_every_transition_arrives_once_in_order(tmp_path) -> None:
    address, stored = free_tcp_address(), []
    learner = Learner(address, tmp_path / "log", stored)
    link = LearnerLink(address, "actor-a", SPACES)
    for episode in range(5):
        _submit_episode(link, episode, 40)
    assert link.flush(10)
    link.close()
    learner.stop()
    assert stored == [(0, e, s) for e in range(5) for s in range(40)]


def test_learner_restart_loses_and_duplicates_nothing(tmp_path) -> None:
    address, stored = free_tcp_address(), []
    learner = Learner(address, tmp_path / "log", stored)
    link = LearnerLink(address, "actor-a", SPACES, timeout_ms=300)
    for episode in range(3):
        _submit_episode(link, episode, 30)
    assert link.flush(10)
    learner.stop()  # the learner dies; the actor goes on acting
    for episode in range(3, 6):
        _submit_episode(link, episode, 30)
    assert link.pending == 90
    # A new learner process: nothing in memory, only its transition log on disk.
    restored: list = []
    learner = Learner(address, tmp_path / "log", restored)
    assert learner.replayed == 90
    assert link.flush(15)
    link.close()
    learner.stop()
    assert restored == [(0, e, s) for e in range(6) for s in range(30)]


def test_actor_restart_resumes_after_its_last_acknowledged_transition(tmp_path) -> None:
    address, stored = free_tcp_address(), []
    learner = Learner(address, tmp_path / "log", stored)
    first = LearnerLink(address, "actor-a", SPACES)
    _submit_episode(first, 0, 25)
    assert first.flush(10)
    first.close()
    second = LearnerLink(address, "actor-a", SPACES)
    hello = second.wait_for_hello(5)
    assert hello is not None and hello.has_acked and (hello.acked_episode, hello.acked_step) == (0, 24)
    # A restarted actor that re-sends what it had (e.g. from its own disk) creates no duplicates.
    _submit_episode(second, 0, 25)
    _submit_episode(second, 1, 25)
    assert second.flush(10)
    second.close()
    learner.stop()
    assert stored == [(0, e, s) for e in range(2) for s in range(25)]
    assert learner.service.actors["actor-a"].duplicates == 25


def test_bad_transitions_are_counted_and_never_stored(tmp_path) -> None:
    address, stored = free_tcp_address(), []
    learner = Learner(address, tmp_path / "log", stored)
    link = LearnerLink(address, "actor-a", SPACES)
    _submit_episode(link, 0, 10, bad_step=4)
    link.submit(1, 0, {"x": np.zeros(3, np.float32)}, np.zeros(1, np.float32), 0.0,
                {"x": np.zeros(2, np.float32)}, True, False)
    assert link.flush(10)
    link.close()
    learner.stop()
    assert (0, 0, 4) not in stored and len(stored) == 9
    assert link.rejected == 2
    reasons = learner.service.actors["actor-a"].rejected
    assert any("observation.x: expected float32(2,), got float32(3,)" in reason for reason in reasons)


def test_two_actors_get_their_own_streams(tmp_path) -> None:
    address, stored = free_tcp_address(), []
    learner = Learner(address, tmp_path / "log", stored)
    links = [LearnerLink(address, f"actor-{i}", SPACES) for i in range(2)]
    for episode in range(3):
        for link in links:
            _submit_episode(link, episode, 10)
    for link in links:
        assert link.flush(10)
        link.close()
    learner.stop()
    for stream in (0, 1):
        assert [(e, s) for st, e, s in stored if st == stream] == [(e, s) for e in range(3) for s in range(10)]


def test_weights_reach_the_actor_off_the_control_thread(tmp_path) -> None:
    address, stored = free_tcp_address(), []
    learner = Learner(address, tmp_path / "log", stored)
    loaded = []
    link = LearnerLink(address, "actor-a", SPACES, load_policy=lambda blob: loaded.append(blob) or blob)
    learner.service.publish(b"weights-v1", learner_updates=10)
    _submit_episode(link, 0, 5)  # an ack announces version 1; the link fetches it
    deadline = time.monotonic() + 5
    taken = None
    while taken is None and time.monotonic() < deadline:
        taken = link.take_policy()
        time.sleep(0.01)
    assert taken == (1, b"weights-v1")
    assert link.take_policy() is None  # nothing newer
    link.close()
    learner.stop()


def test_torn_log_record_is_skipped_with_a_warning(tmp_path, caplog) -> None:
    log = TransitionLog(tmp_path)
    log.append(pb.TransitionBatch(actor_id="a"))
    log.append(pb.TransitionBatch(actor_id="b"))
    log.close()
    segment = log.segments()[-1]
    segment.write_bytes(segment.read_bytes()[:-1])
    assert [batch.actor_id for batch in TransitionLog(tmp_path).replay()] == ["a"]
    assert "corrupt record" in caplog.text
