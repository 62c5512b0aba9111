"""The dashboard's link to the actor and the robot: telemetry in, JPEG frames, operator commands out.

:class:`TelemetryHub` runs one thread that subscribes to the actor's telemetry
(``dashboard.telemetry_address``, see :mod:`actor.console`) and keeps what the page shows: the
newest state, each camera's newest frame encoded as JPEG with OpenCV (once per frame, whatever the
number of open pages), the finished episodes for the plots and the learner's updates/s.

Commands go to the actor's command socket (``dashboard.command_address``) with ZeroMQ's
``IMMEDIATE`` option, so a press with no actor connected is refused at once (never queued for an
actor that connects later). An emergency stop goes two ways: as an ``EMERGENCY_STOP`` event to the
actor, and straight to the robot server as a ``HoldRequest`` from an observer connection, so the
arm is held even if the actor does not answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import zmq

from actor.console import CONSOLE_EVENTS, operator_command_frame
from hardware_configs.schema import SessionConfig
from transport import steerl_pb2 as pb
from transport.codec import ProtocolError, decode_tensor, parse_envelope

log = logging.getLogger("steerl.dashboard")

# Telemetry older than this means no actor is live.
LIVE_TIMEOUT_S = 3.0
# How long a button press waits for the actor's command connection before it is refused.
COMMAND_DELIVERY_TIMEOUT_MS = 1000
# The largest telemetry message accepted (camera images included).
MAX_TELEMETRY_BYTES = 64 * 1024 * 1024
MAX_EPISODES = 5000


class CommandRefused(RuntimeError):
    """A console command refused: malformed (``status`` 400, the message names the field) or not
    deliverable now (409: no actor connected)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Frame:
    """One camera's newest image as the page gets it."""

    camera: str
    sequence: int
    observed_unix_s: float
    jpeg: bytes
    width: int
    height: int


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """An RGB (or grey) uint8 image as JPEG bytes."""
    if image.dtype != np.uint8:
        raise ValueError(f"camera image: expected uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim != 2:
        raise ValueError(f"camera image: expected HxW, HxWx1 or HxWx3, got shape {image.shape}")
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("camera image: OpenCV could not encode it as JPEG")
    return encoded.tobytes()


class Notifier:
    """Wakes the page streams (asyncio) when the hub's thread has something new."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def _fire(self) -> None:
        if self._event is not None:
            event, self._event = self._event, asyncio.Event()
            event.set()

    def notify(self) -> None:
        """From any thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fire)

    async def wait(self, timeout_s: float) -> None:
        if self._event is None:
            self.bind(asyncio.get_running_loop())
        assert self._event is not None
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass


