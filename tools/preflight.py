"""The pre-flight check of a robot cell (``steerl check --config FILE``), run before any motion.

It connects to every device the config names and measures what a session will rely on, then
reports one row per check (``ok``, ``warn`` or ``fail``, a measured value and a detail):

``config``
    the config validates (a config built in code is validated again here; a file that does not
    load is reported by the CLI as a failing row with the loader's message).
``workspace: reset pose`` / ``workspace: reset range``
    ``robot.reset_xyz`` lies inside the safety box, and so does the whole randomisation range of
    the reset: ``reset_xyz +- <backend>.reset.xyz_noise_m`` for a real arm (and the yaw range
    inside ``safety.yaw_limits_rad``); a simulated backend's randomisation moves task objects, not
    the arm. The value is the margin to the nearest wall.
``arm`` / ``arm: TCP``
    the backend constructs (connects), ``read_state()`` works, the measured TCP, whether it lies
    inside the box now (warn if not: the first reset would have to move it in), and whether it
    stayed still during the check.
``camera <device>`` (physical) / ``camera <name>`` (rendered by a simulator)
    the device opens (an unknown serial fails, naming the serial and the connected ones), its
    delivered fps over the measurement vs the configured fps, the frame age sampled at the
    control rate (p50/p99 against ``max_frame_age_ms``), the image shape of every output.
``control loop``
    a loop at ``robot.control.rate_hz`` for ``measure_s`` paced by :func:`robot_server.cell.sleep_until`
    that reads the arm state and the cameras each tick, as the robot server does, and reports the
    wake-up lateness (jitter) p50/p99/max; warn if p99 exceeds 10% of the period.
``server CURVE`` / ``env CURVE``
    the key files named in ``server.curve`` / ``env.curve`` exist and hold CURVE keys; a server
    that binds beyond loopback without CURVE is a warning.
``learner address``
    ``learner.address`` parses (nothing is connected).

Never moves the arm: the backend is constructed, read (``read_state``, ``read_cameras``) and
closed; ``reset``, ``command``, ``advance`` and ``hold`` are never called by this module (a real
backend's ``close`` stops any motion of its own, of which there is none here). Everything opened
is closed in ``finally``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import numpy as np

from hardware_configs.loader import ConfigError, load_dataclass, to_dict
from hardware_configs.schema import (
    REAL_ARM_BACKENDS,
    CameraConfig,
    CameraDeviceConfig,
    RobotConfig,
    SessionConfig,
    is_loopback,
)
from robot_server.backends import RobotBackend, make_backend
from robot_server.backends.real_arm import describe_error
from robot_server.cameras import CameraError, CameraRig, DriverFactory, make_camera_driver
from robot_server.cell import CAMERA_START_TIMEOUT_S, sleep_until

if TYPE_CHECKING:
    from rich.console import Console

Status = Literal["ok", "warn", "fail"]
BackendFactory = Callable[[RobotConfig], RobotBackend]

# A camera delivering less than this share of its configured fps is a warning.
MIN_FPS_FRACTION = 0.9
# Control-loop jitter (p99 wake-up lateness) above this share of the period is a warning.
MAX_JITTER_FRACTION = 0.1
# The TCP moving more than this (m) while the check commands nothing is a warning.
TCP_STILL_TOLERANCE_M = 1e-3
_AXES = "xyz"


@dataclass(frozen=True)
class CheckRow:
    """One line of the report: the check, its status, the measured value and the details.

    ``data`` holds the measurements as plain numbers for the JSON report.
    """

    check: str
    status: Status
    value: str
    detail: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-ready)."""
        return {"check": self.check, "status": self.status, "value": self.value, "detail": self.detail,
                "data": dict(self.data)}


