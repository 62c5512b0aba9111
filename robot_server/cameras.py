"""Real cameras for the robot server: drivers with newest-frame-only capture threads, and a rig.

Layers
    :class:`CameraDriver` is one physical camera. ``start()`` opens the device (errors raise here,
    naming the device and serial) and starts one capture thread that waits for frames, stamps each
    with the host receive time (``time.monotonic``), crops and resizes it into every output that
    names the device, and publishes the result as the newest :class:`CapturedFrame`, replacing the
    previous one. Nothing queues: a slow reader simply sees fewer frames. Reading
    (:meth:`CameraDriver.snapshot`) takes a lock for a reference swap and never waits for a frame.
    The thread owns the device after ``start()`` and releases it when it ends, so ``close()`` only
    signals and joins with a timeout: it returns promptly even if a device read hangs.

    :class:`RealSenseCamera` (pyrealsense2) and :class:`OpenCVCamera` (any ``cv2.VideoCapture``
    source) implement the three device hooks (``_open``, ``_grab``, ``_release``).

    :class:`CameraRig` opens every device named by ``robot.cameras`` once and serves the cameras
    as the backend interface does (``camera_specs`` / ``read_cameras``), plus per-camera
    :class:`CameraHealth` (frame age, delivered fps, stale flag with the reason).

Outputs
    Each camera output crops the device frame to ``(x, y, width, height)`` source pixels, then
    resizes it to the configured size with ``cv2.INTER_AREA`` (depth: ``INTER_NEAREST``, so that
    no depth is invented across an edge) and delivers uint8 ``(height, width, 3)`` RGB.

Testing without hardware
    :class:`SoftwareRealSense` wraps pyrealsense2's ``software_device``: frames pushed into it
    travel through the same ``rs.pipeline`` (syncer, ``rs.align``) as a real camera's.
    ``rs.pipeline.set_device`` hands that device to the pipeline; a software device cannot be
    found by serial through an ``rs.context`` in pyrealsense2 2.59, so the driver checks the
    serial of a handed-in device itself.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import cv2
import numpy as np

from hardware_configs.schema import CameraConfig, CameraDeviceConfig, RobotConfig
from transport.spaces import FieldSpec

log = logging.getLogger(__name__)

# A capture thread waits at most this long for a frame before it checks whether to stop.
GRAB_TIMEOUT_S = 0.05
# Delivered fps is counted over this trailing window.
FPS_WINDOW_S = 1.0
CLOSE_TIMEOUT_S = 1.0
# V4L2 values of CAP_PROP_AUTO_EXPOSURE (OpenCV passes them through): manual and automatic.
V4L2_MANUAL_EXPOSURE = 1.0
V4L2_AUTO_EXPOSURE = 3.0


class CameraError(RuntimeError):
    """A camera cannot be opened or configured; the message names the device and its serial or
    source."""


class EndOfStream(Exception):
    """A finite source (a video file) has no more frames."""


@dataclass(frozen=True)
class CameraOutput:
    """One image cut from a device frame: ``crop`` (x, y, width, height in source pixels; None
    for the whole frame), then a resize to ``width`` x ``height``."""

    name: str
    width: int
    height: int
    crop: tuple[int, int, int, int] | None = None

    @classmethod
    def from_config(cls, camera: CameraConfig) -> "CameraOutput":
        return cls(camera.name, camera.width, camera.height, camera.crop)

    def spec(self) -> FieldSpec:
        """The observation field of this output: uint8 ``(height, width, 3)``."""
        return FieldSpec("uint8", (self.height, self.width, 3), 0, 255)


def crop_and_resize(image: np.ndarray, crop: tuple[int, int, int, int] | None, width: int, height: int,
                    interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """``image[y:y+h, x:x+w]`` resized to ``(height, width)``; always a new array."""
    if crop is not None:
        x, y, crop_width, crop_height = crop
        if x + crop_width > image.shape[1] or y + crop_height > image.shape[0]:
            raise ValueError(f"crop {crop} exceeds the {image.shape[1]}x{image.shape[0]} frame")
        image = image[y:y + crop_height, x:x + crop_width]
    if image.shape[:2] == (height, width):
        return image.copy()
    return cv2.resize(image, (width, height), interpolation=interpolation)


@dataclass(frozen=True)
class RawFrame:
    """A frame as a driver hook returns it, at the device's capture resolution."""

    image: np.ndarray  # (height, width, 3) uint8
    channel_order: Literal["rgb", "bgr"]
    device_timestamp_ms: float
    depth_m: np.ndarray | None = None  # (height, width) float32 metres, aligned to ``image``


