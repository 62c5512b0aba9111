"""The operator's side of the acting loop: events, pause, emergency stop, and the binding table.

:class:`OperatorControl` collects :class:`~hardware_configs.teleop.OperatorEvent` s from two places,
in the order they happened: the ``info["operator_events"]`` of each step (the
:class:`~actor.intervention.InterventionWrapper` reads the device inside ``step``) and direct reads
of the teleop device (:meth:`OperatorControl.poll`), which the acting loop makes before every step,
after every reset and, while it is paused or stopped, continuously. Nothing ever waits on a
keyboard with ``input()``: devices are read without blocking.

What each event does (applied by the acting loop, see :mod:`actor.acting`):

================  ==================================================================================
MARK_SUCCESS      end the episode now as a success: the last executed step is stored with
                  ``terminated = True`` and its reward replaced by ``SUCCESS_REWARD`` (1.0), as
                  HIL-SERL's operator success mark (reward 1 and done); the summary says success
MARK_FAILURE      end the episode now as a failure: the last step is stored with ``truncated = True``
                  (reward and ``terminated`` unchanged, so the learner still bootstraps from it)
RERECORD          discard the episode: its last step is not sent, the summary says ``discarded`` and
                  the learner drops the episode's transitions from its buffers; it is left out of
                  every success and return statistic. The next episode starts
PAUSE_TOGGLE      pause between steps (no ``env.step``; the robot server's watchdog holds the arm) or
                  continue. If the pause outlasted ``robot.safety.watchdog_ms`` the server held the
                  arm, so the episode is cut (last step ``truncated``) and a fresh one starts;
                  a shorter pause continues the episode
EMERGENCY_STOP    at once (the moment it is read): a ``HoldRequest`` to the robot server, which holds
                  the arm and refuses every reset/step until released; the loop stops acting
RESUME            leave a pause, or release an emergency stop (``ReleaseRequest``) and go on; after an
                  emergency stop the interrupted episode is cut and a fresh one starts
================  ==================================================================================

While paused or stopped the success/failure/re-record marks still apply to the episode in progress
(its last step is held back until the loop knows what happens to it); the loop stays paused. Marks
that make no sense at that moment (no step taken yet in the episode, between episodes) are ignored
with a log line; ``PAUSE_TOGGLE`` during an emergency stop is ignored with a log line (``RESUME``
leaves it). No event is dropped silently, and events that arrive during a reset are applied right
after it. A step or reset that the robot refuses because someone else emergency-stopped it puts the
loop in the stopped state too, until ``RESUME``.

While waiting, the loop keeps the robot link alive with ``observe`` requests (no motion), so the
server keeps it as its controller.

:func:`binding_rows` / :func:`format_bindings` render a device config's key and button mapping as
a short table, printed when a session starts.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import gymnasium as gym
import numpy as np

from actor.teleop import TeleopDevice, TeleopReading
from hardware_configs.teleop import (
    MOTION_AXES,
    AnalogMotion,
    ButtonGripper,
    GamepadTeleopConfig,
    KeyboardTeleopConfig,
    OperatorEvent,
    SimulatedOperatorConfig,
    SpaceMouseTeleopConfig,
    TeleopConfig,
)

log = logging.getLogger("steerl.operator")

# The reward of a step the operator marked as a success (HIL-SERL: the success label is reward 1).
SUCCESS_REWARD = 1.0
# How often a paused or stopped loop reads the device, reports progress and pings the robot.
WAIT_POLL_S = 0.02
REPORT_EVERY_S = 0.25
KEEPALIVE_EVERY_S = 1.0


class EpisodeEnd(enum.Enum):
    """Why the operator (rather than the task) ended an episode."""

    SUCCESS = "success"          # MARK_SUCCESS
    FAILURE = "failure"          # MARK_FAILURE
    DISCARD = "discard"          # RERECORD
    INTERRUPTED = "interrupted"  # an emergency stop, or a pause the robot's watchdog held the arm through


class OperatorState(enum.Enum):
    """Whether the acting loop may command the robot."""

    RUNNING = "running"
    PAUSED = "paused"
    EMERGENCY_STOPPED = "e-stopped"


_LABELS = {OperatorEvent.MARK_SUCCESS: EpisodeEnd.SUCCESS, OperatorEvent.MARK_FAILURE: EpisodeEnd.FAILURE,
           OperatorEvent.RERECORD: EpisodeEnd.DISCARD}


def find_teleop_device(env: gym.Env) -> TeleopDevice | None:
    """The device of the first :class:`~actor.intervention.InterventionWrapper` around ``env``."""
    from actor.intervention import find_intervention_wrapper

    wrapper = find_intervention_wrapper(env)
    return wrapper.device if wrapper is not None else None


class OperatorControl:
    """Operator events, pause and emergency stop for one acting loop (see the module docstring).

    ``device``: read directly between steps (None: events come only from ``info``). ``env``: the
    loop's env; its innermost env's ``emergency_stop`` / ``release_emergency_stop`` (a
    :class:`~actor.env.RobotEnv`) latch the stop on the robot side, and its link's ``observe``
    keeps the link alive while waiting. ``watchdog_s``: the robot server's watchdog period.
    ``sources``: more places events come from, read on every :meth:`poll` after the device (the
    operator console's buttons: :meth:`actor.console.ConsoleLink.read_events`).
    """

    def __init__(self, device: TeleopDevice | None, env: gym.Env, watchdog_s: float,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 sources: Iterable[Callable[[], Iterable[OperatorEvent | str]]] = ()) -> None:
        self.device = device
        self.sources = list(sources)
        # The robot's status as its last reply said (emergency_stopped, safety counters...).
        self.robot_info: dict[str, float] = {}
        self._robot = env.unwrapped
        self._watchdog_s = watchdog_s
        self._clock = clock
        self._sleep = sleep
        self._queue: collections.deque[OperatorEvent] = collections.deque()
        self._state = OperatorState.RUNNING
        self._interrupted = False
        self._last_command_s = clock()
        self._device_error_logged = False
        self._keepalive_error_logged = False
        self.events_seen: collections.Counter[str] = collections.Counter()
        self.events_ignored = 0

    # -- state ------------------------------------------------------------------------------------
    @property
    def state(self) -> OperatorState:
        return self._state

    @property
    def pending_events(self) -> tuple[OperatorEvent, ...]:
        """Events received and not applied yet, oldest first."""
        return tuple(self._queue)

    def begin_episode(self) -> None:
        """A reset just commanded the robot: a fresh episode, nothing interrupted yet."""
        self._interrupted = False
        self.note_command()

    def note_command(self) -> None:
        """The robot was just commanded (a step): the watchdog's period restarts now."""
        self._last_command_s = self._clock()

    # -- input ------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Read the device and the other sources directly (never blocks) and take in their events."""
        for source in self.sources:
            self.receive(source())
        if self.device is None:
            return
        try:
            reading: TeleopReading = self.device.read()
        except Exception as error:  # noqa: BLE001 - a broken device must not stop the loop
            if not self._device_error_logged:
                log.error("teleop device %s raised %s: %s", self.device.name, type(error).__name__, error)
                self._device_error_logged = True
            return
        self.receive(reading.events)

    def note_robot_info(self, info: dict) -> None:
        """Keep the robot's status from a reply's info (its numeric entries)."""
        self.robot_info = {key: float(value) for key, value in info.items()
                           if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)}

    def receive(self, events: Iterable[OperatorEvent | str]) -> None:
        """Take in events (members or their names, as in ``info["operator_events"]``), oldest first.
        An emergency stop acts at once; the others wait for :meth:`service`."""
        for item in events:
            try:
                event = item if isinstance(item, OperatorEvent) else OperatorEvent[str(item)]
            except KeyError:
                log.warning("unknown operator event %r ignored", item)
                self.events_ignored += 1
                continue
            self.events_seen[event.name] += 1
            if event is OperatorEvent.EMERGENCY_STOP:
                self.emergency_stop("operator emergency stop")
            elif event is OperatorEvent.INTERVENE_TOGGLE:
                continue  # the device itself switched who steers; nothing for the loop to do
            else:
                self._queue.append(event)

    def emergency_stop(self, reason: str) -> None:
        """Stop acting and make the robot hold and refuse motion (a ``HoldRequest``) right now."""
        already = self._state is OperatorState.EMERGENCY_STOPPED
        self._state = OperatorState.EMERGENCY_STOPPED
        self._interrupted = True
        if getattr(self._robot, "supports_emergency_stop", False):
            try:
                self.note_robot_info(self._robot.emergency_stop(reason))
            except Exception as error:  # noqa: BLE001 - the loop stays stopped whatever the link does
                log.error("EMERGENCY STOP: the robot did not confirm the hold (%s: %s); the acting loop "
                          "sends nothing, so the robot's watchdog holds the arm", type(error).__name__, error)
                return
            if not already:
                log.warning("EMERGENCY STOP: robot held, motion refused until RESUME")
        elif not already:
            log.warning("EMERGENCY STOP: this env has no robot-side stop; the acting loop commands nothing "
                        "until RESUME")

    def robot_refused(self, message: str) -> None:
        """The robot refused motion because it is emergency-stopped (by this or another client)."""
        if self._state is not OperatorState.EMERGENCY_STOPPED:
            log.warning("the robot is emergency-stopped (%s); press RESUME to release it and go on", message)
        self._state = OperatorState.EMERGENCY_STOPPED
        self._interrupted = True

    # -- applying events --------------------------------------------------------------------------
    def service(self, episode_running: bool, steps_taken: int,
                report: Callable[[OperatorState], None] | None = None) -> EpisodeEnd | None:
        """Apply the queued events, waiting (reading the device, never stepping) while paused or
        emergency-stopped. Returns how the operator ended the running episode, or None to go on.

        ``episode_running``: an episode was reset and not finished; ``steps_taken``: its steps so
        far (labels need one). Returns :attr:`EpisodeEnd.INTERRUPTED` when the episode cannot go on
        after the wait (emergency stop, or a pause longer than the watchdog period).
        """
        waited = False
        last_report = last_keepalive = self._clock()
        while True:
            end = self._apply_queued(episode_running, steps_taken)
            if end is not None:
                return end
            if self._state is OperatorState.RUNNING:
                if waited and episode_running and self._clock() - self._last_command_s >= self._watchdog_s:
                    self._interrupted = True
                if episode_running and self._interrupted:
                    self._interrupted = False
                    return EpisodeEnd.INTERRUPTED
                return None
            if not waited and report is not None:
                report(self._state)
            waited = True
            self._sleep(WAIT_POLL_S)
            self.poll()
            now = self._clock()
            if report is not None and now - last_report >= REPORT_EVERY_S:
                report(self._state)
                last_report = now
            if now - last_keepalive >= KEEPALIVE_EVERY_S:
                self._keepalive()
                last_keepalive = now

    def _apply_queued(self, episode_running: bool, steps_taken: int) -> EpisodeEnd | None:
        while self._queue:
            event = self._queue.popleft()
            if event in _LABELS:
                if episode_running and steps_taken > 0:
                    log.info("operator: %s", event.name)
                    return _LABELS[event]
                self._ignore(event, "no step of an episode to apply it to yet")
            elif event is OperatorEvent.PAUSE_TOGGLE:
                if self._state is OperatorState.EMERGENCY_STOPPED:
                    self._ignore(event, "emergency-stopped: RESUME releases the stop")
                elif self._state is OperatorState.PAUSED:
                    self._state = OperatorState.RUNNING
                    log.info("operator: resumed")
                else:
                    self._state = OperatorState.PAUSED
                    log.info("operator: paused (the robot's watchdog holds the arm)")
            elif event is OperatorEvent.RESUME:
                if self._state is OperatorState.EMERGENCY_STOPPED:
                    self._release()
                elif self._state is OperatorState.PAUSED:
                    self._state = OperatorState.RUNNING
                    log.info("operator: resumed")
                else:
                    self._ignore(event, "not paused or stopped")
            else:  # pragma: no cover - receive() keeps the others out of the queue
                self._ignore(event, "not applicable")
        return None

    def _release(self) -> None:
        if getattr(self._robot, "supports_emergency_stop", False):
            try:
                self.note_robot_info(self._robot.release_emergency_stop())
            except Exception as error:  # noqa: BLE001 - stay stopped, say so, let the operator retry
                log.error("RESUME: the robot did not release its emergency stop (%s: %s); still stopped, "
                          "press RESUME again", type(error).__name__, error)
                return
        self._state = OperatorState.RUNNING
        log.warning("emergency stop released: acting again")

    def _ignore(self, event: OperatorEvent, why: str) -> None:
        self.events_ignored += 1
        log.info("operator event %s ignored: %s", event.name, why)

    def _keepalive(self) -> None:
        """A no-motion request so the robot server keeps this client as its controller."""
        link = getattr(self._robot, "link", None)
        observe = getattr(link, "observe", None)
        if observe is None:
            return
        try:
            _, info = observe()
            self.note_robot_info(info)
        except Exception as error:  # noqa: BLE001 - a dead link shows at the next step; just say so once
            if not self._keepalive_error_logged:
                log.warning("robot link keep-alive failed while waiting: %s", error)
                self._keepalive_error_logged = True


