#!/usr/bin/env python
"""Camera benchmark: how old the camera images are when the robot server builds an observation,
and what reading them costs the control loop.

    python benchmarks/cameras.py [--json PATH] [--quick] [--seconds S]

Setup: two RealSense cameras as pyrealsense2 ``software_device`` s (the real ``rs.pipeline``
path of :class:`~robot_server.cameras.RealSenseCamera`; only the sensor is software), 640x480
RGB8 at 30 fps, fed by one producer thread in real time (each frame is stamped with the
producer's monotonic clock when it is pushed: the "capture" time). Each camera is cropped to
its central 480x480 and resized to 128x128 by its capture thread. A :class:`RobotCell` with the
``kinematic`` backend steps a 10 Hz control loop and reads both cameras in every observation.
Control tick ``k`` lies at ``k x 100 ms`` plus a random phase within one frame period, so that
the samples cover every phase between the camera and control clocks (on a real cell the two
clocks drift against each other).

Measured per observation and camera:

- **frame age**: observation time - capture time of the frame in it (push -> pipeline -> capture
  thread -> crop/resize -> observation); also the age since the capture thread received the frame
  (what the cell reports as ``camera/<name>/age_ms``) and the driver latency (push -> receive).
- **delivered fps**: frames published by each capture thread per second of the timed window.
- **observation assembly**: wall time of the cell's observation assembly (arm state + both
  cameras' newest frames + their health) inside each step, and of the whole ``cell.step``.

Targets (PASS/FAIL, stored in the JSON as booleans; a miss does not fail the script): frame age
p99 <= one frame period + 5 ms (38.3 ms); observation assembly p99 <= 2 ms.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (benchmarks/machine.py: what every benchmark records)

CAPTURE_WIDTH, CAPTURE_HEIGHT, CAPTURE_FPS = 640, 480, 30
OUTPUT_SIZE = 128
CROP = (80, 0, 480, 480)  # the central square of the 640x480 frame
CONTROL_HZ = 10.0
SERIALS = {"cam_a": "BENCH-A", "cam_b": "BENCH-B"}
FRAME_POOL = 8
WARMUP_S = 1.0
QUICK_WARMUP_S = 0.5
FULL_SECONDS = 60.0
QUICK_SECONDS = 2.5
FRAME_PERIOD_MS = 1000.0 / CAPTURE_FPS
AGE_TARGET_MS = FRAME_PERIOD_MS + 5.0
ASSEMBLY_TARGET_MS = 2.0


def percentiles_ms(samples_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of millisecond samples (and how many there were)."""
    values = np.asarray(samples_ms, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p90_ms": float(np.percentile(values, 90)),
        "p99_ms": float(np.percentile(values, 99)),
        "max_ms": float(values.max()),
        "mean_ms": float(values.mean()),
        "samples": int(values.size),
    }


def bench_config() -> Any:
    from hardware_configs.loader import load_dataclass
    from hardware_configs.schema import SessionConfig

    devices = [{"name": f"{name}_device", "driver": "realsense", "serial": serial, "width": CAPTURE_WIDTH,
                "height": CAPTURE_HEIGHT, "fps": CAPTURE_FPS, "max_frame_age_ms": 100.0, "max_stale_steps": 2}
               for name, serial in SERIALS.items()]
    cameras = [{"name": name, "width": OUTPUT_SIZE, "height": OUTPUT_SIZE, "device": f"{name}_device",
                "crop": list(CROP)} for name in SERIALS]
    return load_dataclass(SessionConfig, {
        "name": "camera_benchmark",
        "robot": {"backend": "kinematic", "control": {"rate_hz": CONTROL_HZ, "mode": "sync"},
                  "task": {"name": "reach", "max_episode_steps": 1_000_000},
                  "cameras": cameras, "camera_devices": devices},
    }, "camera_benchmark")


