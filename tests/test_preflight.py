"""The pre-flight check (``steerl check``): the simulated cell, the Franka example on the fake franky
with software RealSense cameras, unknown serials, an unreachable arm, reset ranges that leave the
box, and the CLI end to end. Every check must leave the arm where it was."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pytest

import fake_franky
from hardware_configs.schema import (
    CameraConfig,
    CameraDeviceConfig,
    CurveClientKeys,
    CurveServerKeys,
    RobotConfig,
    SessionConfig,
    load_config,
    save_config,
)
from robot_server.backends import RobotBackend, make_backend
from robot_server.backends.franka import FrankaArm
from robot_server.cameras import CameraDriver, CameraOutput, RealSenseCamera, SoftwareRealSense
from tools.cli import main as steerl_main
from tools.preflight import PreflightReport, run_preflight
from transport.zmq_link import generate_keypair

FRANKA_EXAMPLE = "franka_realsense_example"
SIM_IMAGES = "sim_panda_reach_images"
MEASURE_S = 0.4


@pytest.fixture(autouse=True)
def fresh_fake_arms() -> Iterator[None]:
    fake_franky.forget_arms()
    yield
    fake_franky.forget_arms()


# -- helpers --------------------------------------------------------------------------------------
def statuses(report: PreflightReport) -> dict[str, str]:
    return {row.check: row.status for row in report.rows}


def with_key_files(config: SessionConfig, directory: Path) -> SessionConfig:
    """``config`` with its CURVE key files replaced by fresh ones in ``directory``."""
    server_public, server_secret = generate_keypair(directory, "robot_server")
    actor_public, actor_secret = generate_keypair(directory, "actor")
    authorised = directory / "authorised"
    authorised.mkdir()
    shutil.copy(actor_public, authorised / actor_public.name)
    return dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, curve=CurveServerKeys(str(server_secret), str(authorised))),
        env=dataclasses.replace(config.env, curve=CurveClientKeys(str(actor_secret), str(server_public))))


def franka_config(tmp_path: Path, **robot_changes: Any) -> SessionConfig:
    config = with_key_files(load_config(FRANKA_EXAMPLE), tmp_path / "keys")
    return dataclasses.replace(config, robot=dataclasses.replace(config.robot, **robot_changes))


def fake_franka_factory(robot: RobotConfig) -> RobotBackend:
    return FrankaArm(robot, vendor=fake_franky)


class SoftwareCameras:
    """A software RealSense per camera device of ``robot`` (serials as configured), fed from a
    thread at each device's fps on a fixed-phase schedule; :meth:`driver` is the rig's factory."""

    def __init__(self, robot: RobotConfig) -> None:
        self.devices = {device.name: SoftwareRealSense(device.serial, device.width, device.height, device.fps)
                        for device in robot.camera_devices}
        rng = np.random.default_rng(0)
        first = robot.camera_devices[0]
        self._frames = [rng.integers(0, 256, (first.height, first.width, 3), dtype=np.uint8) for _ in range(4)]
        self._period_s = 1.0 / first.fps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._push, daemon=True)

    def _push(self) -> None:
        due_s = time.monotonic()
        index = 0
        while not self._stop.is_set():
            for device in self.devices.values():
                device.push(self._frames[index % len(self._frames)], timestamp_ms=1000.0 * time.monotonic())
            index += 1
            due_s += self._period_s
            self._stop.wait(max(0.0, due_s - time.monotonic()))

    def driver(self, device: Any, outputs: Sequence[CameraOutput]) -> CameraDriver:
        return RealSenseCamera(device, outputs, device=self.devices[device.name].device)

    def __enter__(self) -> "SoftwareCameras":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(2.0)


def motion_log(address: str) -> list[tuple]:
    """What the fake arm at ``address`` was told, apart from recovering from errors on connect."""
    return [entry for entry in fake_franky.arm_at(address).log if entry[0] != "recover"]


# -- (a) the simulated cell -----------------------------------------------------------------------
def test_sim_cell_passes_without_moving_the_arm() -> None:
    calls: list[str] = []
    tcps: list[np.ndarray] = []

    def recording_factory(robot: RobotConfig) -> RobotBackend:
        backend = make_backend(robot)
        read_state = backend.read_state

        def recorded_read_state():  # type: ignore[no-untyped-def]
            state = read_state()
            tcps.append(np.array(state.tcp_xyz))
            return state

        backend.read_state = recorded_read_state  # type: ignore[method-assign]
        for name in ("reset", "command", "advance", "hold"):
            setattr(backend, name, lambda *args, _name=name: calls.append(_name))
        return backend

    report = run_preflight(load_config(SIM_IMAGES), backend_factory=recording_factory, measure_s=0.3)
    checks = statuses(report)
    assert report.passed, report.failures
    for check in ("config", "workspace: reset pose", "workspace: reset range", "arm", "arm: TCP", "control loop",
                  "camera front", "camera wrist", "server CURVE", "env CURVE", "learner address"):
        assert checks[check] != "fail", (check, report.row(check))
    assert checks["arm"] == "ok" and checks["workspace: reset pose"] == "ok"
    assert report.row("camera front").value == "64x64x3"
    assert report.row("workspace: reset pose").value == "margin 200 mm"
    assert report.row("control loop").data["ticks"] == 3
    # Nothing moved the arm: no motion call, and every TCP read equals the first.
    assert calls == []
    assert len(tcps) >= 4
    for tcp in tcps:
        np.testing.assert_allclose(tcp, tcps[0], atol=1e-6)
    assert report.row("arm: TCP").data["moved_m"] < 1e-6


# -- (b) the Franka example: fake franky, software RealSense cameras -------------------------------
def test_franka_example_with_fake_arm_and_software_cameras_passes(tmp_path: Path) -> None:
    config = franka_config(tmp_path)
    with SoftwareCameras(config.robot) as cameras:
        report = run_preflight(config, backend_factory=fake_franka_factory, camera_driver_factory=cameras.driver,
                               measure_s=MEASURE_S)
    assert report.passed, report.failures
    checks = statuses(report)
    assert checks["arm"] == "ok" and checks["arm: TCP"] == "ok"
    assert report.row("arm: TCP").data["tcp_xyz"] == pytest.approx([0.45, 0.0, 0.30])
    for device in ("front_realsense", "wrist_realsense"):
        row = report.row(f"camera {device}")
        assert row.status == "ok", row
        assert row.data["fps"] == pytest.approx(30.0, rel=0.1)
        assert row.data["age_p99_ms"] <= 100.0
        assert "serial '00000000000" in row.detail
    assert report.row("camera front_realsense").data["shapes"] == {"front": [128, 128, 3]}
    assert report.row("workspace: reset range").value == "margin 100 mm"  # z: 0.35 - 0.25
    assert checks["server CURVE"] == "ok" and checks["env CURVE"] == "ok"
    # The arm was only connected to and read: the fake recorded no motion, stop or gripper command.
    assert motion_log(config.robot.franka.robot_ip) == []
    assert json.loads(json.dumps(report.to_dict()))["passed"] is True


def test_missing_key_files_fail_and_name_the_field() -> None:
    config = load_config(FRANKA_EXAMPLE)  # the example's /etc/steerl/keys/... files do not exist here
    robot = dataclasses.replace(config.robot, cameras=(), camera_devices=())
    report = run_preflight(dataclasses.replace(config, robot=robot), backend_factory=fake_franka_factory,
                           measure_s=0.1)
    server = report.row("server CURVE")
    assert server.status == "fail"
    assert "server.curve.secret_key_file: /etc/steerl/keys/robot_server.key_secret does not exist" in server.detail
    assert report.row("env CURVE").status == "fail" and "env.curve.server_public_key_file" in report.row("env CURVE").detail
    assert not report.passed


# -- (c) an unknown serial ----------------------------------------------------------------------
def test_unknown_serial_is_a_failing_row_naming_it(tmp_path: Path) -> None:
    config = franka_config(tmp_path)
    front, wrist = config.robot.camera_devices
    robot = dataclasses.replace(config.robot, camera_devices=(dataclasses.replace(front, serial="999999999999"), wrist))
    with SoftwareCameras(config.robot) as cameras:
        report = run_preflight(dataclasses.replace(config, robot=robot), backend_factory=fake_franka_factory,
                               camera_driver_factory=cameras.driver, measure_s=0.3)
    row = report.row("camera front_realsense")
    assert row.status == "fail"
    assert "no RealSense with serial '999999999999' is connected; connected serials: '000000000001'" in row.detail
    assert report.row("camera wrist_realsense").status == "ok"  # the other device is still measured
    assert not report.passed


def test_cli_exits_1_on_an_unknown_serial(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI and the production camera driver: no RealSense is plugged in here."""
    monkeypatch.setenv("COLUMNS", "200")
    config = load_config("sim_panda_reach")
    robot = dataclasses.replace(
        config.robot, backend="kinematic", cameras=(CameraConfig("table", 32, 32, device="front_rs"),),
        camera_devices=(CameraDeviceConfig("front_rs", "realsense", serial="424242424242"),))
    path = save_config(dataclasses.replace(config, robot=robot), tmp_path / "cell.yaml")
    assert steerl_main(["check", "--config", str(path), "--measure-s", "0.2"]) == 1
    output = capsys.readouterr().out
    assert "no RealSense with serial '424242424242' is connected; connected serials:" in output
    assert "FAIL" in output and "Traceback" not in output


