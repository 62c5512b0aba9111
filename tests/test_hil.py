"""Human in the loop, end to end: interventions and operator events through the acting loop.

The PyBullet pick_cube cell runs in-process; a real :class:`~learner.learner.Learner` serves on a
thread behind real ZeroMQ sockets; the keyboard is driven through an ``os.pipe()`` (the device's
real input path); the emergency stop goes over loopback sockets to a robot server with the
kinematic backend.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from actor.acting import ActingLoop
from actor.env import RobotEmergencyStopped, ZmqRobotLink, make_env
from actor.intervention import InterventionWrapper
from actor.learner_link import LearnerLink
from actor.operator import SUCCESS_REWARD, OperatorState, format_bindings
from actor.simulated_operator import SimulatedOperator
from actor.teleop import KeyboardTeleop
from actor.video import EpisodeVideoRecorder
from hardware_configs.loader import ConfigError
from hardware_configs.schema import SessionConfig, load_config
from hardware_configs.teleop import load_teleop_config
from learner.learner import Learner, latest_checkpoint
from learner.service import LearnerService
from tools.session import progress_line
from transport import steerl_pb2 as pb
from transport.spaces import FieldSpec, RobotSpaces

from conftest import configure, free_tcp_address, running_server

TIMEOUT_S = 10.0


# --- helpers ------------------------------------------------------------------------------------------

def pick_cube_config(**robot_safety) -> SessionConfig:
    """pick_cube in-process, random actions throughout, a small learner that stores but never trains."""
    config = load_config("sim_panda_pick_cube")
    sac = dataclasses.replace(config.learner.sac, hidden_dims=(32, 32), batch_size=32)
    learner = dataclasses.replace(config.learner, address=free_tcp_address(), learning_starts=10**6,
                                  replay_capacity=5000, intervention_capacity=1000, checkpoint_every_updates=10**6,
                                  num_threads=1, device="cpu", sac=sac)
    actor = dataclasses.replace(config.actor, random_steps=10**6, eval_every_episodes=0, max_steps_per_update=0.0)
    robot = config.robot
    if robot_safety:
        robot = dataclasses.replace(robot, safety=dataclasses.replace(robot.safety, **robot_safety))
    return dataclasses.replace(config, robot=robot, learner=learner, actor=actor,
                               env=dataclasses.replace(config.env, connection="inproc"))


def keyboard(read_fd: int) -> KeyboardTeleop:
    config = dataclasses.replace(load_teleop_config("keyboard"), key_hold_s=0.05, key_repeat_hold_s=0.02)
    return KeyboardTeleop(config, 4, fd=read_fd)


def wait_until(predicate, timeout_s: float = TIMEOUT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class KeyScript(gym.Wrapper):
    """Types keys into the keyboard's pipe at (episode, step) points (step -1: right after the reset
    returns, i.e. while the loop is resetting) and waits until the device thread has taken them in.
    Records what each step reported. Wraps the InterventionWrapper, so a key typed at step k is read
    by that very step."""

    def __init__(self, env: gym.Env, device: KeyboardTeleop, write_fd: int,
                 script: dict[tuple[int, int], bytes]) -> None:
        super().__init__(env)
        self.device = device
        self.write_fd = write_fd
        self.script = dict(script)
        self.episode = -1
        self.step_index = 0
        self.steps = 0
        self.records: list[dict] = []  # per step: episode, step, intervened, executed action
        self._last_typed: dict[bytes, float] = {}

    def reset(self, **kwargs):
        result = self.env.reset(**kwargs)
        self.episode += 1
        self.step_index = 0
        self._type((self.episode, -1))
        return result

    def step(self, action):
        self._type((self.episode, self.step_index))
        result = self.env.step(action)
        info = result[4]
        self.records.append({"episode": self.episode, "step": self.step_index, "intervened": info["intervened"],
                             "executed": info["executed_action"].copy(), "reward": result[1],
                             "events": info["operator_events"]})
        self.step_index += 1
        self.steps += 1
        return result

    def _type(self, when: tuple[int, int]) -> None:
        data = self.script.pop(when, None)
        if data is None:
            return
        # The same key again within the hold time would read as the terminal's auto-repeat.
        time.sleep(max(0.0, self._last_typed.get(data, -1.0) + 0.1 - time.monotonic()))
        self._last_typed[data] = time.monotonic()
        os.write(self.write_fd, data)
        wait_until(lambda: self._taken_in(data), what=f"the keyboard to read {data!r}")

    def _taken_in(self, data: bytes) -> bool:
        with self.device._lock:  # the device thread has decoded the key: an event or a held motion key
            return bool(self.device._events) or (data in (b"w", b"s") and self.device._active)


class RecordingLink:
    """Stands in for a LearnerLink: keeps what the loop ships."""

    connected = True
    learner_updates = 0
    latency_ms = None

    def __init__(self) -> None:
        self.transitions: list[dict] = []
        self.summaries: list[pb.EpisodeSummary] = []

    def submit(self, episode, step, observation, action, reward, next_observation, terminated, truncated,
               intervened=False) -> None:
        self.transitions.append({"episode": episode, "step": step, "action": np.asarray(action), "reward": reward,
                                 "terminated": terminated, "truncated": truncated, "intervened": intervened})

    def episode_finished(self, summary: pb.EpisodeSummary) -> None:
        self.summaries.append(summary)

    def take_policy(self):
        return None


class LearnerThread:
    """A real Learner on a thread: ``stop()`` ends it the normal way (final checkpoint);
    ``crash()`` only stops serving and closes its sockets and files, like a killed process."""

    def __init__(self, config: SessionConfig, run_dir: Path, serve_only: bool = False) -> None:
        self.learner = Learner(config, run_dir)
        self._halt = threading.Event()
        self.thread = threading.Thread(target=self._serve if serve_only else self.learner.run, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._halt.is_set():
            self.learner.service.poll(timeout_ms=5)

    def stop(self) -> None:
        self.learner.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()

    def crash(self) -> None:
        self._halt.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.learner.close()


def connect(config: SessionConfig, env: gym.Env) -> tuple[ActingLoop, LearnerLink]:
    spaces = RobotSpaces.from_gym(env.observation_space, env.action_space).select(config.learner.observation_keys)
    link = LearnerLink(config.learner.address, "actor-hil", spaces)
    assert link.wait_for_hello(TIMEOUT_S) is not None
    return ActingLoop(config, env, link, tuple(spaces.observation)), link


def wait_for_rows(learner: Learner, count: int) -> None:
    wait_until(lambda: learner.online is not None and learner.online.transitions_added >= count,
               what=f"{count} transitions at the learner")


# --- interventions ----------------------------------------------------------------------------------

def test_simulated_operator_interventions_reach_both_buffers_with_the_executed_actions(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = pick_cube_config()
    learner = LearnerThread(config, tmp_path / "run")
    env = make_env(config)
    operator = SimulatedOperator(load_teleop_config("simulated_operator"), config.robot)
    records: list[dict] = []

    class Record(gym.Wrapper):
        def step(self, action):
            result = self.env.step(action)
            records.append({"intervened": result[4]["intervened"], "executed": result[4]["executed_action"].copy(),
                            "policy": np.asarray(action, np.float32).copy()})
            return result

    loop, link = connect(config, Record(InterventionWrapper(env, operator)))
    try:
        loop.run(250)
        assert link.flush(TIMEOUT_S)
        wait_for_rows(learner.learner, loop.stats.env_steps)
        line = progress_line(loop.stats, link, 0.0)
        latency = link.latency_ms
    finally:
        link.close()
        learner.stop()
        env.close()  # (the simulated operator has no thread to stop)

    intervened = [r for r in records if r["intervened"]]
    assert 0 < len(intervened) < len(records) == loop.stats.env_steps
    online, interventions = learner.learner.online, learner.learner.interventions
    assert len(online) == len(records) and len(interventions) == len(intervened)
    # What the learner stores is what the robot executed (the expert's action), not the policy's.
    saved = latest_checkpoint(tmp_path / "run") / "interventions"
    np.testing.assert_array_equal(np.load(saved / "actions.npy"), np.stack([r["executed"] for r in intervened]))
    assert all(not np.array_equal(r["executed"], r["policy"]) for r in intervened)
    assert np.load(saved / "intervened.npy").all()
    assert int(np.load(saved.parent / "online" / "intervened.npy").sum()) == len(intervened)

    # The per-episode rate: in the actor's stats, on the progress line and in TensorBoard.
    rates = list(loop.stats.recent_intervention_rates)
    assert len(rates) == loop.stats.episodes and 0 < loop.stats.intervention_rate <= 0.5
    assert f"interv {loop.stats.intervention_rate:4.0%}" in line and "link " in line
    assert latency is not None and 0 < latency < 2000
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [event.value for event in events.Scalars("train/intervention_rate")]
    np.testing.assert_allclose(sorted(logged), sorted(rates), rtol=1e-6)


def test_evaluation_episodes_measure_the_policy_alone() -> None:
    config = pick_cube_config()
    env = make_env(config)
    operator = SimulatedOperator(load_teleop_config("simulated_operator"), config.robot)
    flags: list[float] = []

    class Record(gym.Wrapper):
        def step(self, action):
            result = self.env.step(action)
            flags.append(result[4]["intervened"])
            return result

    loop = ActingLoop(config, Record(InterventionWrapper(env, operator)), None, tuple(config.learner.observation_keys))
    try:
        loop.run_episode()  # random actions: the simulated operator takes over
        assert any(flags)
        del flags[:]
        loop.evaluate(2)
        assert flags and not any(flags)
    finally:
        env.close()


# --- operator events ---------------------------------------------------------------------------------

def test_rerecord_mid_episode_drops_exactly_that_episode_from_the_learner(tmp_path, key_pipe) -> None:
    read_fd, write_fd = key_pipe
    config = pick_cube_config()
    learner = LearnerThread(config, tmp_path / "run", serve_only=True)
    env = make_env(config)
    device = keyboard(read_fd)
    # Episode 0: the operator steers a little (w). Episode 1: steers, then asks to re-record at step 40.
    script = KeyScript(InterventionWrapper(env, device), device, write_fd,
                       {(0, 10): b"w", (1, 5): b"w", (1, 40): b"z"})
    loop, link = connect(config, script)
    outcomes = []
    try:
        for _ in range(3):
            loop.run_episode()
            outcomes.append(loop.last_episode)
        assert link.flush(TIMEOUT_S)  # everything acknowledged: the learner has taken it all in
        saved = learner.learner.online.save(tmp_path / "online")
    finally:
        link.close()
        learner.crash()  # no final checkpoint: everything is in the transition log only
        script.close()

    assert [o.discarded for o in outcomes] == [False, True, False]
    assert outcomes[1].length == 41 and outcomes[1].success is False
    assert loop.stats.recent_successes == collections.deque() and learner.learner.episodes_discarded == 1
    kept = [o for o in outcomes if not o.discarded]
    online, interventions = learner.learner.online, learner.learner.interventions
    actor = learner.learner.service.actors["actor-hil"]
    assert actor.discarded_episodes == [1]
    # Steps 0..39 of episode 1 left the actor (step 40 never did): those stored before the discard
    # summary arrived were taken out again, those arriving with or after it were never stored.
    stored_of_discarded = online.transitions_added - sum(o.length for o in kept)
    assert online.counters["discarded"] == stored_of_discarded
    assert stored_of_discarded + actor.discarded_transitions == 40
    assert len(online) == sum(o.length for o in kept)
    steered = {e: sum(r["intervened"] for r in script.records if r["episode"] == e) for e in range(3)}
    assert steered[0] > 0 and steered[1] > 0
    assert len(interventions) == steered[0] + steered[2]
    assert interventions.transitions_added - interventions.counters["discarded"] == steered[0] + steered[2]
    # The remaining rows are exactly episodes 0 and 2, in order.
    valid = np.load(saved / "valid.npy")
    first = outcomes[0].length
    assert valid[:first].all() and not valid[first:first + stored_of_discarded].any()
    assert valid[first + stored_of_discarded:].all() and valid.sum() == len(online)

    # A learner restarted after a crash replays its transition log: the episode is discarded again.
    spaces = RobotSpaces.from_gym(env.observation_space, env.action_space).select(config.learner.observation_keys)
    replay_config = dataclasses.replace(config, learner=dataclasses.replace(config.learner, address=free_tcp_address()))
    replayed = Learner(replay_config, tmp_path / "run", resume=True, spaces=spaces)
    try:
        assert replayed.online.transitions_added == online.transitions_added
        assert len(replayed.online) == sum(o.length for o in kept)
        assert len(replayed.interventions) == steered[0] + steered[2]
    finally:
        replayed.close()


def test_late_and_resent_transitions_of_a_discarded_episode_are_never_stored(tmp_path) -> None:
    from learner.transition_log import TransitionLog
    from transport.codec import encode_transition

    spaces = RobotSpaces(observation={"x": FieldSpec("float32", (2,), -1.0, 1.0)},
                         action=FieldSpec("float32", (1,), -1.0, 1.0))
    stored: list[tuple[int, int]] = []
    discarded: list[tuple[int, int]] = []
    service = LearnerService(free_tcp_address(), TransitionLog(tmp_path / "log"),
                             on_transition=lambda stream, t: stored.append((t["episode"], t["step"])),
                             on_discard=lambda stream, episode: discarded.append((stream, episode)))
    service.set_spaces(spaces)

    def batch(episode: int, steps: range, discard: bool = False) -> pb.TransitionBatch:
        message = pb.TransitionBatch(actor_id="a")
        zero = {"x": np.zeros(2, np.float32)}
        for step in steps:
            encode_transition(message.transitions.add(), episode, step, zero, np.zeros(1, np.float32), 0.0, zero,
                              False, False)
        if discard:
            message.episodes.add(episode=episode, length=len(steps), discarded=True)
        return message

    try:
        service.ingest(batch(0, range(3)))
        # The summary overtook the end of its episode: steps 3..4 arrive with it, 5..6 after it.
        service.ingest(batch(0, range(3, 5), discard=True))
        ack = service.ingest(batch(0, range(5, 7)))
        assert ack.has_acked and (ack.acked_episode, ack.acked_step) == (0, 6)  # the actor may forget them
        resent = service.ingest(batch(0, range(0, 7)))
        assert resent.duplicates == 7 and resent.accepted == 0
        service.ingest(batch(1, range(2)))
        assert stored == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
        assert discarded == [(0, 0)]
    finally:
        service.close()
    # The discard is in the log: a replay discards again and still never stores the late steps.
    stored.clear()
    discarded.clear()
    replay = LearnerService(free_tcp_address(), TransitionLog(tmp_path / "log"),
                            on_transition=lambda stream, t: stored.append((t["episode"], t["step"])),
                            on_discard=lambda stream, episode: discarded.append((stream, episode)))
    replay.set_spaces(spaces)
    try:
        replay.replay_log()
        assert stored == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)] and discarded == [(0, 0)]
    finally:
        replay.close()


def test_success_and_failure_marks_end_the_episode_with_their_label(key_pipe, caplog) -> None:
    read_fd, write_fd = key_pipe
    config = pick_cube_config()
    env = make_env(config)
    device = keyboard(read_fd)
    # enter during the first reset makes no sense yet (ignored, logged); then enter at step 5 of
    # episode 0 (success) and x at step 7 of episode 1 (failure).
    script = KeyScript(InterventionWrapper(env, device), device, write_fd,
                       {(0, -1): b"\r", (0, 5): b"\r", (1, 7): b"x"})
    link = RecordingLink()
    loop = ActingLoop(config, script, link, tuple(config.learner.observation_keys))
    try:
        with caplog.at_level(logging.INFO, logger="steerl.operator"):
            first = loop.run_episode()
            second = loop.run_episode()
    finally:
        script.close()
    assert "MARK_SUCCESS ignored" in caplog.text

    assert first[1] == 6 and first[2] is True
    last = [t for t in link.transitions if t["episode"] == 0][-1]
    assert last["step"] == 5 and last["terminated"] and not last["truncated"] and last["reward"] == SUCCESS_REWARD
    assert link.summaries[0].success and not link.summaries[0].discarded
    assert first[0] == pytest.approx(sum(t["reward"] for t in link.transitions if t["episode"] == 0))

    assert script.records[5]["reward"] != SUCCESS_REWARD  # the env's reward was replaced by the label
    assert second[1] == 8 and second[2] is False
    episode_1 = [t for t in link.transitions if t["episode"] == 1]
    assert len(episode_1) == 8 and episode_1[-1]["truncated"] and not episode_1[-1]["terminated"]
    assert episode_1[-1]["reward"] == script.records[-1]["reward"]  # a failure mark keeps the reward
    for episode in (0, 1):
        steps = [t for t in link.transitions if t["episode"] == episode]
        assert not any(t["terminated"] or t["truncated"] for t in steps[:-1])
    assert not link.summaries[1].success
    assert dict(loop.stats.operator_ends) == {"success": 1, "failure": 1}


def test_pause_stops_stepping_and_resume_continues_or_starts_afresh(key_pipe) -> None:
    read_fd, write_fd = key_pipe
    config = pick_cube_config()  # the robot's watchdog holds the arm after 500 ms without a command
    assert config.robot.safety.watchdog_ms == 500
    env = make_env(config)
    device = keyboard(read_fd)
    # p while the first episode resets (applied right after it), p again at step 20 of episode 0.
    script = KeyScript(InterventionWrapper(env, device), device, write_fd, {(0, -1): b"p", (0, 20): b"p"})
    link = RecordingLink()
    loop = ActingLoop(config, script, link, tuple(config.learner.observation_keys))
    thread = threading.Thread(target=loop.run, args=(150,), daemon=True)
    thread.start()
    try:
        # Paused before the first step: nothing steps while paused.
        wait_until(lambda: loop.stats.operator_state == OperatorState.PAUSED.value, what="the pause")
        time.sleep(0.1)
        assert script.steps == 0 and loop.stats.env_steps == 0
        os.write(write_fd, b"g")  # RESUME well within the watchdog period: the episode goes on
        wait_until(lambda: script.steps >= 21, what="steps after the resume")
        # Paused at step 20, for longer than the watchdog: frozen, then the episode is cut.
        wait_until(lambda: loop.stats.operator_state == OperatorState.PAUSED.value, what="the second pause")
        frozen = script.steps
        time.sleep(0.6)
        assert script.steps == frozen == 21 and loop.stats.env_steps == 21
        os.write(write_fd, b"p")
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()
    finally:
        script.close()
    assert script.records[0]["episode"] == 0 and script.records[20]["episode"] == 0
    assert link.summaries[0].episode == 0 and link.summaries[0].length == 21
    cut = [t for t in link.transitions if t["episode"] == 0]
    assert len(cut) == 21 and cut[-1]["truncated"] and not cut[-1]["terminated"]
    assert loop.stats.operator_ends["interrupted"] == 1
    assert [t["step"] for t in link.transitions if t["episode"] == 1][:3] == [0, 1, 2]


def test_emergency_stop_over_sockets_refuses_motion_until_released(kinematic_config) -> None:
    with running_server(kinematic_config) as server:
        env = make_env(kinematic_config, client_name="actor")
        observer = ZmqRobotLink(kinematic_config, client_name="dashboard", role=pb.ROLE_OBSERVER)
        try:
            env.reset(seed=0)
            push = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
            before = env.step(push)[0]["tcp_pose"][:3].copy()
            info = env.emergency_stop("test")
            assert info["emergency_stopped"] == 1.0 and server.cell.emergency_stopped
            for _ in range(3):
                with pytest.raises(RobotEmergencyStopped, match="ERROR_EMERGENCY_STOPPED"):
                    env.step(push)
            with pytest.raises(RobotEmergencyStopped):
                env.reset(seed=1)
            observation, info = observer.observe()
            np.testing.assert_array_equal(observation["tcp_pose"][:3], before)
            assert info["emergency_stopped"] == 1.0
            with pytest.raises(Exception, match="not the controller"):
                observer.release_emergency_stop()  # observers may stop the robot, not release it
            observer.emergency_stop("dashboard button")  # idempotent, from any client
            assert env.release_emergency_stop()["emergency_stopped"] == 0.0
            after = env.step(push)[0]["tcp_pose"][:3]
            assert after[0] > before[0] + 0.005
        finally:
            observer.close()
            env.close()


def test_emergency_stop_key_holds_the_robot_server_until_resume(kinematic_config, key_pipe) -> None:
    read_fd, write_fd = key_pipe
    config = dataclasses.replace(kinematic_config, actor=dataclasses.replace(
        kinematic_config.actor, random_steps=10**6, eval_every_episodes=0))
    with running_server(config) as server:
        env = make_env(config, client_name="actor")
        observer = ZmqRobotLink(config, client_name="dashboard", role=pb.ROLE_OBSERVER)
        device = keyboard(read_fd)
        script = KeyScript(InterventionWrapper(env, device), device, write_fd, {(0, 10): b" "})
        link = RecordingLink()
        loop = ActingLoop(config, script, link, ())
        thread = threading.Thread(target=loop.run, args=(80,), daemon=True)
        thread.start()
        try:
            wait_until(lambda: server.cell.emergency_stopped, what="the hold at the robot server")
            wait_until(lambda: loop.stats.operator_state == OperatorState.EMERGENCY_STOPPED.value, what="the stop")
            tcp = observer.observe()[0]["tcp_pose"].copy()
            time.sleep(0.3)
            observation, info = observer.observe()
            assert info["emergency_stopped"] == 1.0 and script.steps == 11
            np.testing.assert_array_equal(observation["tcp_pose"], tcp)
            os.write(write_fd, b"g")  # RESUME: release, then a fresh episode
            thread.join(TIMEOUT_S)
            assert not thread.is_alive()
            assert not server.cell.emergency_stopped
        finally:
            observer.close()
            script.close()
    first = [t for t in link.transitions if t["episode"] == 0]
    assert len(first) == 11 and first[-1]["truncated"]
    assert loop.stats.operator_ends["interrupted"] == 1 and loop.stats.env_steps >= 80


# --- operator view ------------------------------------------------------------------------------------

def test_bindings_table_and_cli_flags() -> None:
    from tools.cli import _with_teleop, build_parser

    table = format_bindings(load_teleop_config("keyboard"), "keyboard")
    for expected in ("w / s", "space", "EMERGENCY STOP", "enter", "mark success", "re-record", "resume"):
        assert expected in table
    assert "not bound on this device" in format_bindings(load_teleop_config("spacemouse"), "spacemouse")
    args = build_parser().parse_args(["train", "--teleop", "keyboard", "--save-videos", "5"])
    assert args.teleop == "keyboard" and args.save_videos == 5
    assert build_parser().parse_args(["actor", "--teleop", "gamepad_xbox"]).teleop == "gamepad_xbox"
    config = load_config("sim_panda_pick_cube")
    assert config.actor.teleop == ""
    assert _with_teleop(config, "simulated_operator").actor.teleop == "simulated_operator"
    with pytest.raises(ConfigError, match="no_such_pad"):
        _with_teleop(config, "no_such_pad")


def test_save_videos_writes_every_nth_episode_per_camera(tmp_path) -> None:
    import cv2

    config = configure(backend="kinematic", cameras=[("front", 32, 24), ("wrist", 16, 16)])
    config = dataclasses.replace(config, env=dataclasses.replace(config.env, connection="inproc"),
                                 actor=dataclasses.replace(config.actor, random_steps=10**6, eval_every_episodes=0))
    env = make_env(config)
    recorder = EpisodeVideoRecorder(tmp_path / "videos", every=2, fps=config.robot.control.rate_hz)
    loop = ActingLoop(config, env, None, (), video=recorder)
    try:
        lengths = [loop.run_episode()[1] for _ in range(3)]
    finally:
        env.close()
    names = sorted(path.name for path in (tmp_path / "videos").iterdir())
    assert [name.rsplit("-", 1)[0] for name in names] == [
        "episode-000000-front", "episode-000000-wrist", "episode-000002-front", "episode-000002-wrist"]
    assert all(name.endswith(("-success.mp4", "-failure.mp4")) for name in names)
    capture = cv2.VideoCapture(str(tmp_path / "videos" / names[0]))
    frames = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        assert frame.shape == (24, 32, 3)
        frames += 1
    capture.release()
    assert frames == lengths[0] + 1  # the reset's image and one per step