@dataclass(frozen=True)
class PreflightReport:
    """Every row of one pre-flight check; it passes when no row failed (warnings allowed)."""

    config_name: str
    rows: tuple[CheckRow, ...]

    @property
    def passed(self) -> bool:
        """True when no row has status ``fail``."""
        return not self.failures

    @property
    def failures(self) -> tuple[CheckRow, ...]:
        return tuple(row for row in self.rows if row.status == "fail")

    @property
    def warnings(self) -> tuple[CheckRow, ...]:
        return tuple(row for row in self.rows if row.status == "warn")

    def row(self, check: str) -> CheckRow:
        """The row named ``check``; KeyError listing the rows there are."""
        for row in self.rows:
            if row.check == check:
                return row
        raise KeyError(f"no check named {check!r} (checks: {', '.join(row.check for row in self.rows)})")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-ready): config name, overall pass flag and the rows."""
        return {"config": self.config_name, "passed": self.passed, "rows": [row.to_dict() for row in self.rows]}


# ----------------------------------------------------------------------------------------------
# Static checks (no device touched)
# ----------------------------------------------------------------------------------------------
def config_error_report(source: str, error: BaseException) -> PreflightReport:
    """The report of a config that does not load: one failing ``config`` row with the loader's
    message (which names the file and the field)."""
    return PreflightReport(str(source), (CheckRow("config", "fail", "does not load", str(error)),))


def check_config(config: SessionConfig) -> CheckRow:
    """Validate ``config`` again (one built in code with ``dataclasses.replace`` skipped the
    loader's validation)."""
    try:
        load_dataclass(SessionConfig, to_dict(config), config.name)
    except ConfigError as error:
        return CheckRow("config", "fail", "invalid", str(error))
    robot = config.robot
    return CheckRow("config", "ok", f"{config.name} ({robot.backend})",
                    f"validated; control {robot.control.rate_hz:g} Hz {robot.control.mode}, "
                    f"{len(robot.cameras)} camera(s), {len(robot.camera_devices)} camera device(s)")


def _fmt_xyz(xyz: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(value):.3f}" for value in xyz) + ")"


@dataclass(frozen=True)
class _WallDistance:
    margin_m: float  # negative: outside the box by that much
    wall: str  # the config field of the nearest wall, e.g. "safety.workspace_high[2] (z = 0.35 m)"


def _distances_to_walls(low_corner: Sequence[float], high_corner: Sequence[float],
                        robot: RobotConfig) -> list[_WallDistance]:
    """Distance of the box ``[low_corner, high_corner]`` to each of the six workspace walls,
    nearest first (negative: it pokes through that wall)."""
    distances = []
    for axis in range(3):
        low_wall = robot.safety.workspace_low[axis]
        high_wall = robot.safety.workspace_high[axis]
        distances.append(_WallDistance(float(low_corner[axis]) - low_wall,
                                       f"safety.workspace_low[{axis}] ({_AXES[axis]} = {low_wall:g} m)"))
        distances.append(_WallDistance(high_wall - float(high_corner[axis]),
                                       f"safety.workspace_high[{axis}] ({_AXES[axis]} = {high_wall:g} m)"))
    return sorted(distances, key=lambda distance: distance.margin_m)


def _box_text(robot: RobotConfig) -> str:
    return f"{_fmt_xyz(robot.safety.workspace_low)} .. {_fmt_xyz(robot.safety.workspace_high)}"