# -- (d) an arm that refuses to connect ------------------------------------------------------------
def test_unreachable_arm_fails_its_row_and_the_rest_is_still_reported(tmp_path: Path) -> None:
    config = franka_config(tmp_path)
    fake_franky.arm_at(config.robot.franka.robot_ip).unreachable = True
    with SoftwareCameras(config.robot) as cameras:
        report = run_preflight(config, backend_factory=fake_franka_factory, camera_driver_factory=cameras.driver,
                               measure_s=0.3)
    arm = report.row("arm")
    assert arm.status == "fail" and arm.value == "unreachable"
    assert "ArmFault: franka: cannot connect to the arm at 172.16.0.2" in arm.detail
    assert "NetworkException" in arm.detail
    checks = statuses(report)
    assert "arm: TCP" not in checks
    assert checks["camera front_realsense"] == "ok" and checks["camera wrist_realsense"] == "ok"
    assert checks["control loop"] != "fail" and "arm unavailable" in report.row("control loop").detail
    assert checks["workspace: reset pose"] == "ok" and checks["learner address"] == "ok"
    assert not report.passed


# -- (e) reset poses and the box ------------------------------------------------------------------
def test_reset_range_leaving_the_box_fails(tmp_path: Path) -> None:
    config = franka_config(tmp_path)
    robot = config.robot
    franka = dataclasses.replace(robot.franka, reset=dataclasses.replace(robot.franka.reset, xyz_noise_m=(0.2, 0.0, 0.0)))
    robot = dataclasses.replace(robot, franka=franka, cameras=(), camera_devices=())
    report = run_preflight(dataclasses.replace(config, robot=robot), backend_factory=fake_franka_factory,
                           measure_s=0.1)
    assert report.row("workspace: reset pose").status == "ok"
    row = report.row("workspace: reset range")
    assert row.status == "fail" and row.value == "outside by 50 mm"
    assert "50 mm beyond safety.workspace_high[0] (x = 0.65 m)" in row.detail
    assert "50 mm beyond safety.workspace_low[0] (x = 0.35 m)" in row.detail
    assert "franka.reset.xyz_noise_m" in row.detail
    assert not report.passed
    assert motion_log(robot.franka.robot_ip) == []