# --- binding tables ---------------------------------------------------------------------------------

EVENT_HELP = {
    OperatorEvent.MARK_SUCCESS: "mark success: end the episode, last reward 1, terminal",
    OperatorEvent.MARK_FAILURE: "mark failure: end the episode (truncated)",
    OperatorEvent.RERECORD: "re-record: discard this episode (the learner drops it)",
    OperatorEvent.PAUSE_TOGGLE: "pause / continue between steps (the arm is held)",
    OperatorEvent.EMERGENCY_STOP: "EMERGENCY STOP: the robot holds and refuses motion until resume",
    OperatorEvent.RESUME: "resume after a pause or an emergency stop",
}

_INTERVENE_HELP = {
    "deadband": "the operator steers while any motion input is outside the dead-band or a gripper input is held",
    "hold_button": "the operator steers while the intervene input is held",
    "toggle": "the intervene input takes over / hands back",
}


def _event_rows(events: dict[str, Any], describe: Callable[[Any], str]) -> list[tuple[str, str]]:
    rows = []
    for event in OperatorEvent:
        if event.value in events:
            rows.append((describe(events[event.value]), EVENT_HELP.get(event, event.value)))
    return rows


def _gripper_rows(gripper: Any, describe: Callable[[Any], str]) -> list[tuple[str, str]]:
    return [(describe(getattr(gripper, kind)), f"gripper {kind}") for kind in ("close", "open", "toggle")
            if getattr(gripper, kind) is not None]


