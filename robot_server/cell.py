"""The robot cell: a backend plus everything the robot server enforces around it.

``RobotCell`` is the robot server minus its socket. It owns

- the **safety layer** (every action validated, scaled, clipped to per-step limits and the box),
- the **watchdog** (no command for ``watchdog_ms``: the arm is held where it is and the next
  observation's info says so),
- the **control clock** (``sync``: each step integrates one control period as fast as possible;
  ``realtime``: each step's reply leaves at the next tick of a fixed-phase clock at ``rate_hz``),
- the **episode** (step counter, time-limit truncation, termination on the task's success);
- the **emergency stop** (:meth:`RobotCell.emergency_stop`): the arm is held at once and every
  motion request (``reset``, ``step``) raises :class:`EmergencyStopped` without touching the arm
  until :meth:`RobotCell.release_emergency_stop`; the info of every reply carries
  ``emergency_stopped`` (0/1). The watchdog is independent of it and keeps running.

The socket server (:mod:`robot_server.server`) and the in-process env link both drive a cell, so
the two behave identically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from hardware_configs.loader import to_dict
from hardware_configs.schema import SessionConfig
from robot_server.backends import RobotBackend, make_backend
from robot_server.safety import SafetyLayer
from transport.spaces import FieldSpec, RobotSpaces

if TYPE_CHECKING:
    from robot_server.cameras import CameraRig

log = logging.getLogger(__name__)

# At start-up the cell waits this long for the first frame of every physical camera.
CAMERA_START_TIMEOUT_S = 3.0

# Config sections that both ends of a link must agree on.
SHARED_SECTIONS = ("robot.control", "robot.action", "robot.task", "robot.cameras")


def config_section_hashes(config: SessionConfig) -> dict[str, str]:
    """A short hash per shared config section, compared in the handshake."""
    plain = to_dict(config)
    # The client sees a camera as an image name and size; where the image comes from (simulator,
    # which device, which crop) is the server's business, so a sim-built client fits a real cell.
    plain["robot"]["cameras"] = [{key: camera[key] for key in ("name", "width", "height")}
                                 for camera in plain["robot"]["cameras"]]
    hashes = {}
    for section in SHARED_SECTIONS:
        value = plain
        for key in section.split("."):
            value = value[key]
        blob = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        hashes[section] = hashlib.sha256(blob).hexdigest()[:12]
    return hashes


def sleep_until(deadline: float, clock: Callable[[], float] = time.monotonic) -> None:
    """Sleep until ``deadline``; the last half millisecond is spun for a precise wake-up."""
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return
        if remaining > 0.002:
            time.sleep(remaining - 0.0015)
        elif remaining > 0.0005:
            time.sleep(0)


class EpisodeNotStarted(RuntimeError):
    """``step`` was called before ``reset`` or after the episode ended."""


class EmergencyStopped(RuntimeError):
    """A motion request (``reset``/``step``) arrived while the cell is emergency-stopped."""


@dataclass
class StepResult:
    observation: dict[str, np.ndarray]
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, float]
    stamp_s: float


@dataclass
class _Counters:
    watchdog_trips: int = 0
    missed_ticks: int = 0
    clipped_steps: int = 0
    refused_actions: int = 0
    camera_faults: int = 0


class RobotCell:
    """A backend with safety, watchdog, clock and episode logic (see module docstring).

    Physical cameras (``robot.camera_devices``) come from a :class:`~robot_server.cameras.CameraRig`
    (built from the config unless ``camera_rig`` is given): their images join the observation, the
    info carries ``camera/<name>/age_ms`` and ``camera/<name>/stale`` per camera and
    ``camera_fault``. A camera stale for more than its device's ``max_stale_steps`` consecutive
    observations is a camera fault: the step ends the episode (truncated), the arm is held, and
    while the fault lasts a step never commands motion.
    """

    def __init__(self, config: SessionConfig, backend: RobotBackend | None = None,
                 clock: Callable[[], float] = time.monotonic, camera_rig: CameraRig | None = None) -> None:
        self.config = config
        self.backend = backend if backend is not None else make_backend(config.robot)
        self.camera_rig = camera_rig
        if self.camera_rig is None and config.robot.camera_devices:
            from robot_server.cameras import CameraRig

            try:
                self.camera_rig = CameraRig.from_robot_config(config.robot)
            except BaseException:
                self.backend.close()
                raise
        if self.camera_rig is not None:
            missing = self.camera_rig.wait_for_first_frames(CAMERA_START_TIMEOUT_S)
            if missing:
                log.warning("camera devices %s delivered no frame within %.1f s", missing,
                            CAMERA_START_TIMEOUT_S)
        self._camera_stale_steps: dict[str, int] = {}
        self._camera_info: dict[str, float] = {}
        self._camera_fault = ""
        self.safety = SafetyLayer(config.robot)
        self.spaces = self._build_spaces()
        self.config_hashes = config_section_hashes(config)
        self.counters = _Counters()
        self._clock = clock
        self._period_s = config.robot.control.period_s
        self._realtime = config.robot.control.mode == "realtime"
        self._watchdog_s = config.robot.safety.watchdog_ms / 1000.0
        self._rng = np.random.default_rng(config.seed)
        self._episode_step = 0
        self._episode_active = False
        self._last_command_s: float | None = None
        self._held_by_watchdog = False
        self._emergency_stop_reason: str | None = None
        self._tick_origin_s = 0.0
        self._last_tick_index = 0

    # -- spaces -------------------------------------------------------------------------------
    def _build_spaces(self) -> RobotSpaces:
        backend = self.backend
        observation: dict[str, FieldSpec] = {
            "tcp_pose": FieldSpec("float32", (7,), (-2.0, -2.0, -2.0, -1.0, -1.0, -1.0, -1.0),
                                  (2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0)),
            "tcp_velocity": FieldSpec("float32", (6,), -10.0, 10.0),
            "gripper_width": FieldSpec("float32", (1,), 0.0, backend.max_gripper_width_m),
        }
        for name, spec in backend.camera_specs().items():
            observation[f"images/{name}"] = spec
        if self.camera_rig is not None:
            for name, spec in self.camera_rig.camera_specs().items():
                observation[f"images/{name}"] = spec
        observation.update(backend.task_observation_specs())
        action = FieldSpec("float32", (self.config.robot.action.dim,), -1.0, 1.0)
        return RobotSpaces(observation=observation, action=action)

    # -- observation --------------------------------------------------------------------------
    def _observe(self, count_stale: bool = True) -> dict[str, np.ndarray]:
        state = self.backend.read_state()
        fields = {
            "tcp_pose": np.concatenate([state.tcp_xyz, state.tcp_quat_xyzw]),
            "tcp_velocity": np.concatenate([state.tcp_linear_velocity, state.tcp_angular_velocity]),
            "gripper_width": np.array([state.gripper_width_m]),
        }
        fields.update(self.backend.read_task_observation())
        observation = {}
        for name, value in fields.items():
            spec = self.spaces.observation[name]
            observation[name] = np.clip(value, spec.low, spec.high).astype(np.float32)
        for name, frame in self.backend.read_cameras().items():
            observation[f"images/{name}"] = frame
        if self.camera_rig is not None:
            observation.update(self._observe_camera_rig(count_stale))
        return observation

    def _observe_camera_rig(self, count_stale: bool) -> dict[str, np.ndarray]:
        """Images of the physical cameras; refreshes their info and, for a control step
        (``count_stale``), their consecutive stale counts and the camera fault."""
        assert self.camera_rig is not None
        images, health = self.camera_rig.read()
        info: dict[str, float] = {}
        faults = []
        for name, camera in health.items():
            if count_stale:
                self._camera_stale_steps[name] = self._camera_stale_steps.get(name, 0) + 1 if camera.stale else 0
            info[f"camera/{name}/age_ms"] = float(camera.age_ms)
            info[f"camera/{name}/stale"] = float(camera.stale)
            if self._camera_stale_steps.get(name, 0) > self.camera_rig.device_of(name).max_stale_steps:
                faults.append(f"{name} ({camera.reason or 'recovering'})")
        fault = "; ".join(faults)
        if fault and fault != self._camera_fault:
            log.warning("camera fault: %s", fault)
        self._camera_fault = fault
        info["camera_fault"] = float(bool(fault))
        self._camera_info = info
        return {f"images/{name}": image for name, image in images.items()}

    def observe(self) -> tuple[dict[str, np.ndarray], dict[str, float], float]:
        """The current observation without commanding anything (observers, pre-flight)."""
        return self._observe(count_stale=False), self._status_info(), self._clock()

    # -- watchdog -----------------------------------------------------------------------------
    def check_watchdog(self) -> float | None:
        """Hold the arm if the controller has been silent too long. Returns the seconds until
        the watchdog would fire next (None when no episode runs)."""
        if not self._episode_active or self._last_command_s is None:
            return None
        silent_s = self._clock() - self._last_command_s
        if silent_s < self._watchdog_s:
            return self._watchdog_s - silent_s
        if not self._held_by_watchdog:
            self.backend.hold()
            self._held_by_watchdog = True
            self.counters.watchdog_trips += 1
        return None

    def hold(self) -> None:
        """Stop the arm now (client gone, emergency stop, shutdown)."""
        self.backend.hold()

    # -- emergency stop -----------------------------------------------------------------------
    @property
    def emergency_stopped(self) -> bool:
        """Whether motion is refused until :meth:`release_emergency_stop`."""
        return self._emergency_stop_reason is not None

    def emergency_stop(self, reason: str = "") -> dict[str, float]:
        """Hold the arm now and refuse motion until released; idempotent. Returns the status info."""
        self.backend.hold()
        if self._emergency_stop_reason is None:
            self._emergency_stop_reason = reason or "emergency stop"
            log.warning("emergency stop (%s): arm held, motion refused until released", self._emergency_stop_reason)
        return self._status_info()

    def release_emergency_stop(self) -> dict[str, float]:
        """Allow motion again (the arm stays held until the next command). Returns the status info."""
        if self._emergency_stop_reason is not None:
            log.warning("emergency stop (%s) released", self._emergency_stop_reason)
            self._emergency_stop_reason = None
        return self._status_info()

    def _refuse_when_stopped(self, request: str) -> None:
        if self._emergency_stop_reason is not None:
            raise EmergencyStopped(f"{request}: the robot is emergency-stopped ({self._emergency_stop_reason}); "
                                   "no motion until it is released")

    def _status_info(self) -> dict[str, float]:
        info = {
            "episode_step": float(self._episode_step),
            "watchdog_trips": float(self.counters.watchdog_trips),
            "missed_ticks": float(self.counters.missed_ticks),
            "refused_actions": float(self.counters.refused_actions),
            "clipped_steps": float(self.counters.clipped_steps),
            "emergency_stopped": float(self._emergency_stop_reason is not None),
        }
        if self.camera_rig is not None:
            info["camera_faults"] = float(self.counters.camera_faults)
            info.update(self._camera_info)
        return info

    # -- episode ------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, float], float]:
        """Start an episode: the backend moves to the reset pose and re-randomises the task.
        Raises EmergencyStopped (arm untouched) while emergency-stopped."""
        self._refuse_when_stopped("reset")
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.backend.reset(self._rng)
        self._episode_step = 0
        self._episode_active = True
        self._held_by_watchdog = False
        now = self._clock()
        self._last_command_s = now
        self._tick_origin_s = now
        self._last_tick_index = 0
        return self._observe(), self._status_info(), now

    def step(self, action: np.ndarray) -> StepResult:
        """Execute one control period of ``action``. Raises UnsafeAction (arm untouched) for a bad
        action, EpisodeNotStarted outside an episode and EmergencyStopped while emergency-stopped."""
        self._refuse_when_stopped("step")
        if not self._episode_active:
            raise EpisodeNotStarted("step: no episode is running; call reset first")
        try:
            action = self.safety.validate(np.asarray(action))
        except ValueError:
            self.counters.refused_actions += 1
            raise

        now = self._clock()
        watchdog_fired = self._held_by_watchdog or (
            self._last_command_s is not None and now - self._last_command_s >= self._watchdog_s
        )
        if watchdog_fired and not self._held_by_watchdog:
            self.counters.watchdog_trips += 1
        self._held_by_watchdog = False

        target, report = self.safety.target(action, self.backend.read_state())
        if self._camera_fault:  # the last observation already showed a camera fault: no motion
            self.backend.hold()
        else:
            self.backend.command(target)
        self._last_command_s = now
        self.backend.advance(self._period_s)
        if self._realtime:
            self._wait_for_tick(now)

        self._episode_step += 1
        signal = self.backend.task_signal()
        terminated = signal.success
        truncated = not terminated and self._episode_step >= self.config.robot.task.max_episode_steps
        if terminated or truncated:
            self._episode_active = False
        if report.clipped_step or report.clipped_box:
            self.counters.clipped_steps += 1
        info = self._status_info()
        info.update({
            "success": float(signal.success),
            "watchdog_tripped": float(watchdog_fired),
            "safety/clipped_action": float(report.clipped_action),
            "safety/clipped_step": float(report.clipped_step),
            "safety/clipped_box": float(report.clipped_box),
        })
        observation = self._observe()
        if self.camera_rig is not None:
            info.update(self._status_info())  # counters and camera info of this observation
            if self._camera_fault:
                self.backend.hold()
                self._episode_active = False
                truncated = not terminated
                self.counters.camera_faults += 1
                info["camera_faults"] = float(self.counters.camera_faults)
        return StepResult(observation, float(signal.reward), terminated, truncated, info, self._clock())

    def _wait_for_tick(self, command_time_s: float) -> None:
        """Block until the first clock tick after the command arrived (fixed phase from reset)."""
        index = math.floor((command_time_s - self._tick_origin_s) / self._period_s) + 1
        if index > self._last_tick_index + 1:
            self.counters.missed_ticks += index - self._last_tick_index - 1
        self._last_tick_index = index
        sleep_until(self._tick_origin_s + index * self._period_s, self._clock)

    def close(self) -> None:
        self.backend.hold()
        self.backend.close()
        if self.camera_rig is not None:
            self.camera_rig.close()