def test_reset_pose_outside_the_box_is_a_config_error_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    config = load_config("sim_panda_reach")
    outside = dataclasses.replace(config, robot=dataclasses.replace(config.robot, reset_xyz=(0.9, 0.0, 0.25)))
    path = save_config(outside, tmp_path / "outside.yaml")
    report_file = tmp_path / "report.json"
    assert steerl_main(["check", "--config", str(path), "--json", str(report_file)]) == 1
    captured = capsys.readouterr()
    assert f"steerl: config error: {path}: robot: reset_xyz (0.9, 0.0, 0.25) lies outside the workspace box" \
        in captured.err
    assert "does not load" in captured.out and "Traceback" not in captured.out + captured.err
    report = json.loads(report_file.read_text())
    assert report["passed"] is False
    assert [row["check"] for row in report["rows"]] == ["config"]
    assert "robot: reset_xyz" in report["rows"][0]["detail"]


# -- (f) the CLI end to end ----------------------------------------------------------------------
def test_cli_check_on_the_sim_config_end_to_end(tmp_path: Path) -> None:
    report_file = tmp_path / "preflight.json"
    result = subprocess.run(
        [sys.executable, "-m", "tools.cli", "check", "--config", SIM_IMAGES, "--measure-s", "0.5",
         "--json", str(report_file)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "160"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "steerl pre-flight: sim_panda_reach_images" in result.stdout and "PASS" in result.stdout
    report = json.loads(report_file.read_text())
    assert report["config"] == SIM_IMAGES and report["passed"] is True
    rows = {row["check"]: row for row in report["rows"]}
    assert {"config", "workspace: reset pose", "workspace: reset range", "arm", "arm: TCP", "camera front",
            "camera wrist", "control loop", "server CURVE", "env CURVE", "learner address"} <= set(rows)
    assert all(row["status"] in ("ok", "warn") for row in report["rows"])
    assert rows["control loop"]["data"]["ticks"] == 5 and rows["control loop"]["data"]["rate_hz"] == 10.0
    assert rows["arm: TCP"]["data"]["moved_m"] < 1e-6


def test_check_explains_itself_and_refuses_a_non_positive_measurement(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        steerl_main(["check", "--help"])
    assert exit_info.value.code == 0
    assert "usage: steerl check" in capsys.readouterr().out
    assert steerl_main(["check", "--config", SIM_IMAGES, "--measure-s", "0"]) == 2
    assert "--measure-s must be positive" in capsys.readouterr().err