def _analog_rows(motion: AnalogMotion, channel: str) -> list[tuple[str, str]]:
    rows = []
    for axis in MOTION_AXES:
        for binding in getattr(motion, axis):
            if binding.source == "axis":
                source = f"{channel} {binding.index}"
            else:  # hat_x / hat_y: one direction of a hat (the d-pad)
                source = f"hat {binding.index} {binding.source[-1]}"
            rows.append((source, f"move {axis} (scale {binding.scale:g})"))
    return rows


def binding_rows(config: TeleopConfig) -> list[tuple[str, str]]:
    """(input, what it does) for every input a teleop config binds, motion first, then the gripper,
    the intervene input and the operator events."""
    if isinstance(config, KeyboardTeleopConfig):
        rows = []
        for axis in MOTION_AXES:
            keys = getattr(config.motion, axis)
            if keys is not None:
                rows.append((f"{keys.plus} / {keys.minus}", f"move {axis} + / -"
                             + ("" if keys.scale == 1.0 else f" (x{keys.scale:g})")
                             + (" (yaw tasks only)" if axis == "yaw" else "")))
        rows += _gripper_rows(config.gripper, str)
        if config.intervene_key is not None:
            rows.append((config.intervene_key, f"intervene ({config.intervene})"))
        return rows + _event_rows(config.events, str)
    if isinstance(config, (GamepadTeleopConfig, SpaceMouseTeleopConfig)):
        channel = "axis" if isinstance(config, GamepadTeleopConfig) else "channel"
        button = (lambda number: f"button {number}")
        rows = _analog_rows(config.motion, channel)
        gripper: ButtonGripper = config.gripper
        rows += _gripper_rows(gripper, button)
        if config.intervene_button is not None:
            rows.append((button(config.intervene_button), f"intervene ({config.intervene})"))
        return rows + _event_rows(config.events, button)
    if isinstance(config, SimulatedOperatorConfig):
        return [("(scripted)", f"takes over after {config.patience_steps} steps without progress on the "
                               f"task, steers {config.hold_steps} steps, at most "
                               f"{config.max_episode_share:.0%} of an episode")]
    return []


def format_bindings(config: TeleopConfig, name: str = "") -> str:
    """The bindings of a teleop config as a short plain-text table (the session prints it at start)."""
    device = getattr(config, "device", type(config).__name__)
    title = f"teleop {name}" + (f" ({device})" if name and name != device else "") if name else f"teleop {device}"
    mode = getattr(config, "intervene", None)
    if mode is not None:
        title += f": {_INTERVENE_HELP.get(mode, mode)}"
    rows = binding_rows(config)
    if not rows:
        return title
    width = max(len(key) for key, _ in rows)
    lines = [title] + [f"  {key:<{width}}  {what}" for key, what in rows]
    bound = {event.value for event in OperatorEvent} & set(getattr(config, "events", {}) or {})
    missing = [event.name for event in EVENT_HELP if event.value not in bound]
    if missing and not isinstance(config, SimulatedOperatorConfig):
        lines.append(f"  (not bound on this device: {', '.join(missing)})")
    return "\n".join(lines)