def check_workspace(robot: RobotConfig) -> list[CheckRow]:
    """The reset pose and its randomisation range against the workspace box (margins in mm)."""
    reset = np.asarray(robot.reset_xyz, dtype=np.float64)
    rows = []
    nearest = _distances_to_walls(reset, reset, robot)
    data = {"reset_xyz": reset.tolist(), "margin_m": nearest[0].margin_m, "nearest_wall": nearest[0].wall}
    if nearest[0].margin_m < 0:
        outside = "; ".join(f"{d.margin_m * -1000:.0f} mm beyond {d.wall}" for d in nearest if d.margin_m < 0)
        rows.append(CheckRow("workspace: reset pose", "fail", f"outside by {-nearest[0].margin_m * 1000:.0f} mm",
                             f"robot.reset_xyz {_fmt_xyz(reset)} lies outside the box {_box_text(robot)}: {outside}",
                             data))
    else:
        rows.append(CheckRow("workspace: reset pose", "ok", f"margin {nearest[0].margin_m * 1000:.0f} mm",
                             f"robot.reset_xyz {_fmt_xyz(reset)} inside the box {_box_text(robot)}; nearest wall "
                             f"{nearest[0].wall}", data))

    if robot.backend not in REAL_ARM_BACKENDS:
        detail = (f"backend {robot.backend!r} resets the arm to reset_xyz exactly; the task's randomisation "
                  f"(task.randomise_xy_m = {robot.task.randomise_xy_m:g} m) places objects, not the arm")
        if robot.backend == "pybullet" and robot.pybullet.reset_joint_noise_rad > 0:
            detail += (f"; pybullet.reset_joint_noise_rad = {robot.pybullet.reset_joint_noise_rad:g} rad perturbs "
                       "the joints (not checked in Cartesian space)")
        rows.append(CheckRow("workspace: reset range", rows[0].status, rows[0].value, detail, data))
        return rows

    section = robot.backend  # "franka" or "ur": its reset section randomises the arm
    randomisation = getattr(robot, section).reset
    noise = np.asarray(randomisation.xyz_noise_m, dtype=np.float64)
    low_corner, high_corner = reset - noise, reset + noise
    walls = _distances_to_walls(low_corner, high_corner, robot)
    yaw_low = robot.reset_yaw_rad - randomisation.yaw_noise_rad
    yaw_high = robot.reset_yaw_rad + randomisation.yaw_noise_rad
    yaw_limit_low, yaw_limit_high = robot.safety.yaw_limits_rad
    range_data = {"xyz_low": low_corner.tolist(), "xyz_high": high_corner.tolist(), "margin_m": walls[0].margin_m,
                  "nearest_wall": walls[0].wall, "yaw_range_rad": [yaw_low, yaw_high]}
    problems = [f"{-d.margin_m * 1000:.0f} mm beyond {d.wall}" for d in walls if d.margin_m < 0]
    if yaw_low < yaw_limit_low or yaw_high > yaw_limit_high:
        problems.append(f"yaw {yaw_low:.3f} .. {yaw_high:.3f} rad leaves safety.yaw_limits_rad "
                        f"[{yaw_limit_low:g}, {yaw_limit_high:g}]")
    range_text = (f"reset_xyz +- {section}.reset.xyz_noise_m {_fmt_xyz(noise)} = {_fmt_xyz(low_corner)} .. "
                  f"{_fmt_xyz(high_corner)}")
    if problems:
        rows.append(CheckRow(
            "workspace: reset range", "fail", f"outside by {max(0.0, -walls[0].margin_m) * 1000:.0f} mm",
            f"{range_text} leaves the box {_box_text(robot)}: {'; '.join(problems)} (resets would be clipped "
            f"to the wall); shrink {section}.reset.xyz_noise_m / yaw_noise_rad or move reset_xyz", range_data))
    else:
        rows.append(CheckRow("workspace: reset range", "ok", f"margin {walls[0].margin_m * 1000:.0f} mm",
                             f"{range_text} inside the box; yaw {yaw_low:.3f} .. {yaw_high:.3f} rad inside "
                             f"safety.yaw_limits_rad; nearest wall {walls[0].wall}", range_data))
    return rows


def _key_file_problem(path: str, field_name: str, needs_secret: bool) -> str:
    """Why the CURVE key file at ``path`` is unusable ("" when it is fine)."""
    key_path = Path(path)
    if not key_path.exists():
        return f"{field_name}: {path} does not exist"
    if not key_path.is_file():
        return f"{field_name}: {path} is not a file"
    if not os.access(key_path, os.R_OK):
        return f"{field_name}: {path} is not readable by this user"
    import zmq.auth

    try:
        _public, secret = zmq.auth.load_certificate(str(key_path))
    except Exception as error:  # a malformed file: pyzmq raises ValueError, OSError, ...
        return f"{field_name}: {path} is not a CURVE key file ({describe_error(error)})"
    if needs_secret and secret is None:
        return (f"{field_name}: {path} holds no secret key (name the NAME.key_secret file made by "
                "'steerl keys generate')")
    return ""