@dataclass(frozen=True)
class CapturedFrame:
    """The newest frame of a device, already cut into its outputs.

    Its arrays are never modified after publication; readers that keep or change them copy.
    """

    images: Mapping[str, np.ndarray]  # output name -> uint8 (height, width, 3) RGB
    depth_m: Mapping[str, np.ndarray]  # output name -> float32 (height, width); empty without depth
    device_timestamp_ms: float  # the device's own clock (RealSense: frame timestamp; OpenCV: POS_MSEC)
    host_receive_s: float  # time.monotonic() when the capture thread got the frame
    sequence: int  # frames received since start (1 for the first)


@dataclass(frozen=True)
class CameraHealth:
    """How a camera is doing right now. ``reason`` says why it is stale ("" when it is not)."""

    age_ms: float  # now - host receive time of the newest frame (since start when none yet)
    fps: float  # frames delivered per second over the last FPS_WINDOW_S
    stale: bool
    frames: int
    reason: str = ""


class CameraDriver(ABC):
    """One physical camera with a capture thread that keeps only the newest frame.

    Subclasses implement the device hooks; the thread, the processing into outputs, the health
    and the shutdown live here. ``start()`` opens the device in the caller's thread (so that a
    wrong serial or mode raises there) and hands it to the capture thread.
    """

    def __init__(self, config: CameraDeviceConfig, outputs: Sequence[CameraOutput],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not outputs:
            raise ValueError(f"camera device {config.name!r}: no camera output uses it")
        self.config = config
        self.outputs = tuple(outputs)
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latest: CapturedFrame | None = None
        self._receive_times: collections.deque[float] = collections.deque(maxlen=4 * config.fps + 8)
        self._frames = 0
        self._failure = ""
        self._started_s = clock()

    # -- device hooks -------------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> None:
        """Open and configure the device; raise :class:`CameraError` naming it on failure."""

    @abstractmethod
    def _grab(self, timeout_s: float) -> RawFrame | None:
        """The next frame (the newest one if several are waiting), or None after ``timeout_s``
        without one. Raise :class:`EndOfStream` when a finite source is exhausted."""

    @abstractmethod
    def _release(self) -> None:
        """Stop the device and free it (called once, from the capture thread)."""

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    def start(self) -> None:
        """Open the device and start the capture thread."""
        if self._thread is not None:
            raise RuntimeError(f"camera device {self.name!r} is already started")
        self._open()
        self._started_s = self._clock()
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the capture thread to stop and release the device; does not wait."""
        self._stop.set()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Stop the capture thread (which releases the device). Returns False if the thread did
        not end within ``timeout_s`` (a device read hangs); it then ends on its own later."""
        self._stop.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("camera device %r: capture thread still running %.1f s after close",
                        self.name, timeout_s)
            return False
        return True

    def __enter__(self) -> "CameraDriver":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- capture thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                raw = self._grab(GRAB_TIMEOUT_S)
                if raw is None:
                    continue
                received_s = self._clock()
                frame = self._cut(raw, received_s)
                with self._lock:
                    self._latest = frame
                    self._receive_times.append(received_s)
                    self._frames = frame.sequence
        except EndOfStream:
            with self._lock:
                self._failure = "source ended"
        except Exception as error:  # a capture failure must surface as a stale camera, not a crash
            log.exception("camera device %r: capture failed", self.name)
            with self._lock:
                self._failure = f"capture failed: {type(error).__name__}: {error}"
        finally:
            try:
                self._release()
            except Exception:
                log.exception("camera device %r: release failed", self.name)

    def _cut(self, raw: RawFrame, received_s: float) -> CapturedFrame:
        images = {}
        depth = {}
        for output in self.outputs:
            image = crop_and_resize(raw.image, output.crop, output.width, output.height)
            if raw.channel_order == "bgr":
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            images[output.name] = image
            if raw.depth_m is not None:
                depth[output.name] = crop_and_resize(raw.depth_m, output.crop, output.width, output.height,
                                                     cv2.INTER_NEAREST)
        return CapturedFrame(images, depth, raw.device_timestamp_ms, received_s, self._frames + 1)

    # -- reading ------------------------------------------------------------------------------
    def latest(self) -> CapturedFrame | None:
        """The newest frame (None before the first); never waits."""
        with self._lock:
            return self._latest

    def health(self) -> CameraHealth:
        """Frame age, delivered fps and staleness now; never waits."""
        return self.snapshot()[1]

    def snapshot(self) -> tuple[CapturedFrame | None, CameraHealth]:
        """The newest frame and the health computed from that same frame, read atomically."""
        with self._lock:
            frame = self._latest
            failure = self._failure
            frames = self._frames
            now = self._clock()
            since = now - FPS_WINDOW_S
            recent = 0
            for stamp in reversed(self._receive_times):
                if stamp < since:
                    break
                recent += 1
        window_s = min(FPS_WINDOW_S, max(now - self._started_s, 1e-3))
        fps = recent / window_s
        age_ms = 1000.0 * (now - (frame.host_receive_s if frame is not None else self._started_s))
        limit_ms = self.config.max_frame_age_ms
        if self._thread is None:
            reason = "not started"
        elif failure:
            reason = failure
        elif self._stop.is_set():
            reason = "closed"
        elif frame is None:
            reason = f"no frame yet ({age_ms:.0f} ms since start)"
        elif age_ms > limit_ms:
            reason = f"no frame for {age_ms:.0f} ms (max_frame_age_ms {limit_ms:g})"
        else:
            reason = ""
        return frame, CameraHealth(age_ms=age_ms, fps=fps, stale=bool(reason), frames=frames, reason=reason)

    def wait_for_first_frame(self, timeout_s: float) -> bool:
        """Block (not for control loops) until the first frame arrived or the capture ended."""
        deadline = self._clock() + timeout_s
        while self._clock() < deadline:
            with self._lock:
                if self._latest is not None:
                    return True
                if self._failure:
                    return False
            time.sleep(0.005)
        return self.latest() is not None


# ----------------------------------------------------------------------------------------------
# RealSense
# ----------------------------------------------------------------------------------------------
def _realsense() -> Any:
    try:
        import pyrealsense2 as rs
    except ImportError as error:
        raise CameraError("driver 'realsense' needs pyrealsense2 (pip install pyrealsense2)") from error
    return rs


def connected_realsense_serials(context: Any = None) -> list[str]:
    """Serial numbers of the RealSense cameras connected now."""
    rs = _realsense()
    context = context if context is not None else rs.context()
    return [device.get_info(rs.camera_info.serial_number) for device in context.query_devices()]


class RealSenseCamera(CameraDriver):
    """An Intel RealSense selected by serial number, through ``rs.pipeline``.

    Colour is captured as RGB8 at ``width`` x ``height`` and ``fps``; with ``depth`` the depth
    stream (any resolution the camera offers at that fps) is aligned to colour with ``rs.align``.
    ``exposure`` None turns the colour sensor's auto exposure on; a value turns it off and sets
    the exposure option. ``device`` hands in an ``rs.device`` (tests: a software device) instead
    of looking the serial up in ``context``.
    """

    def __init__(self, config: CameraDeviceConfig, outputs: Sequence[CameraOutput], *,
                 device: Any = None, context: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config, outputs, clock)
        self._device = device
        self._context = context
        self._pipeline: Any = None
        self._align: Any = None

    def _describe(self) -> str:
        return f"RealSense camera device {self.name!r} (serial {self.config.serial!r})"

    def _open(self) -> None:
        rs = _realsense()
        serial = self.config.serial
        if self._device is not None:
            available = [self._device.get_info(rs.camera_info.serial_number)]
        else:
            self._context = self._context if self._context is not None else rs.context()
            available = connected_realsense_serials(self._context)
        if serial not in available:
            listed = ", ".join(repr(s) for s in available) or "none"
            raise CameraError(f"{self._describe()}: no RealSense with serial {serial!r} is connected; "
                              f"connected serials: {listed}")
        pipeline = rs.pipeline(self._context) if self._context is not None else rs.pipeline()
        if self._device is not None:
            pipeline.set_device(self._device)
        request = rs.config()
        request.enable_device(serial)
        request.enable_stream(rs.stream.color, self.config.width, self.config.height, rs.format.rgb8,
                              self.config.fps)
        if self.config.depth:
            request.enable_stream(rs.stream.depth, 0, 0, rs.format.z16, self.config.fps)
        mode = (f"colour rgb8 {self.config.width}x{self.config.height} @ {self.config.fps} fps"
                + (" + depth z16" if self.config.depth else ""))
        try:
            profile = pipeline.start(request)
        except RuntimeError as error:
            raise CameraError(f"{self._describe()}: cannot stream {mode}: {error}") from None
        try:
            self._configure_exposure(rs, profile.get_device())
        except Exception:
            pipeline.stop()
            raise
        self._pipeline = pipeline
        self._align = rs.align(rs.stream.color) if self.config.depth else None

    def _configure_exposure(self, rs: Any, device: Any) -> None:
        colour_sensor = None
        for sensor in device.query_sensors():
            if any(p.stream_type() == rs.stream.color for p in sensor.get_stream_profiles()):
                colour_sensor = sensor
                break
        if colour_sensor is None:
            raise CameraError(f"{self._describe()}: no sensor delivers colour")
        exposure = self.config.exposure
        if exposure is None:
            if colour_sensor.supports(rs.option.enable_auto_exposure):
                colour_sensor.set_option(rs.option.enable_auto_exposure, 1)
            return
        if not colour_sensor.supports(rs.option.exposure):
            raise CameraError(f"{self._describe()}: the colour sensor has no exposure option")
        if colour_sensor.supports(rs.option.enable_auto_exposure):
            colour_sensor.set_option(rs.option.enable_auto_exposure, 0)
        allowed = colour_sensor.get_option_range(rs.option.exposure)
        if not allowed.min <= exposure <= allowed.max:
            raise CameraError(f"{self._describe()}: exposure {exposure:g} lies outside the sensor's "
                              f"range [{allowed.min:g}, {allowed.max:g}]")
        colour_sensor.set_option(rs.option.exposure, float(exposure))

    def _grab(self, timeout_s: float) -> RawFrame | None:
        got, frames = self._pipeline.try_wait_for_frames(max(1, int(timeout_s * 1000)))
        if not got:
            return None
        while True:  # newest only: skip framesets that queued up behind this one
            newer = self._pipeline.poll_for_frames()
            if not newer:
                break
            frames = newer
        if self._align is not None:
            frames = self._align.process(frames)
        colour = frames.get_color_frame()
        if not colour:
            return None
        image = np.array(colour.get_data(), dtype=np.uint8, copy=True)
        depth_m = None
        if self._align is not None:
            depth = frames.get_depth_frame()
            if depth:
                depth_m = np.asarray(depth.get_data(), dtype=np.float32) * np.float32(depth.get_units())
        return RawFrame(image, "rgb", float(colour.get_timestamp()), depth_m)

    def _release(self) -> None:
        if self._pipeline is not None:
            self._pipeline.stop()
            self._pipeline = None


class SoftwareRealSense:
    """A RealSense that exists only in software (pyrealsense2 ``software_device``), for tests,
    benchmarks and dry runs without hardware. Hand :attr:`device` to :class:`RealSenseCamera`
    and :meth:`push` frames into it; they travel through the same pipeline as a camera's.

    The colour sensor offers RGB8 ``width`` x ``height`` at ``fps`` and the options
    ``exposure`` (1..10000) and ``enable_auto_exposure``; with ``depth`` a Z16 depth stream of
    the same size and intrinsics, with identity extrinsics to colour, so that aligned depth
    equals the pushed depth.
    """

    def __init__(self, serial: str, width: int = 640, height: int = 480, fps: int = 30,
                 depth: bool = False, depth_units_m: float = 0.001) -> None:
        rs = _realsense()
        self._rs = rs
        self.serial = serial
        self.width, self.height, self.fps = width, height, fps
        self.depth_units_m = depth_units_m
        self._frame_number = 0
        self.device = rs.software_device()
        self.device.register_info(rs.camera_info.serial_number, serial)
        self.device.register_info(rs.camera_info.name, "steerl software RealSense")
        self._colour_sensor = self.device.add_sensor("RGB Camera")
        self._colour_profile = self._colour_sensor.add_video_stream(
            self._video_stream(rs.stream.color, rs.format.rgb8, 3, uid=0)).as_video_stream_profile()
        self._colour_sensor.add_option(rs.option.exposure, self._option_range(1, 10000, 1, 166), True)
        self._colour_sensor.add_option(rs.option.enable_auto_exposure, self._option_range(0, 1, 1, 1), True)
        self._depth_sensor = None
        self._depth_profile = None
        if depth:
            self._depth_sensor = self.device.add_sensor("Stereo Module")
            self._depth_profile = self._depth_sensor.add_video_stream(
                self._video_stream(rs.stream.depth, rs.format.z16, 2, uid=1)).as_video_stream_profile()
            self._depth_sensor.add_read_only_option(rs.option.depth_units, depth_units_m)
            identity = rs.extrinsics()
            identity.rotation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
            identity.translation = [0.0, 0.0, 0.0]
            self._depth_profile.register_extrinsics_to(self._colour_profile, identity)
        self.device.create_matcher(rs.matchers.default)

    def _option_range(self, low: float, high: float, step: float, default: float) -> Any:
        # Set field by field: the positional constructor of pyrealsense2 2.59 swaps step and default.
        option_range = self._rs.option_range()
        option_range.min, option_range.max, option_range.step, option_range.default = low, high, step, default
        return option_range

    def _video_stream(self, kind: Any, pixel_format: Any, bytes_per_pixel: int, uid: int) -> Any:
        rs = self._rs
        intrinsics = rs.intrinsics()
        intrinsics.width, intrinsics.height = self.width, self.height
        intrinsics.fx = intrinsics.fy = float(self.width)
        intrinsics.ppx, intrinsics.ppy = self.width / 2.0, self.height / 2.0
        intrinsics.model = rs.distortion.none
        intrinsics.coeffs = [0.0] * 5
        stream = rs.video_stream()
        stream.type, stream.index, stream.uid = kind, 0, uid
        stream.width, stream.height, stream.fps = self.width, self.height, self.fps
        stream.bpp, stream.fmt, stream.intrinsics = bytes_per_pixel, pixel_format, intrinsics
        return stream

    def exposure(self) -> tuple[float, float]:
        """The colour sensor's (exposure, enable_auto_exposure) option values."""
        rs = self._rs
        return (self._colour_sensor.get_option(rs.option.exposure),
                self._colour_sensor.get_option(rs.option.enable_auto_exposure))

    def push(self, rgb: np.ndarray, timestamp_ms: float, depth: np.ndarray | None = None) -> None:
        """Deliver one frame: uint8 ``(height, width, 3)`` RGB and, for a depth device, uint16
        ``(height, width)`` depth in ``depth_units_m`` (pyrealsense2 copies the pixels)."""
        self._frame_number += 1
        self._inject(self._colour_sensor, self._colour_profile, np.ascontiguousarray(rgb, dtype=np.uint8), 3,
                     timestamp_ms)
        if self._depth_sensor is not None:
            if depth is None:
                depth = np.zeros((self.height, self.width), dtype=np.uint16)
            frame_depth = np.ascontiguousarray(depth, dtype=np.uint16)
            self._inject(self._depth_sensor, self._depth_profile, frame_depth, 2, timestamp_ms,
                         depth_units=self.depth_units_m)

    def _inject(self, sensor: Any, profile: Any, pixels: np.ndarray, bytes_per_pixel: int, timestamp_ms: float,
                depth_units: float | None = None) -> None:
        if pixels.shape[:2] != (self.height, self.width):
            raise ValueError(f"software RealSense {self.serial!r}: frame shape {pixels.shape} is not "
                             f"({self.height}, {self.width}, ...)")
        frame = self._rs.software_video_frame()
        frame.pixels = pixels
        frame.bpp = bytes_per_pixel
        frame.stride = self.width * bytes_per_pixel
        frame.timestamp = float(timestamp_ms)
        frame.domain = self._rs.timestamp_domain.hardware_clock
        frame.frame_number = self._frame_number
        frame.profile = profile
        if depth_units is not None:
            frame.depth_units = depth_units
        sensor.on_video_frame(frame)


# ----------------------------------------------------------------------------------------------
# OpenCV
# ----------------------------------------------------------------------------------------------
class OpenCVCamera(CameraDriver):
    """Any ``cv2.VideoCapture`` source: a device index, or a path or URL.

    A device index gets the capture mode, a one-frame driver buffer and the exposure requested
    (V4L2 semantics of ``CAP_PROP_AUTO_EXPOSURE``). A video file plays back at ``fps`` and ends
    (the camera then reports "source ended"). The first frame is read at open to check that the
    source delivers ``width`` x ``height``.
    """

    def __init__(self, config: CameraDeviceConfig, outputs: Sequence[CameraOutput],
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config, outputs, clock)
        source = config.source
        if isinstance(source, str) and source.isdigit():
            source = int(source)
        self._source: int | str = source
        self._is_file = isinstance(source, str) and Path(source).is_file()
        self._capture: cv2.VideoCapture | None = None
        self._pending: RawFrame | None = None
        self._next_due_s = 0.0

    def _describe(self) -> str:
        return f"OpenCV camera device {self.name!r} (source {self._source!r})"

    def _open(self) -> None:
        capture = cv2.VideoCapture(self._source)
        if not capture.isOpened():
            raise CameraError(f"{self._describe()}: cv2.VideoCapture cannot open the source")
        try:
            if isinstance(self._source, int):
                self._configure_device(capture)
            first = self._read(capture)
            if first is None:
                raise CameraError(f"{self._describe()}: the source delivered no frame")
            height, width = first.image.shape[:2]
            if (width, height) != (self.config.width, self.config.height):
                raise CameraError(f"{self._describe()}: the source delivers {width}x{height} frames, the "
                                  f"config asks for {self.config.width}x{self.config.height}")
        except Exception:
            capture.release()
            raise
        self._capture = capture
        self._pending = first
        self._next_due_s = self._clock()

    def _configure_device(self, capture: cv2.VideoCapture) -> None:
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.config.width)
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.config.height)
        capture.set(cv2.CAP_PROP_FPS, self.config.fps)
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver keeps one frame: reads get the newest
        if self.config.exposure is None:
            if not capture.set(cv2.CAP_PROP_AUTO_EXPOSURE, V4L2_AUTO_EXPOSURE):
                log.warning("%s: cannot switch auto exposure on", self._describe())
            return
        if not (capture.set(cv2.CAP_PROP_AUTO_EXPOSURE, V4L2_MANUAL_EXPOSURE)
                and capture.set(cv2.CAP_PROP_EXPOSURE, float(self.config.exposure))):
            raise CameraError(f"{self._describe()}: the source refuses manual exposure "
                              f"{self.config.exposure:g}")

    @staticmethod
    def _read(capture: cv2.VideoCapture) -> RawFrame | None:
        ok, image = capture.read()
        if not ok or image is None:
            return None
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        return RawFrame(image, "bgr", float(capture.get(cv2.CAP_PROP_POS_MSEC)))

    def _grab(self, timeout_s: float) -> RawFrame | None:
        if self._is_file:
            # Play back at the configured rate instead of as fast as the file decodes.
            wait_s = self._next_due_s - self._clock()
            if wait_s > timeout_s:
                time.sleep(timeout_s)
                return None
            if wait_s > 0:
                time.sleep(wait_s)
            self._next_due_s = max(self._next_due_s + 1.0 / self.config.fps, self._clock())
        if self._pending is not None:
            frame, self._pending = self._pending, None
            return frame
        assert self._capture is not None
        frame = self._read(self._capture)
        if frame is None:
            if self._is_file:
                raise EndOfStream()
            raise CameraError(f"{self._describe()}: the source stopped delivering frames")
        return frame

    def _release(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


# ----------------------------------------------------------------------------------------------
# Rig
# ----------------------------------------------------------------------------------------------
DriverFactory = Callable[[CameraDeviceConfig, Sequence[CameraOutput]], CameraDriver]


def make_camera_driver(config: CameraDeviceConfig, outputs: Sequence[CameraOutput]) -> CameraDriver:
    """The driver named by ``config.driver`` (not started)."""
    if config.driver == "realsense":
        return RealSenseCamera(config, outputs)
    if config.driver == "opencv":
        return OpenCVCamera(config, outputs)
    raise CameraError(f"camera device {config.name!r}: unknown driver {config.driver!r}")


class CameraRig:
    """The robot's physical cameras: every device named by a camera opened once, its outputs
    served by camera name as a backend serves its cameras.

    ``driver_factory`` builds the (unstarted) driver of a device; tests hand in one that gives a
    :class:`RealSenseCamera` a :class:`SoftwareRealSense` device.
    """

    def __init__(self, devices: Sequence[CameraDeviceConfig], cameras: Sequence[CameraConfig],
                 driver_factory: DriverFactory = make_camera_driver) -> None:
        by_name = {device.name: device for device in devices}
        outputs: dict[str, list[CameraOutput]] = {}
        self._device_of: dict[str, CameraDeviceConfig] = {}
        for camera in cameras:
            if not camera.device:
                continue
            if camera.device not in by_name:
                raise CameraError(f"camera {camera.name!r}: device {camera.device!r} is not configured")
            outputs.setdefault(camera.device, []).append(CameraOutput.from_config(camera))
            self._device_of[camera.name] = by_name[camera.device]
        self._outputs = {o.name: o for group in outputs.values() for o in group}
        self._drivers: dict[str, CameraDriver] = {}
        try:
            for device_name, device_outputs in outputs.items():
                driver = driver_factory(by_name[device_name], device_outputs)
                driver.start()
                self._drivers[device_name] = driver
        except BaseException:
            self.close()
            raise
        self._blank = {name: np.zeros(o.spec().shape, dtype=np.uint8) for name, o in self._outputs.items()}

    @classmethod
    def from_robot_config(cls, robot: RobotConfig, driver_factory: DriverFactory = make_camera_driver) -> "CameraRig":
        """The rig of ``robot.cameras`` that name one of ``robot.camera_devices``."""
        return cls(robot.camera_devices, robot.cameras, driver_factory)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(self._outputs)

    @property
    def drivers(self) -> Mapping[str, CameraDriver]:
        """The started drivers by device name."""
        return dict(self._drivers)

    def device_of(self, camera: str) -> CameraDeviceConfig:
        """The device config of camera output ``camera``."""
        return self._device_of[camera]

    def camera_specs(self) -> dict[str, FieldSpec]:
        """``{camera_name: spec}``: uint8 ``(height, width, 3)`` per output."""
        return {name: output.spec() for name, output in self._outputs.items()}

    def read(self) -> tuple[dict[str, np.ndarray], dict[str, CameraHealth]]:
        """The newest image of every camera (a copy; black before the first frame) and the health
        computed from those same frames. Never waits for a frame."""
        images: dict[str, np.ndarray] = {}
        health: dict[str, CameraHealth] = {}
        for driver in self._drivers.values():
            frame, device_health = driver.snapshot()
            for output in driver.outputs:
                source = frame.images[output.name] if frame is not None else self._blank[output.name]
                images[output.name] = source.copy()
                health[output.name] = device_health
        return images, health

    def read_cameras(self) -> dict[str, np.ndarray]:
        """The newest frame of each camera, uint8 ``(height, width, 3)`` RGB."""
        return self.read()[0]

    def read_depth(self) -> dict[str, np.ndarray]:
        """Aligned depth (float32 metres, ``(height, width)``) of the cameras whose device streams
        depth and has delivered a frame."""
        depth: dict[str, np.ndarray] = {}
        for driver in self._drivers.values():
            frame = driver.latest()
            if frame is not None:
                depth.update({name: values.copy() for name, values in frame.depth_m.items()})
        return depth

    def health(self) -> dict[str, CameraHealth]:
        """Per camera: frame age, delivered fps and whether it is stale (with the reason)."""
        return self.read()[1]

    def wait_for_first_frames(self, timeout_s: float) -> list[str]:
        """Block (start-up only) until every device delivered a frame; returns the names of the
        devices that did not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        missing = []
        for name, driver in self._drivers.items():
            if not driver.wait_for_first_frame(max(0.0, deadline - time.monotonic())):
                missing.append(name)
        return missing

    def close(self) -> None:
        """Stop every capture thread (each releases its device); returns within about
        CLOSE_TIMEOUT_S in all even if devices hang."""
        for driver in self._drivers.values():
            driver.request_stop()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for driver in self._drivers.values():
            driver.close(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "CameraRig":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
