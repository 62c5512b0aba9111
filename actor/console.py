"""The actor's end of the operator console: telemetry out, operator commands in.

:class:`ConsoleLink` binds two loopback sockets (``dashboard.telemetry_address``,
``dashboard.command_address``) that the dashboard process (tools/dashboard) connects to:

- a PUB socket carrying :class:`~transport.steerl_pb2.ConsoleTelemetry` envelopes, at most
  ``dashboard.telemetry_hz`` a second, each with the last observation's camera images as raw uint8
  tensors (the dashboard encodes them as JPEG for the page, so the control loop never spends time
  on it). The send never blocks: with nobody listening, or a dashboard that reads slowly, messages
  are dropped (a high-water mark of two), never queued;
- a PULL socket for :class:`~transport.steerl_pb2.OperatorCommand` envelopes: the buttons of the
  page. :meth:`ConsoleLink.read_events` hands their operator events to the acting loop's
  :class:`~actor.operator.OperatorControl`, the same path as a keyboard's or gamepad's, so a press
  on the page does exactly what the key does. A malformed or unknown command is counted and logged
  with what was wrong, and does nothing.

Both sockets stay on this machine (the config refuses anything else); the page reaches beyond it
only through the dashboard's HTTP server and its token.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Mapping

import numpy as np
import zmq

from hardware_configs.schema import DashboardConfig
from transport import steerl_pb2 as pb
from transport.codec import PROTOCOL_VERSION, ProtocolError, encode_tensor, parse_envelope
from transport.zmq_link import bind_retrying

log = logging.getLogger("steerl.console")

# An operator command is a few bytes; anything much larger is refused by ZeroMQ itself.
MAX_COMMAND_BYTES = 4096
# Events a console button may send (INTERVENE_TOGGLE belongs to a teleop device).
CONSOLE_EVENTS = ("MARK_SUCCESS", "MARK_FAILURE", "RERECORD", "PAUSE_TOGGLE", "EMERGENCY_STOP", "RESUME")
RECENT_EPISODES = 50


def parse_operator_command(frame: bytes) -> pb.OperatorCommand:
    """The command in ``frame``; raises :class:`ProtocolError` naming what is wrong."""
    envelope = parse_envelope(frame, MAX_COMMAND_BYTES)
    if envelope.WhichOneof("body") != "operator_command":
        raise ProtocolError(pb.ERROR_UNEXPECTED_MESSAGE,
                            f"console command: expected operator_command, got {envelope.WhichOneof('body')}")
    command = envelope.operator_command
    if bool(command.event) == command.stop_session:
        raise ProtocolError(pb.ERROR_INVALID_ARGUMENT,
                            "operator_command: set exactly one of event and stop_session", "operator_command")
    if command.event and command.event not in CONSOLE_EVENTS:
        raise ProtocolError(pb.ERROR_INVALID_ARGUMENT,
                            f"operator_command.event: {command.event!r} is not one of {', '.join(CONSOLE_EVENTS)}",
                            "operator_command.event")
    return command


def operator_command_frame(event: str = "", stop_session: bool = False, origin: str = "") -> bytes:
    """A serialised command envelope (what the dashboard sends)."""
    envelope = pb.Envelope(protocol_version=PROTOCOL_VERSION)
    envelope.operator_command.event = event
    envelope.operator_command.stop_session = stop_session
    envelope.operator_command.origin = origin
    return envelope.SerializeToString()


class ConsoleLink:
    """The actor's telemetry publisher and command reader (see the module docstring).

    ``mode``: what the page says the actor runs ("train" or "deploy"); ``policy_name``: the policy
    it acts with, as shown on the page."""

    def __init__(self, config: DashboardConfig, actor_id: str, config_name: str, total_steps: int = 0,
                 mode: str = "train", policy_name: str = "", context: zmq.Context | None = None) -> None:
        self.config = config
        self.actor_id = actor_id
        self.config_name = config_name
        self.total_steps = total_steps
        self.mode = mode
        self.policy_name = policy_name
        self._context = context or zmq.Context.instance()
        self._publisher = self._context.socket(zmq.PUB)
        self._publisher.setsockopt(zmq.SNDHWM, 2)
        self._publisher.setsockopt(zmq.LINGER, 0)
        bind_retrying(self._publisher, config.telemetry_address)
        self._commands = self._context.socket(zmq.PULL)
        self._commands.setsockopt(zmq.MAXMSGSIZE, MAX_COMMAND_BYTES)
        self._commands.setsockopt(zmq.LINGER, 0)
        try:
            bind_retrying(self._commands, config.command_address)
        except OSError:
            self._publisher.close(linger=0)
            raise
        self._period_s = 1.0 / config.telemetry_hz
        self._last_images_s = -np.inf
        self._sequence = 0
        self.recent_episodes: collections.deque[pb.ConsoleEpisode] = collections.deque(maxlen=RECENT_EPISODES)
        self.commands_received = 0
        self.commands_refused = 0
        self.stop_requested = False

    # -- commands ---------------------------------------------------------------------------------
    def read_events(self) -> list[str]:
        """The operator events of every command waiting (never blocks), oldest first; a
        ``stop_session`` command sets :attr:`stop_requested` instead."""
        events = []
        while True:
            try:
                frame = self._commands.recv(zmq.NOBLOCK)
            except zmq.Again:
                return events
            try:
                command = parse_operator_command(frame)
            except ProtocolError as error:
                self.commands_refused += 1
                log.warning("console command refused: %s", error)
                continue
            self.commands_received += 1
            origin = f" from {command.origin}" if command.origin else ""
            if command.stop_session:
                log.info("console%s: stop the session after this episode", origin)
                self.stop_requested = True
            else:
                log.info("console%s: %s", origin, command.event)
                events.append(command.event)

    # -- telemetry --------------------------------------------------------------------------------
    def episode_finished(self, episode: pb.ConsoleEpisode) -> None:
        """Keep a finished episode for the page's plots (sent with every message)."""
        self.recent_episodes.append(episode)

    def due(self) -> bool:
        """Whether a message with images may go now (the rate limit)."""
        return time.monotonic() - self._last_images_s >= self._period_s

    def publish(self, fields: Mapping[str, Any], robot_info: Mapping[str, float] | None = None,
                images: Mapping[str, np.ndarray] | None = None, action: np.ndarray | None = None,
                operator_events: Mapping[str, int] | None = None) -> bool:
        """Send one telemetry message (never blocks); returns whether it left. ``fields``: scalar
        fields of :class:`~transport.steerl_pb2.ConsoleTelemetry` by name. With ``images`` the
        rate limit applies: call :meth:`due` first to skip building the message."""
        envelope = pb.Envelope(protocol_version=PROTOCOL_VERSION)
        message = envelope.console_telemetry
        message.actor_id, message.config_name = self.actor_id, self.config_name
        message.mode, message.policy_name, message.total_steps = self.mode, self.policy_name, self.total_steps
        self._sequence += 1
        message.sequence = self._sequence
        for name, value in fields.items():
            setattr(message, name, value)
        if robot_info:
            message.robot.update({key: float(value) for key, value in robot_info.items()})
        if action is not None:
            message.action.extend(np.asarray(action, dtype=np.float32).ravel().tolist())
        if operator_events:
            message.operator_events.update({key: int(value) for key, value in operator_events.items()})
        if images:
            self._last_images_s = time.monotonic()
            for name, image in images.items():
                encode_tensor(np.ascontiguousarray(image), message.images[name])
        message.recent_episodes.extend(self.recent_episodes)
        try:
            self._publisher.send(envelope.SerializeToString(), zmq.NOBLOCK)
        except zmq.Again:  # PUB drops rather than blocks; this is only for safety
            return False
        return True

    def close(self) -> None:
        """Say goodbye to the dashboards (the session has ended) and close both sockets."""
        self.publish({"closing": True})
        self._publisher.close(linger=200)
        self._commands.close(linger=0)