def check_keys(config: SessionConfig) -> list[CheckRow]:
    """The CURVE key files of the server and the env client exist and hold keys; a server
    binding beyond loopback without CURVE is a warning."""
    rows = []
    server = config.server
    if server.curve is None:
        if is_loopback(server.address):
            rows.append(CheckRow("server CURVE", "ok", "not needed", f"server.address {server.address} is loopback"))
        else:
            rows.append(CheckRow("server CURVE", "warn", "no keys",
                                 f"server.address {server.address} binds beyond loopback without server.curve: "
                                 "anyone on the network can command the robot (steerl keys generate)"))
    else:
        problems = [problem for problem in (
            _key_file_problem(server.curve.secret_key_file, "server.curve.secret_key_file", True),
        ) if problem]
        authorized = Path(server.curve.authorized_keys_dir)
        client_keys: list[Path] = []
        if not authorized.is_dir():
            problems.append(f"server.curve.authorized_keys_dir: {authorized} is not a directory")
        elif not os.access(authorized, os.R_OK | os.X_OK):
            problems.append(f"server.curve.authorized_keys_dir: {authorized} is not readable by this user")
        else:
            client_keys = sorted(authorized.glob("*.key"))
        if problems:
            rows.append(CheckRow("server CURVE", "fail", "key files missing", "; ".join(problems)))
        elif not client_keys:
            rows.append(CheckRow("server CURVE", "warn", "no client keys",
                                 f"server.curve.authorized_keys_dir {authorized} holds no *.key file: no client "
                                 "can connect"))
        else:
            rows.append(CheckRow("server CURVE", "ok", f"{len(client_keys)} client key(s)",
                                 f"secret key {server.curve.secret_key_file}; authorised: "
                                 + ", ".join(path.name for path in client_keys)))

    env = config.env
    if env.connection == "inproc":
        rows.append(CheckRow("env CURVE", "ok", "not used", "env.connection inproc: no socket between actor and server"))
    elif env.curve is None:
        if server.curve is not None:
            rows.append(CheckRow("env CURVE", "warn", "no keys",
                                 "server.curve is set but env.curve is not: the actor will be refused by the server"))
        else:
            rows.append(CheckRow("env CURVE", "ok", "not needed", "neither server.curve nor env.curve is set"))
    else:
        problems = [problem for problem in (
            _key_file_problem(env.curve.secret_key_file, "env.curve.secret_key_file", True),
            _key_file_problem(env.curve.server_public_key_file, "env.curve.server_public_key_file", False),
        ) if problem]
        if problems:
            rows.append(CheckRow("env CURVE", "fail", "key files missing", "; ".join(problems)))
        else:
            rows.append(CheckRow("env CURVE", "ok", "keys readable",
                                 f"{env.curve.secret_key_file}, {env.curve.server_public_key_file}"))
    return rows


def _address_problem(address: str) -> str:
    """Why ``address`` is not a usable ZeroMQ endpoint ("" when it parses)."""
    parsed = urlparse(address)
    if parsed.scheme == "tcp":
        if not parsed.hostname:
            return "names no host"
        try:
            port = parsed.port
        except ValueError as error:
            return f"has an invalid port ({error})"
        if port is None or not 1 <= port <= 65535:
            return "names no port in 1..65535"
        return ""
    if parsed.scheme in ("ipc", "inproc"):
        return "" if (parsed.netloc + parsed.path) else "names no endpoint"
    return "must start with tcp://, ipc:// or inproc://"


def check_learner_address(config: SessionConfig) -> CheckRow:
    """``learner.address`` parses as a ZeroMQ endpoint (nothing is connected)."""
    address = config.learner.address
    problem = _address_problem(address)
    if problem:
        return CheckRow("learner address", "fail", "invalid", f"learner.address {address!r} {problem}")
    if not is_loopback(address):
        return CheckRow("learner address", "warn", address,
                        "binds beyond loopback; this config gives the learner link no CURVE keys")
    return CheckRow("learner address", "ok", address, "parses (not connected)")