class Producer:
    """Pushes a frame into every software camera each 1/fps seconds (fixed phase), stamped with
    the monotonic clock at the push."""

    def __init__(self, cameras: list[Any], fps: float) -> None:
        rng = np.random.default_rng(0)
        self._frames = [rng.integers(0, 256, (CAPTURE_HEIGHT, CAPTURE_WIDTH, 3), dtype=np.uint8)
                        for _ in range(FRAME_POOL)]
        self._cameras, self._period_s = cameras, 1.0 / fps
        self._stop = threading.Event()
        self.pushed = 0
        self.late_pushes = 0  # pushes more than one period behind their slot
        self._thread = threading.Thread(target=self._run, name="frame-producer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from robot_server.cell import sleep_until

        origin = time.monotonic()
        index = 0
        while not self._stop.is_set():
            slot = origin + index * self._period_s
            sleep_until(slot)
            now = time.monotonic()
            if now - slot > self._period_s:
                self.late_pushes += 1
            for camera in self._cameras:
                camera.push(self._frames[index % FRAME_POOL], timestamp_ms=1000.0 * now)
            self.pushed += 1
            index += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def run(seconds: float, warmup_s: float = WARMUP_S) -> dict[str, Any]:
    from robot_server.cameras import CameraRig, RealSenseCamera, SoftwareRealSense
    from robot_server.cell import RobotCell, sleep_until

    config = bench_config()
    software = {f"{name}_device": SoftwareRealSense(serial, CAPTURE_WIDTH, CAPTURE_HEIGHT, CAPTURE_FPS)
                for name, serial in SERIALS.items()}
    producer = Producer(list(software.values()), CAPTURE_FPS)
    producer.start()
    rig = CameraRig.from_robot_config(
        config.robot, lambda device, outputs: RealSenseCamera(device, outputs, device=software[device.name].device))
    cell = RobotCell(config, camera_rig=rig)

    # Record the frame each observation used: wrap the drivers' snapshot (called once per driver
    # per observation) and the cell's observation assembly; only inside the timed cell.step calls.
    recording = threading.Event()
    used: list[tuple[str, float, float, float]] = []  # camera, capture ms, host receive s, read s
    for driver in rig.drivers.values():
        original_snapshot = driver.snapshot
        camera_name = driver.outputs[0].name

        def snapshot(original=original_snapshot, name=camera_name):  # type: ignore[no-untyped-def]
            frame, health = original()
            if frame is not None and recording.is_set():
                used.append((name, frame.device_timestamp_ms, frame.host_receive_s, time.monotonic()))
            return frame, health

        driver.snapshot = snapshot  # type: ignore[method-assign]
    assembly_ms: list[float] = []
    original_observe = cell._observe

    def timed_observe(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original_observe(*args, **kwargs)
        finally:
            if recording.is_set():
                assembly_ms.append(1000.0 * (time.perf_counter() - started))

    cell._observe = timed_observe  # type: ignore[method-assign]

    rng = np.random.default_rng(1)
    action = np.zeros(cell.spaces.action.shape, dtype=np.float32)
    period_s = 1.0 / CONTROL_HZ
    step_ms: list[float] = []
    host_age_ms: list[float] = []
    faults = stale = 0
    try:
        cell.reset(seed=0)
        time.sleep(warmup_s)
        frames_before = {name: driver.health().frames for name, driver in rig.drivers.items()}
        pushed_before = producer.pushed
        cpu_before, wall_before = time.process_time(), time.monotonic()
        origin = time.monotonic()
        steps = int(round(seconds * CONTROL_HZ))
        for index in range(steps):
            sleep_until(origin + index * period_s + rng.uniform(0.0, FRAME_PERIOD_MS / 1000.0))
            recording.set()
            started = time.perf_counter()
            result = cell.step(action)
            step_ms.append(1000.0 * (time.perf_counter() - started))
            recording.clear()
            for name in SERIALS:
                host_age_ms.append(result.info[f"camera/{name}/age_ms"])
                stale += int(result.info[f"camera/{name}/stale"])
            if result.truncated or result.terminated:
                faults += int(result.info.get("camera_fault", 0.0))
                cell.reset()
        wall_s = time.monotonic() - wall_before
        cpu_s = time.process_time() - cpu_before
        health = rig.health()
        delivered = {name: (driver.health().frames - frames_before[name]) / wall_s
                     for name, driver in rig.drivers.items()}
        pushed_fps = (producer.pushed - pushed_before) / wall_s
    finally:
        producer.stop()
        cell.close()

    ages_ms = [1000.0 * read_s - capture_ms for _, capture_ms, _, read_s in used]
    driver_latency_ms = [1000.0 * receive_s - capture_ms for _, capture_ms, receive_s, _ in used]
    results: dict[str, Any] = {
        "setup": {
            "cameras": len(SERIALS), "capture": f"{CAPTURE_WIDTH}x{CAPTURE_HEIGHT} rgb8 @ {CAPTURE_FPS} fps",
            "crop": list(CROP), "output": f"{OUTPUT_SIZE}x{OUTPUT_SIZE}", "control_hz": CONTROL_HZ,
            "seconds": seconds, "steps": len(step_ms),
        },
        "frame_age": percentiles_ms(ages_ms),
        "frame_age_since_receive": percentiles_ms(host_age_ms),
        "driver_latency": percentiles_ms(driver_latency_ms),
        "assembly": percentiles_ms(assembly_ms),
        "step": percentiles_ms(step_ms),
        "pushed_fps": pushed_fps,
        "late_pushes": producer.late_pushes,
        "delivered_fps": {name: float(fps) for name, fps in delivered.items()},
        "health_fps_at_end": {name: float(h.fps) for name, h in health.items()},
        "stale_observations": stale,
        "camera_faults": faults,
        "process_cpu_percent": 100.0 * cpu_s / wall_s,
    }
    return results


def evaluate_targets(results: dict[str, Any]) -> tuple[dict[str, bool], dict[str, dict]]:
    checks = {
        f"frame_age_p99_le_{AGE_TARGET_MS:.1f}ms": (results["frame_age"]["p99_ms"], AGE_TARGET_MS,
                                                     f"frame age p99 <= {AGE_TARGET_MS:.1f} ms (one frame + 5 ms)"),
        f"assembly_p99_le_{ASSEMBLY_TARGET_MS:g}ms": (results["assembly"]["p99_ms"], ASSEMBLY_TARGET_MS,
                                                      f"observation assembly p99 <= {ASSEMBLY_TARGET_MS:g} ms"),
    }
    flags = {name: bool(value <= limit) for name, (value, limit, _) in checks.items()}
    details = {name: {"measured": value, "limit": limit, "description": text, "pass": flags[name]}
               for name, (value, limit, text) in checks.items()}
    return flags, details


def print_report(results: dict[str, Any]) -> None:
    host, setup = results["machine"], results["setup"]
    print(f"\ncamera benchmark ({'quick' if results['quick'] else 'full'}) on {host['cpu_model']}, "
          f"{host['cpu_count']} cores, python {host['python']}, pyrealsense2 {host['pyrealsense2']}, "
          f"opencv {host['opencv']}")
    print(f"{setup['cameras']} software RealSense cameras {setup['capture']}, crop {setup['crop']} -> "
          f"{setup['output']}, {setup['control_hz']:g} Hz control loop, {setup['steps']} steps "
          f"({setup['seconds']:g} s)\n")
    print(f"  {'per observation':<44} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for key, label in (("frame_age", "frame age (capture -> observation)"),
                       ("frame_age_since_receive", "frame age since capture thread got it"),
                       ("driver_latency", "driver latency (push -> capture thread)"),
                       ("assembly", "observation assembly (state + 2 cameras)"),
                       ("step", "cell.step total")):
        row = results[key]
        print(f"  {label:<44} {row['p50_ms']:>8.3f} {row['p90_ms']:>8.3f} {row['p99_ms']:>8.3f} {row['max_ms']:>8.3f}")
    delivered = ", ".join(f"{name} {fps:.2f}" for name, fps in results["delivered_fps"].items())
    print(f"\n  pushed {results['pushed_fps']:.2f} fps per camera ({results['late_pushes']} late pushes); "
          f"delivered fps: {delivered}")
    print(f"  stale observations: {results['stale_observations']}, camera faults: {results['camera_faults']}, "
          f"this process used {results['process_cpu_percent']:.0f}% of one core")
    print("\ntargets:")
    for name, detail in results["target_details"].items():
        verdict = "PASS" if detail["pass"] else "FAIL"
        print(f"  {detail['description']:<48} measured {detail['measured']:.3f} ms  {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write all numbers and machine info to this file")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SECONDS:g} s instead of {FULL_SECONDS:g} s")
    parser.add_argument("--seconds", type=float, help="length of the timed control loop")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (QUICK_SECONDS if args.quick else FULL_SECONDS)

    import cv2
    import pyrealsense2 as rs

    results = {"quick": bool(args.quick),
               "machine": machine.machine_info(pyrealsense2=rs.__version__, opencv=cv2.__version__)}
    results.update(run(seconds, QUICK_WARMUP_S if args.quick else WARMUP_S))
    results["targets"], results["target_details"] = evaluate_targets(results)
    print_report(results)
    machine.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