class TelemetryHub:
    """Telemetry, frames and commands for the dashboard (see the module docstring)."""

    def __init__(self, config: SessionConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.notifier = Notifier()
        self._context = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {}
        self._frames: dict[str, Frame] = {}
        self._episodes: dict[tuple[str, int], dict[str, Any]] = {}
        self._last_message_s: float | None = None
        self._actor_sequence: tuple[str, int] | None = None
        self._updates_window: list[tuple[float, int]] = []
        self.messages = 0
        self.malformed = 0
        self._commands = self._context.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.IMMEDIATE, 1)
        self._commands.setsockopt(zmq.SNDHWM, 16)
        self._commands.setsockopt(zmq.LINGER, 0)
        # The actor's telemetry can arrive before this connection's handshake has finished (two
        # independent TCP connections); a short send timeout rather than NOBLOCK bridges that gap
        # instead of refusing a button pressed in the first moments of a session.
        self._commands.setsockopt(zmq.SNDTIMEO, COMMAND_DELIVERY_TIMEOUT_MS)
        self._commands.connect(config.dashboard.command_address)
        self._command_lock = threading.Lock()
        self._robot = None
        self._robot_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="steerl-dashboard-telemetry", daemon=True)
        self._thread.start()

    # -- telemetry --------------------------------------------------------------------------------
    def _receive(self) -> None:
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 4)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_TELEMETRY_BYTES)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(self.config.dashboard.telemetry_address)
        try:
            while not self._stop.is_set():
                if not socket.poll(100, zmq.POLLIN):
                    continue
                frame = socket.recv()
                try:
                    self._take(frame)
                except (ProtocolError, ValueError) as error:
                    self.malformed += 1
                    log.warning("telemetry message dropped: %s", error)
                    continue
                self.notifier.notify()
        finally:
            socket.close(linger=0)

    def _take(self, frame: bytes) -> None:
        envelope = parse_envelope(frame, MAX_TELEMETRY_BYTES)
        if envelope.WhichOneof("body") != "console_telemetry":
            raise ProtocolError(pb.ERROR_UNEXPECTED_MESSAGE,
                                f"telemetry: expected console_telemetry, got {envelope.WhichOneof('body')}")
        message = envelope.console_telemetry
        if message.closing:  # the session ended: keep its last state, say it is over
            with self._lock:
                self._state["ended"] = True
                self._last_message_s = None
            return
        frames = {}
        for camera, tensor in message.images.items():
            image = decode_tensor(tensor, f"console_telemetry.images[{camera}]")
            frames[camera] = Frame(camera, message.sequence, message.observed_unix_s,
                                   encode_jpeg(image, self.config.dashboard.jpeg_quality),
                                   int(image.shape[1]), int(image.shape[0]))
        now = time.monotonic()
        state = {
            "actor_id": message.actor_id, "config_name": message.config_name, "mode": message.mode,
            "policy_name": message.policy_name, "sequence": message.sequence,
            "env_steps": message.env_steps, "total_steps": message.total_steps, "episode": message.episode,
            "episode_step": message.episode_step, "episode_return": message.episode_return,
            "operator_state": message.operator_state, "intervened": message.intervened,
            "action": [round(value, 4) for value in message.action], "evaluating": message.evaluating,
            "policy_version": message.policy_version, "mean_return": message.mean_return,
            "success_rate": message.success_rate, "intervention_rate": message.intervention_rate,
            "steps_per_s": message.steps_per_s,
            "eval_success_rate": message.eval_success_rate if message.has_eval else None,
            "learner_connected": message.learner_connected, "learner_updates": message.learner_updates,
            "link_latency_ms": message.link_latency_ms if message.link_latency_ms >= 0 else None,
            "robot": dict(message.robot), "operator_events": dict(message.operator_events),
            "ended": False,
        }
        with self._lock:
            if self._actor_sequence is not None and self._actor_sequence[0] == message.actor_id \
                    and message.sequence < self._actor_sequence[1]:
                self._episodes.clear()  # the same actor started again: a new session
                self._updates_window.clear()
            self._actor_sequence = (message.actor_id, message.sequence)
            self._state = state
            self._last_message_s = now
            self.messages += 1
            self._frames.update(frames)
            for episode in message.recent_episodes:
                self._episodes[(message.actor_id, episode.episode)] = {
                    "episode": episode.episode, "env_steps": episode.env_steps,
                    "episode_return": round(episode.episode_return, 4), "length": episode.length,
                    "success": episode.success, "intervention_rate": round(episode.intervention_rate, 4),
                    "evaluation": episode.evaluation, "discarded": episode.discarded, "ended_by": episode.ended_by}
            if len(self._episodes) > MAX_EPISODES:
                for key in sorted(self._episodes)[:len(self._episodes) - MAX_EPISODES]:
                    del self._episodes[key]
            self._updates_window.append((now, message.learner_updates))
            self._updates_window = [(t, u) for t, u in self._updates_window if now - t <= 5.0]

    @property
    def live(self) -> bool:
        """An actor's telemetry arrived within the last ``LIVE_TIMEOUT_S``."""
        with self._lock:
            return self._last_message_s is not None and time.monotonic() - self._last_message_s < LIVE_TIMEOUT_S

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows but the frames, as JSON-ready values."""
        with self._lock:
            state = dict(self._state)
            episodes = sorted(self._episodes.values(), key=lambda entry: (entry["env_steps"], entry["episode"]))
            window = list(self._updates_window)
            last = self._last_message_s
            cameras = sorted(self._frames)
        age = None if last is None else time.monotonic() - last
        updates_per_s = None
        if len(window) >= 2 and window[-1][0] > window[0][0]:
            updates_per_s = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
        return {"live": age is not None and age < LIVE_TIMEOUT_S, "telemetry_age_s": age, "actor": state,
                "episodes": episodes, "learner_updates_per_s": updates_per_s, "cameras": cameras}

    def frames(self) -> dict[str, Frame]:
        with self._lock:
            return dict(self._frames)

    # -- commands ---------------------------------------------------------------------------------
    def send_command(self, event: str = "", stop_session: bool = False, origin: str = "dashboard") -> dict[str, Any]:
        """Deliver a button press to the actor (and an emergency stop to the robot server too).
        Returns what happened; raises :class:`CommandRefused` when nothing could be delivered."""
        if event and event not in CONSOLE_EVENTS:
            raise CommandRefused(f"event: {event!r} is not one of {', '.join(CONSOLE_EVENTS)}")
        if bool(event) == stop_session:
            raise CommandRefused("set exactly one of event and stop_session")
        result: dict[str, Any] = {"event": event or "STOP_SESSION"}
        if event == "EMERGENCY_STOP":
            result["robot"] = self._hold_robot(origin)
        with self._command_lock:
            try:
                self._commands.send(operator_command_frame(event, stop_session, origin))
                result["actor"] = "delivered"
            except zmq.Again:
                result["actor"] = "no actor connected"
        if result["actor"] != "delivered" and not result.get("robot", {}).get("held"):
            raise CommandRefused(f"{result['event']}: no actor is connected to the console"
                                 + (f"; robot server: {result['robot']['error']}" if "robot" in result else ""),
                                 status=409)
        return result

    def _hold_robot(self, origin: str) -> dict[str, Any]:
        """A HoldRequest straight to the robot server (observer connection, opened on first use)."""
        if self.config.env.connection != "zmq":
            return {"held": False, "error": "the robot runs inside the actor (env.connection inproc)"}
        from actor.env import RobotLinkError, ZmqRobotLink

        with self._robot_lock:
            try:
                if self._robot is None:
                    self._robot = ZmqRobotLink(self.config, client_name="dashboard", role=pb.ROLE_OBSERVER)
                info = self._robot.emergency_stop(f"emergency stop pressed on the dashboard ({origin})")
            except RobotLinkError as error:
                if self._robot is not None:
                    self._robot.close()
                self._robot = None
                return {"held": False, "error": str(error)}
        return {"held": bool(info.get("emergency_stopped", 0.0)), "info": info}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._commands.close(linger=0)
        with self._robot_lock:
            if self._robot is not None:
                self._robot.close()
                self._robot = None