# ----------------------------------------------------------------------------------------------
# Device checks
# ----------------------------------------------------------------------------------------------
def _arm_label(robot: RobotConfig) -> str:
    if robot.backend in REAL_ARM_BACKENDS:
        return f"{robot.backend} at {getattr(robot, robot.backend).robot_ip}"
    return f"{robot.backend} (simulated)"


@dataclass
class _CameraProbe:
    """One opened camera device and what the measurement collected from it."""

    device: CameraDeviceConfig
    cameras: tuple[CameraConfig, ...]
    rig: CameraRig
    ages_ms: list[float] = field(default_factory=list)
    window_start: tuple[int, float] | None = None  # (sequence, host receive time) of the first frame
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def newest(self) -> tuple[int, float] | None:
        driver = self.rig.drivers[self.device.name]
        frame = driver.latest()
        return None if frame is None else (frame.sequence, frame.host_receive_s)


def _open_cameras(robot: RobotConfig, driver_factory: DriverFactory,
                  opened: list[_CameraProbe]) -> list[CheckRow]:
    """Open each camera device on its own (one failing device does not hide the others); the
    opened ones are appended to ``opened`` (the caller closes them). Returns the failure rows."""
    rows = []
    for device in robot.camera_devices:
        cameras = tuple(camera for camera in robot.cameras if camera.device == device.name)
        if not cameras:
            rows.append(CheckRow(f"camera {device.name}", "warn", "unused",
                                 "no entry of robot.cameras names this device; not opened"))
            continue
        try:
            rig = CameraRig([device], cameras, driver_factory)
        except CameraError as error:  # its message names the device and its serial or source
            rows.append(CheckRow(f"camera {device.name}", "fail", "cannot open", str(error),
                                 {"serial": device.serial, "source": str(device.source)}))
            continue
        except Exception as error:
            rows.append(CheckRow(f"camera {device.name}", "fail", "cannot open",
                                 f"camera device {device.name!r} ({device.driver}): {describe_error(error)}",
                                 {"serial": device.serial, "source": str(device.source)}))
            continue
        opened.append(_CameraProbe(device, cameras, rig))
    return rows


def _device_text(device: CameraDeviceConfig) -> str:
    where = f"serial {device.serial!r}" if device.driver == "realsense" else f"source {device.source!r}"
    return f"{device.driver} {where}, {device.width}x{device.height}"


def _camera_row(probe: _CameraProbe, window_end: tuple[int, float] | None) -> CheckRow:
    device = probe.device
    name = f"camera {device.name}"
    shapes = ", ".join(f"{camera} {'x'.join(str(n) for n in shape)}" for camera, shape in probe.shapes.items())
    start = probe.window_start
    if start is None or window_end is None or window_end[0] <= start[0]:
        return CheckRow(name, "fail", "no frames",
                        f"{_device_text(device)}: opened but delivered no frame during the measurement")
    frames = window_end[0] - start[0]
    span_s = window_end[1] - start[1]
    fps = frames / span_s if span_s > 0 else 0.0
    age_p50, age_p99 = (float(np.percentile(probe.ages_ms, q)) for q in (50, 99))
    data = {"fps": fps, "configured_fps": device.fps, "age_p50_ms": age_p50, "age_p99_ms": age_p99,
            "max_frame_age_ms": device.max_frame_age_ms, "frames": frames,
            "shapes": {camera: list(shape) for camera, shape in probe.shapes.items()}}
    wrong_shapes = [f"{camera.name} is {probe.shapes.get(camera.name)} instead of {(camera.height, camera.width, 3)}"
                    for camera in probe.cameras if probe.shapes.get(camera.name) != (camera.height, camera.width, 3)]
    detail = (f"{_device_text(device)}; frame age p50 {age_p50:.0f} ms, p99 {age_p99:.0f} ms "
              f"(max_frame_age_ms {device.max_frame_age_ms:g}); outputs {shapes}")
    value = f"{fps:.1f} / {device.fps} fps"
    if wrong_shapes:
        return CheckRow(name, "fail", value, f"{detail}; wrong image shape: {'; '.join(wrong_shapes)}", data)
    problems = []
    if fps < MIN_FPS_FRACTION * device.fps:
        problems.append(f"delivers {fps:.1f} fps, below {MIN_FPS_FRACTION:.0%} of the configured {device.fps}")
    if age_p99 > device.max_frame_age_ms:
        problems.append(f"frame age p99 {age_p99:.0f} ms exceeds max_frame_age_ms {device.max_frame_age_ms:g}")
    if problems:
        return CheckRow(name, "warn", value, f"{'; '.join(problems)}; {detail}", data)
    return CheckRow(name, "ok", value, detail, data)


