"""Real camera path: RealSense through pyrealsense2's software_device (the real pipeline, syncer
and rs.align; only the sensor is software), OpenCV through cv2.VideoCapture on a generated video
file, the rig, the config rules, and a robot cell that ends an episode on a camera fault."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

from hardware_configs.loader import ConfigError, load_dataclass
from hardware_configs.schema import CameraConfig, CameraDeviceConfig, SessionConfig, load_config, save_config
from robot_server.backends import make_backend
from robot_server.cameras import (
    CameraError,
    CameraOutput,
    CameraRig,
    OpenCVCamera,
    RealSenseCamera,
    SoftwareRealSense,
    crop_and_resize,
)
from robot_server.cell import EpisodeNotStarted, RobotCell

WIDTH, HEIGHT, FPS = 64, 48, 30


def pattern(index: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """An RGB frame that differs along x, along y and from frame to frame."""
    rng = np.random.default_rng(index)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


def realsense_config(**changes: object) -> CameraDeviceConfig:
    fields = dict(name="front_rs", driver="realsense", serial="SW-1", width=WIDTH, height=HEIGHT, fps=FPS)
    fields.update(changes)
    config = CameraDeviceConfig(**fields)  # type: ignore[arg-type]
    config.validate()
    return config


def full_frame(name: str = "full") -> CameraOutput:
    return CameraOutput(name, WIDTH, HEIGHT)


@pytest.fixture
def software_camera() -> SoftwareRealSense:
    return SoftwareRealSense("SW-1", WIDTH, HEIGHT, FPS)


# ----------------------------------------------------------------------------------------------
# RealSense driver
# ----------------------------------------------------------------------------------------------
def test_realsense_keeps_only_the_newest_frame_with_its_timestamps(software_camera: SoftwareRealSense) -> None:
    camera = RealSenseCamera(realsense_config(), [full_frame()], device=software_camera.device)
    assert camera.latest() is None
    with camera:
        before_s = time.monotonic()
        for index in range(1, 9):  # a burst: the reader must end up with the last one only
            software_camera.push(pattern(index), timestamp_ms=1000.0 + 33.3 * index)
        assert wait_until(lambda: camera.latest() is not None and camera.latest().device_timestamp_ms == pytest.approx(1000.0 + 33.3 * 8))
        frame = camera.latest()
        assert frame is not None
        np.testing.assert_array_equal(frame.images["full"], pattern(8))
        assert frame.images["full"].dtype == np.uint8 and frame.images["full"].shape == (HEIGHT, WIDTH, 3)
        assert before_s <= frame.host_receive_s <= time.monotonic()
        assert 1 <= frame.sequence <= 8
        # Reading never waits: no new frame, the same frame again at once.
        started = time.perf_counter()
        again = camera.latest()
        assert time.perf_counter() - started < 0.01
        assert again is frame
        health = camera.health()
        assert not health.stale and health.reason == "" and health.frames == frame.sequence


def test_crop_then_resize_matches_cv2_for_two_outputs_of_one_device(software_camera: SoftwareRealSense) -> None:
    outputs = [CameraOutput("table", 20, 16, (8, 4, 40, 32)), CameraOutput("overview", 32, 24, None)]
    image = pattern(3)
    with RealSenseCamera(realsense_config(), outputs, device=software_camera.device) as camera:
        software_camera.push(image, timestamp_ms=5.0)
        assert wait_until(lambda: camera.latest() is not None)
        frame = camera.latest()
    assert frame is not None
    np.testing.assert_array_equal(frame.images["table"],
                                  cv2.resize(image[4:36, 8:48], (20, 16), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(frame.images["overview"],
                                  cv2.resize(image, (32, 24), interpolation=cv2.INTER_AREA))
    assert frame.depth_m == {}


def test_crop_outside_the_frame_is_refused() -> None:
    with pytest.raises(ValueError, match=r"crop \(50, 0, 20, 10\) exceeds the 64x48 frame"):
        crop_and_resize(pattern(0), (50, 0, 20, 10), 8, 8)


def test_realsense_depth_is_aligned_to_colour_and_cut_like_it() -> None:
    device = SoftwareRealSense("SW-D", WIDTH, HEIGHT, FPS, depth=True)
    depth_raw = (np.arange(HEIGHT)[:, None] * 40 + np.arange(WIDTH)[None, :] + 500).astype(np.uint16)
    output = CameraOutput("table", 20, 16, (8, 4, 40, 32))
    with RealSenseCamera(realsense_config(serial="SW-D", depth=True), [output], device=device.device) as camera:
        device.push(pattern(1), timestamp_ms=10.0, depth=depth_raw)
        assert wait_until(lambda: camera.latest() is not None)
        frame = camera.latest()
    assert frame is not None
    depth = frame.depth_m["table"]
    assert depth.shape == (16, 20) and depth.dtype == np.float32
    # Identity extrinsics and equal intrinsics: aligned depth equals the pushed depth, except for
    # the odd hole (0) that rs.align leaves where rounding maps two depth pixels to one.
    expected = cv2.resize(depth_raw[4:36, 8:48].astype(np.float32) * 0.001, (20, 16),
                          interpolation=cv2.INTER_NEAREST)
    valid = depth > 0
    assert valid.mean() > 0.95
    np.testing.assert_allclose(depth[valid], expected[valid], rtol=1e-5)
    np.testing.assert_array_equal(frame.images["table"],
                                  cv2.resize(pattern(1)[4:36, 8:48], (20, 16), interpolation=cv2.INTER_AREA))


def test_unknown_serial_names_it_and_lists_the_connected_ones(software_camera: SoftwareRealSense) -> None:
    camera = RealSenseCamera(realsense_config(serial="123456789"), [full_frame()], device=software_camera.device)
    with pytest.raises(CameraError, match=r"serial '123456789' is connected; connected serials: 'SW-1'"):
        camera.start()
    # The production path looks the serial up among the cameras plugged into this machine (none here).
    with pytest.raises(CameraError, match=r"'front_rs' \(serial '987654321'\).*connected serials: "):
        RealSenseCamera(realsense_config(serial="987654321"), [full_frame()]).start()


def test_unsupported_capture_mode_names_the_mode(software_camera: SoftwareRealSense) -> None:
    camera = RealSenseCamera(realsense_config(width=640, height=480), [CameraOutput("full", 64, 48)],
                             device=software_camera.device)
    with pytest.raises(CameraError, match=r"serial 'SW-1'.*cannot stream colour rgb8 640x480 @ 30 fps"):
        camera.start()


def test_realsense_exposure_manual_auto_and_out_of_range(software_camera: SoftwareRealSense) -> None:
    with RealSenseCamera(realsense_config(exposure=300.0), [full_frame()], device=software_camera.device):
        assert software_camera.exposure() == (300.0, 0.0)
    with RealSenseCamera(realsense_config(), [full_frame()], device=software_camera.device):
        assert software_camera.exposure()[1] == 1.0
    camera = RealSenseCamera(realsense_config(exposure=50000.0), [full_frame()], device=software_camera.device)
    with pytest.raises(CameraError, match=r"exposure 50000 lies outside the sensor's range \[1, 10000\]"):
        camera.start()


def test_stale_when_frames_stop_and_close_returns_promptly(software_camera: SoftwareRealSense) -> None:
    camera = RealSenseCamera(realsense_config(max_frame_age_ms=100.0), [full_frame()], device=software_camera.device)
    camera.start()
    first = camera.health()
    assert first.stale and first.reason.startswith("no frame yet")
    for index in range(5):
        software_camera.push(pattern(index), timestamp_ms=33.3 * index)
        time.sleep(0.01)
    assert wait_until(lambda: camera.latest() is not None and camera.latest().sequence >= 1)
    fresh = camera.health()
    assert not fresh.stale and fresh.age_ms < 100.0 and fresh.fps > 0
    time.sleep(0.15)  # the producer stopped: the newest frame ages past max_frame_age_ms
    started = time.perf_counter()
    stale = camera.health()
    assert time.perf_counter() - started < 0.01
    assert stale.stale and stale.age_ms > 100.0 and stale.reason.startswith("no frame for")
    started = time.perf_counter()
    assert camera.close() is True
    assert time.perf_counter() - started < 0.5
    assert camera.health().reason == "closed"


# ----------------------------------------------------------------------------------------------
# OpenCV driver
# ----------------------------------------------------------------------------------------------
def write_video(path: Path, frames: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), float(FPS), (WIDTH, HEIGHT))
    assert writer.isOpened()
    for index in range(frames):
        writer.write(cv2.cvtColor(pattern(index), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def opencv_config(source: str, **changes: object) -> CameraDeviceConfig:
    fields = dict(name="usb", driver="opencv", source=source, width=WIDTH, height=HEIGHT, fps=FPS)
    fields.update(changes)
    config = CameraDeviceConfig(**fields)  # type: ignore[arg-type]
    config.validate()
    return config


def test_opencv_video_file_plays_back_cut_to_rgb_then_ends(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", frames=10)
    output = CameraOutput("table", 20, 16, (8, 4, 40, 32))
    camera = OpenCVCamera(opencv_config(str(video)), [output])
    with camera:
        assert wait_until(lambda: camera.latest() is not None)
        frame = camera.latest()
        assert frame is not None
        index = round(frame.device_timestamp_ms * FPS / 1000.0)  # CAP_PROP_POS_MSEC of the frame
        expected = cv2.resize(pattern(index)[4:36, 8:48], (20, 16), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(frame.images["table"], expected)
        # Played back at the configured rate: 10 frames take about a third of a second.
        assert wait_until(lambda: camera.health().reason == "source ended", timeout_s=3.0)
        health = camera.health()
        assert health.stale and health.frames == 10
        assert camera.latest().device_timestamp_ms == pytest.approx(9 * 1000.0 / FPS, abs=1.0)


def test_opencv_errors_name_the_source(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", frames=2)
    with pytest.raises(CameraError, match=r"delivers 64x48 frames, the config asks for 80x60"):
        OpenCVCamera(opencv_config(str(video), width=80, height=60), [CameraOutput("c", 16, 16)]).start()
    missing = str(tmp_path / "nothing.avi")
    with pytest.raises(CameraError, match=r"source '.*nothing.avi'\): cv2.VideoCapture cannot open"):
        OpenCVCamera(opencv_config(missing), [CameraOutput("c", 16, 16)]).start()


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def session(cameras: list[dict], devices: list[dict], **robot: object) -> dict:
    return {"name": "cams", "robot": {"backend": "kinematic", "cameras": cameras, "camera_devices": devices, **robot}}


RS_DEVICE = {"name": "front_rs", "driver": "realsense", "serial": "SW-CELL", "width": WIDTH, "height": HEIGHT}


@pytest.mark.parametrize("cameras, devices, expected", [
    ([{"name": "a", "device": "nope"}], [RS_DEVICE],
     "robot: cameras[0].device: 'nope' is not an entry of camera_devices (known: front_rs)"),
    ([{"name": "a", "device": "front_rs", "crop": [10, 0, 60, 48]}], [RS_DEVICE],
     "robot: cameras[0].crop: (10, 0, 60, 48) (x, y, width, height) exceeds the 64x48 capture"),
    ([{"name": "a", "crop": [0, 0, 10, 10]}], [], "robot.cameras[0]: camera 'a': crop applies only to a camera with a device"),
    ([{"name": "a", "device": "front_rs", "crop": [0, 0, 10]}], [RS_DEVICE], "robot.cameras[0].crop: expected 4 values"),
    ([], [{"name": "x", "driver": "realsense"}], "robot.camera_devices[0]: camera device 'x': serial is required"),
    ([], [{"name": "x", "driver": "opencv"}], "camera device 'x': source (index, path or URL) is required"),
    ([], [{"name": "x", "driver": "opencv", "source": 0, "depth": True}], "depth is supported by driver 'realsense' only"),
    ([], [{"name": "x", "driver": "gopro", "source": 0}], "robot.camera_devices[0].driver: expected one of"),
    ([], [RS_DEVICE, RS_DEVICE], "camera_devices names must be unique"),
])
def test_camera_config_errors_name_the_field(cameras: list[dict], devices: list[dict], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_dataclass(SessionConfig, session(cameras, devices), "cams.yaml")
    assert expected in str(error.value)


def test_camera_device_config_loads_and_round_trips(tmp_path: Path) -> None:
    config = load_dataclass(SessionConfig, session(
        [{"name": "table", "width": 64, "height": 64, "device": "front_rs", "crop": [0, 0, 48, 48]},
         {"name": "usb", "device": "webcam"}],
        [RS_DEVICE, {"name": "webcam", "driver": "opencv", "source": 0, "exposure": 120}],
    ))
    assert config.robot.cameras[0].crop == (0, 0, 48, 48) and config.robot.cameras[1].crop is None
    assert config.robot.camera_devices[1].source == 0 and config.robot.camera_devices[1].exposure == 120.0
    assert config.robot.simulated_cameras == ()
    assert load_config(save_config(config, tmp_path / "copy.yaml")) == config
    assert load_config("sim_panda_reach_images").robot.cameras[0] == CameraConfig("front", 64, 64)


# ----------------------------------------------------------------------------------------------
# Rig and robot cell
# ----------------------------------------------------------------------------------------------
class Producer:
    """Pushes frames into a software RealSense at ``fps`` until stopped."""

    def __init__(self, camera: SoftwareRealSense, fps: float = 50.0) -> None:
        self._camera, self._period_s = camera, 1.0 / fps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        index = 0
        while not self._stop.wait(self._period_s):
            index += 1
            self._camera.push(pattern(index % 8), timestamp_ms=1000.0 * time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)


# Generous, so that a loaded test machine does not make a 50 fps producer look stale.
CELL_MAX_FRAME_AGE_MS = 150.0


def cell_config(max_stale_steps: int = 1) -> SessionConfig:
    device = dict(RS_DEVICE, max_frame_age_ms=CELL_MAX_FRAME_AGE_MS, max_stale_steps=max_stale_steps)
    return load_dataclass(SessionConfig, session(
        [{"name": "table", "width": 32, "height": 24, "device": "front_rs", "crop": [0, 0, 64, 48]},
         {"name": "gripper", "width": 16, "height": 16, "device": "front_rs", "crop": [16, 8, 32, 32]},
         {"name": "sim", "width": 16, "height": 16}],
        [device], task={"name": "reach", "max_episode_steps": 1000},
    ))


def test_rig_opens_each_device_once_and_serves_its_cameras() -> None:
    config = cell_config()
    software = SoftwareRealSense("SW-CELL", WIDTH, HEIGHT, FPS)
    opened: list[str] = []

    def factory(device: CameraDeviceConfig, outputs):  # type: ignore[no-untyped-def]
        opened.append(device.name)
        return RealSenseCamera(device, outputs, device=software.device)

    with CameraRig.from_robot_config(config.robot, factory) as rig:
        assert opened == ["front_rs"]
        assert {name: spec.shape for name, spec in rig.camera_specs().items()} == {
            "table": (24, 32, 3), "gripper": (16, 16, 3)}
        images, health = rig.read()  # before the first frame: black, stale, no waiting
        assert not images["table"].any() and health["table"].stale
        software.push(pattern(5), timestamp_ms=1.0)
        assert rig.wait_for_first_frames(2.0) == []
        images = rig.read_cameras()
        np.testing.assert_array_equal(images["gripper"], cv2.resize(pattern(5)[8:40, 16:48], (16, 16),
                                                                    interpolation=cv2.INTER_AREA))
        assert rig.read_depth() == {}


def test_cell_serves_camera_images_and_ends_the_episode_on_a_camera_fault() -> None:
    config = cell_config(max_stale_steps=1)
    software = SoftwareRealSense("SW-CELL", WIDTH, HEIGHT, FPS)
    producer = Producer(software)
    rig = CameraRig.from_robot_config(
        config.robot, lambda device, outputs: RealSenseCamera(device, outputs, device=software.device))
    backend = make_backend(config.robot)
    holds: list[int] = []
    commands: list[int] = []
    real_hold, real_command = backend.hold, backend.command
    backend.hold = lambda: (holds.append(1), real_hold())[1]  # type: ignore[method-assign]
    backend.command = lambda target: (commands.append(1), real_command(target))[1]  # type: ignore[method-assign]
    cell = RobotCell(config, backend=backend, camera_rig=rig)
    try:
        assert cell.spaces.observation["images/table"].shape == (24, 32, 3)
        assert cell.spaces.observation["images/gripper"].shape == (16, 16, 3)
        assert cell.spaces.observation["images/sim"].shape == (16, 16, 3)  # rendered by the backend
        observation, info, _ = cell.reset(seed=0)
        assert observation["images/table"].shape == (24, 32, 3) and observation["images/table"].any()
        assert observation["images/sim"].shape == (16, 16, 3)
        assert 0.0 <= info["camera/table/age_ms"] < CELL_MAX_FRAME_AGE_MS and info["camera_fault"] == 0.0
        action = np.array([0.5, 0.0, 0.0, -1.0], dtype=np.float32)
        for _ in range(3):
            result = cell.step(action)
            assert not result.truncated and result.info["camera_fault"] == 0.0
            assert result.info["camera/gripper/age_ms"] < CELL_MAX_FRAME_AGE_MS
            assert result.info["watchdog_tripped"] == 0.0 and "safety/clipped_box" in result.info
            time.sleep(0.02)
        assert len(commands) == 3

        producer.stop()  # the camera goes quiet
        time.sleep(0.2)
        tolerated = cell.step(action)  # first stale step: within max_stale_steps = 1
        assert not tolerated.truncated and tolerated.info["camera/table/stale"] == 1.0
        assert tolerated.info["camera_fault"] == 0.0
        holds.clear()
        faulted = cell.step(action)
        assert faulted.truncated and not faulted.terminated
        assert faulted.info["camera_fault"] == 1.0 and faulted.info["camera_faults"] == 1.0
        assert faulted.info["camera/table/age_ms"] > CELL_MAX_FRAME_AGE_MS
        assert holds, "the arm must be held on a camera fault"
        with pytest.raises(EpisodeNotStarted):
            cell.step(action)

        # While the fault lasts a new episode reports it and its first step moves nothing.
        _, info, _ = cell.reset()
        assert info["camera_fault"] == 1.0
        moved_before = len(commands)
        refused = cell.step(action)
        assert refused.truncated and refused.info["camera_fault"] == 1.0 and len(commands) == moved_before

        producer = Producer(software)  # the camera comes back
        assert wait_until(lambda: not rig.health()["table"].stale)
        _, info, _ = cell.reset()
        assert info["camera_fault"] == 0.0
        assert not cell.step(action).truncated
    finally:
        producer.stop()
        started = time.perf_counter()
        cell.close()
        assert time.perf_counter() - started < 1.0