def _rendered_camera_rows(robot: RobotConfig, backend: RobotBackend) -> list[CheckRow]:
    """One row per camera the backend renders itself (a simulator), with its image shape."""
    cameras = robot.simulated_cameras
    if not cameras:
        return []
    started = time.monotonic()
    try:
        images = backend.read_cameras()
    except Exception as error:
        return [CheckRow(f"camera {camera.name}", "fail", "no image",
                         f"{robot.backend} backend read_cameras(): {describe_error(error)}") for camera in cameras]
    render_ms = 1000.0 * (time.monotonic() - started)
    rows = []
    for camera in cameras:
        expected = (camera.height, camera.width, 3)
        image = images.get(camera.name)
        shape = tuple(image.shape) if image is not None else None
        data = {"shape": list(shape) if shape else None, "render_ms_all_cameras": render_ms}
        if shape != expected:
            rows.append(CheckRow(f"camera {camera.name}", "fail", str(shape),
                                 f"rendered by the {robot.backend} backend: shape {shape}, expected {expected}", data))
        else:
            rows.append(CheckRow(f"camera {camera.name}", "ok", "x".join(str(n) for n in shape),
                                 f"rendered by the {robot.backend} backend (all {len(cameras)} camera(s) in "
                                 f"{render_ms:.1f} ms)", data))
    return rows


@dataclass
class _LoopResult:
    lateness_ms: list[float]
    read_state_ms: list[float]
    missed_ticks: int
    tcp_first: np.ndarray | None
    tcp_last: np.ndarray | None
    state_error: str


def _measure(robot: RobotConfig, backend: RobotBackend | None, probes: Sequence[_CameraProbe],
             measure_s: float) -> _LoopResult:
    """Run a control loop at ``robot.control.rate_hz`` for ``measure_s`` (at least one tick):
    each tick reads the arm state and every camera (no commands), as the robot server does."""
    period_s = robot.control.period_s
    for probe in probes:
        probe.window_start = probe.newest()
    result = _LoopResult([], [], 0, None, None, "")
    ticks = max(1, round(measure_s / period_s))
    deadline_s = time.monotonic() + period_s
    tick = 0
    while tick + result.missed_ticks < ticks:
        sleep_until(deadline_s)
        result.lateness_ms.append(1000.0 * (time.monotonic() - deadline_s))
        tick += 1
        if backend is not None and not result.state_error:
            read_started = time.monotonic()
            try:
                tcp = np.asarray(backend.read_state().tcp_xyz, dtype=np.float64).copy()
            except Exception as error:
                result.state_error = f"read_state() failed at tick {tick}: {describe_error(error)}"
            else:
                result.read_state_ms.append(1000.0 * (time.monotonic() - read_started))
                if result.tcp_first is None:
                    result.tcp_first = tcp
                result.tcp_last = tcp
        for probe in probes:
            images, health = probe.rig.read()
            probe.ages_ms.append(health[probe.cameras[0].name].age_ms)
            probe.shapes = {name: tuple(image.shape) for name, image in images.items()}
        deadline_s += period_s
        now_s = time.monotonic()
        if now_s > deadline_s:  # this tick's work overran: skip the ticks that already passed
            skipped = math.floor((now_s - deadline_s) / period_s) + 1
            result.missed_ticks += skipped
            deadline_s += skipped * period_s
    return result


def _jitter_row(robot: RobotConfig, result: _LoopResult, measure_s: float, backend_read: bool,
                cameras: int) -> CheckRow:
    period_ms = 1000.0 * robot.control.period_s
    limit_ms = MAX_JITTER_FRACTION * period_ms
    lateness = np.asarray(result.lateness_ms)
    p50, p99, worst = (float(np.percentile(lateness, q)) for q in (50, 99, 100))
    read_p99 = float(np.percentile(result.read_state_ms, 99)) if result.read_state_ms else None
    reads = ["arm state" if backend_read else "no arm state (arm unavailable)"]
    if cameras:
        reads.append(f"{cameras} camera device(s)")
    data = {"rate_hz": robot.control.rate_hz, "ticks": len(result.lateness_ms), "jitter_p50_ms": p50,
            "jitter_p99_ms": p99, "jitter_max_ms": worst, "limit_ms": limit_ms, "missed_ticks": result.missed_ticks,
            "read_state_p99_ms": read_p99}
    detail = (f"{robot.control.rate_hz:g} Hz for {measure_s:g} s ({len(result.lateness_ms)} ticks, reading "
              f"{' and '.join(reads)}): jitter p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {worst:.2f} ms; limit "
              f"{limit_ms:.1f} ms ({MAX_JITTER_FRACTION:.0%} of the period); missed ticks {result.missed_ticks}")
    if read_p99 is not None:
        detail += f"; read_state p99 {read_p99:.2f} ms"
    value = f"p99 {p99:.2f} ms"
    if result.state_error:
        return CheckRow("control loop", "fail", value, f"{result.state_error}; {detail}", data)
    if p99 > limit_ms or result.missed_ticks:
        return CheckRow("control loop", "warn", value, detail, data)
    return CheckRow("control loop", "ok", value, detail, data)


def _tcp_row(robot: RobotConfig, result: _LoopResult, tcp_at_connect: np.ndarray) -> CheckRow:
    walls = _distances_to_walls(tcp_at_connect, tcp_at_connect, robot)
    last = result.tcp_last if result.tcp_last is not None else tcp_at_connect
    moved_m = float(np.linalg.norm(last - tcp_at_connect))
    data = {"tcp_xyz": tcp_at_connect.tolist(), "tcp_xyz_after": last.tolist(), "moved_m": moved_m,
            "margin_m": walls[0].margin_m}
    value = _fmt_xyz(tcp_at_connect)
    notes = []
    status: Status = "ok"
    if walls[0].margin_m < 0:
        outside = "; ".join(f"{-d.margin_m * 1000:.0f} mm beyond {d.wall}" for d in walls if d.margin_m < 0)
        if robot.backend in REAL_ARM_BACKENDS:
            status = "warn"
            notes.append(f"outside the workspace box {_box_text(robot)} ({outside}): the first reset will move it "
                         f"in to reset_xyz {_fmt_xyz(robot.reset_xyz)}; make sure that path is clear")
        else:
            notes.append(f"outside the workspace box ({outside}) before the first reset, which places the "
                         f"simulated arm at reset_xyz {_fmt_xyz(robot.reset_xyz)}")
    else:
        notes.append(f"inside the workspace box (margin {walls[0].margin_m * 1000:.0f} mm to {walls[0].wall})")
    if moved_m > TCP_STILL_TOLERANCE_M:
        status = "warn"
        notes.append(f"moved {moved_m * 1000:.1f} mm during the check although nothing commanded it")
    else:
        notes.append(f"still during the check (moved {moved_m * 1000:.3f} mm)")
    return CheckRow("arm: TCP", status, value, "; ".join(notes), data)


def run_preflight(config: SessionConfig, *, backend_factory: BackendFactory = make_backend,
                  camera_driver_factory: DriverFactory = make_camera_driver,
                  measure_s: float = 2.0) -> PreflightReport:
    """Check every device of ``config`` without moving the arm; see the module docstring.

    ``backend_factory`` builds (and so connects) the backend from ``config.robot``;
    ``camera_driver_factory`` builds an unstarted camera driver per device (tests inject fakes
    through both). ``measure_s`` is the length of the camera and control-loop measurement.
    Device errors become failing rows; nothing raises except a programming error.
    """
    if not measure_s > 0:
        raise ValueError(f"measure_s must be positive, got {measure_s}")
    robot = config.robot
    config_row = check_config(config)
    rows: list[CheckRow] = [config_row, *check_workspace(robot)]
    trailing_rows = [*check_keys(config), check_learner_address(config)]
    if config_row.status == "fail":
        rows.append(CheckRow("devices", "fail", "not checked", "the config is invalid: no device was opened"))
        return PreflightReport(config.name, tuple(rows + trailing_rows))

    backend: RobotBackend | None = None
    probes: list[_CameraProbe] = []
    try:
        connect_started = time.monotonic()
        try:
            backend = backend_factory(robot)
        except Exception as error:
            rows.append(CheckRow("arm", "fail", "unreachable", f"{_arm_label(robot)}: {describe_error(error)}"))
        tcp_at_connect: np.ndarray | None = None
        if backend is not None:
            connect_s = time.monotonic() - connect_started
            try:
                state = backend.read_state()
                tcp_at_connect = np.asarray(state.tcp_xyz, dtype=np.float64).copy()
            except Exception as error:
                rows.append(CheckRow("arm", "fail", "no state",
                                     f"{_arm_label(robot)}: connected, but read_state() failed: {describe_error(error)}"))
            else:
                rows.append(CheckRow("arm", "ok", f"connected in {connect_s:.2f} s",
                                     f"{_arm_label(robot)}; read_state() works; gripper width "
                                     f"{state.gripper_width_m * 1000:.1f} mm",
                                     {"connect_s": connect_s, "gripper_width_m": float(state.gripper_width_m)}))
                rows.extend(_rendered_camera_rows(robot, backend))
        arm_reads = backend is not None and tcp_at_connect is not None

        camera_rows = _open_cameras(robot, camera_driver_factory, probes)
        deadline_s = time.monotonic() + CAMERA_START_TIMEOUT_S
        measured: list[_CameraProbe] = []
        for probe in probes:
            silent_devices = probe.rig.wait_for_first_frames(max(0.0, deadline_s - time.monotonic()))
            if silent_devices:
                health = probe.rig.health()[probe.cameras[0].name]
                camera_rows.append(CheckRow(f"camera {probe.device.name}", "fail", "no frames",
                                            f"{_device_text(probe.device)}: opened, but no frame within "
                                            f"{CAMERA_START_TIMEOUT_S:g} s ({health.reason})"))
            else:
                measured.append(probe)

        result = _measure(robot, backend if arm_reads else None, measured, measure_s)
        camera_rows.extend(_camera_row(probe, probe.newest()) for probe in measured)
        if tcp_at_connect is not None:
            rows.append(_tcp_row(robot, result, tcp_at_connect))
        order = {device.name: index for index, device in enumerate(robot.camera_devices)}
        camera_rows.sort(key=lambda row: order.get(row.check.removeprefix("camera "), len(order)))
        rows.extend(camera_rows)
        rows.append(_jitter_row(robot, result, measure_s, arm_reads, len(measured)))
    finally:
        for probe in probes:
            probe.rig.close()
        if backend is not None:
            try:
                backend.close()
            except Exception as error:
                rows.append(CheckRow("arm: close", "warn", "close failed",
                                     f"{_arm_label(robot)}: close(): {describe_error(error)}"))
    return PreflightReport(config.name, tuple(rows + trailing_rows))


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
_STATUS_STYLE = {"ok": "bold green", "warn": "bold yellow", "fail": "bold red"}


def print_report(report: PreflightReport, console: Console) -> None:
    """Print ``report`` on a rich ``console`` as a table (check, status, value, detail) and a
    one-line verdict."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"steerl pre-flight: {report.config_name}"), title_justify="left", show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("value", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for row in report.rows:
        style = _STATUS_STYLE[row.status]
        table.add_row(Text(row.check), Text(row.status, style=style), Text(row.value), Text(row.detail))
    console.print(table)
    warnings = len(report.warnings)
    if report.passed:
        console.print(f"[bold green]PASS[/]: no check failed ({warnings} warning(s)); nothing was moved")
    else:
        failed = escape(", ".join(row.check for row in report.failures))
        console.print(f"[bold red]FAIL[/]: {len(report.failures)} check(s) failed: {failed}")
