#!/usr/bin/env python
"""Robot link benchmark: how long one env step takes from the actor to the robot server and back.

    python benchmarks/robot_link.py [--json PATH] [--quick] [--pin]

Measures, with the robot server in a separate (spawned) process on a loopback tcp port:

1. **ZeroMQ step round trip** with the ``kinematic`` backend (no physics: transport + protobuf
   codec + safety + observation assembly), ``sync`` clock, state only and state + two 128x128 RGB
   cameras. Each ``env.step`` is timed with ``time.perf_counter_ns`` after a warm-up.
2. **HTTP/JSON baseline** shaped like SERL's Franka server (``serl_robot_infra``
   ``franka_server.py``): a threaded werkzeug/Flask server process; one step = ``POST /pose``
   ``{"arr": [x, y, z, qx, qy, qz, qw]}`` + ``POST /getstate`` + JSON decode into numpy arrays,
   over one keep-alive ``http.client`` connection.
3. **Realtime loop**: the ZeroMQ link with ``control.mode = realtime`` at 10 Hz; the client steps
   as fast as the server lets it and the period between consecutive step returns is compared with
   100 ms.
4. **Breakdown** (in this process, no sockets): the cost of each piece of a step (safety + backend
   + observation assembly, server-side encode + serialise, client-side parse + decode, env
   wrapper), so that the transport share is the round trip minus these.

Targets (printed as PASS/FAIL, stored in the JSON as booleans; a miss does not fail the script):
state-only p99 <= 0.5 ms, two-image p99 <= 1.5 ms, HTTP p50 / ZeroMQ p50 >= 10, realtime
p99 |period - 100 ms| <= 1 ms. The script exits non-zero only on errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import http.client
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

CONFIG_NAME = "sim_panda_reach"
LONG_EPISODE = 100_000
WARMUP_STEPS = 200
FULL_STEPS = 5000
QUICK_STEPS = 500
REALTIME_RATE_HZ = 10.0
FULL_REALTIME_STEPS = 1000
QUICK_REALTIME_STEPS = 50
REALTIME_WARMUP_STEPS = 3
BREAKDOWN_ITERATIONS = 2000
START_TIMEOUT_S = 60.0
CAMERAS = (("front", 128, 128), ("wrist", 128, 128))

TARGETS = {
    # name: (measured key path, comparison, limit, description)
    "zmq_state_p99_ms_le_0.5": (("zmq_state", "p99_ms"), "<=", 0.5, "ZeroMQ state-only p99 <= 0.5 ms"),
    "zmq_images_p99_ms_le_1.5": (("zmq_images", "p99_ms"), "<=", 1.5, "ZeroMQ two 128x128 images p99 <= 1.5 ms"),
    "http_over_zmq_p50_ge_10": (("http_over_zmq_p50_ratio",), ">=", 10.0, "HTTP p50 / ZeroMQ state-only p50 >= 10"),
    "realtime_jitter_p99_ms_le_1": (("realtime", "jitter_p99_ms"), "<=", 1.0,
                                    "realtime 10 Hz p99 |period - 100 ms| <= 1 ms"),
}


# ------------------------------------------------------------------------------------------------
# child processes (spawned: they import this module afresh as __mp_main__)
# ------------------------------------------------------------------------------------------------
def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def _robot_server_child(config, cpu: int | None, reply) -> None:
    """Run a RobotServer exactly as ``steerl robot-server`` does; report its bound address."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="robot-server: %(name)s: %(message)s")
    _pin(cpu)
    from robot_server.server import RobotServer

    server = RobotServer(config)
    server.install_signal_handlers()
    reply.send(server.address)
    reply.close()
    server.serve_forever()


def _http_server_child(cpu: int | None, reply) -> None:
    """A Flask server shaped like SERL's franka_server.py (state kept here, no physics)."""
    import logging

    from flask import Flask, jsonify, request
    from werkzeug.serving import make_server

    _pin(cpu)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = Flask("serl_like_franka_server")
    rng = np.random.default_rng(0)
    state = {
        "pos": np.array([0.5, 0.0, 0.25, 1.0, 0.0, 0.0, 0.0]),
        "vel": rng.normal(size=6) * 1e-3,
        "force": rng.normal(size=3),
        "torque": rng.normal(size=3),
        "q": rng.normal(size=7),
        "dq": rng.normal(size=7) * 1e-3,
        "jacobian": rng.normal(size=(6, 7)),
        "gripper_pos": 0.04,
    }

    @app.route("/pose", methods=["POST"])
    def pose():  # SERL: pos = np.array(request.json["arr"]); robot_server.move(pos)
        state["pos"] = np.array(request.json["arr"])
        return "Moved"

    @app.route("/getstate", methods=["POST"])
    def get_state():  # SERL: jsonify of the arm's state as lists
        return jsonify({
            "pose": np.array(state["pos"]).tolist(),
            "vel": np.array(state["vel"]).tolist(),
            "force": np.array(state["force"]).tolist(),
            "torque": np.array(state["torque"]).tolist(),
            "q": np.array(state["q"]).tolist(),
            "dq": np.array(state["dq"]).tolist(),
            "jacobian": np.array(state["jacobian"]).tolist(),
            "gripper_pos": state["gripper_pos"],
        })

    server = make_server("127.0.0.1", 0, app, threaded=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    reply.send(f"127.0.0.1:{server.server_port}")
    reply.close()
    server.serve_forever()


@contextmanager
def spawned(name: str, target: Callable, *args: Any) -> Iterator[str]:
    """Start ``target(*args, reply_pipe)`` in a spawned process; yield what it sends when ready.
    The child is always terminated (SIGTERM, then SIGKILL) on exit."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=target, args=(*args, send), name=name, daemon=True)
    process.start()
    send.close()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not receive.poll(0.1):
            if not process.is_alive():
                raise RuntimeError(f"{name} exited with code {process.exitcode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {START_TIMEOUT_S:.0f} s")
        try:
            yield receive.recv()
        except EOFError:
            raise RuntimeError(f"{name} closed its pipe before it was ready") from None
    finally:
        receive.close()
        if process.is_alive():
            process.terminate()
            process.join(10)
        if process.is_alive():
            process.kill()
            process.join(5)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def percentiles_ms(samples_ns: np.ndarray) -> dict[str, float]:
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
    }


@contextmanager
def gc_paused() -> Iterator[None]:
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def bench_config(cameras: tuple = (), mode: str = "sync", rate_hz: float = REALTIME_RATE_HZ):
    from hardware_configs.schema import CameraConfig, load_config

    config = load_config(CONFIG_NAME)
    robot = config.robot
    robot = dataclasses.replace(
        robot,
        backend="kinematic",
        cameras=tuple(CameraConfig(name, width, height) for name, width, height in cameras),
        control=dataclasses.replace(robot.control, mode=mode, rate_hz=rate_hz),
        task=dataclasses.replace(robot.task, max_episode_steps=LONG_EPISODE),
    )
    server = dataclasses.replace(config.server, address="tcp://127.0.0.1:*")  # ephemeral port
    return dataclasses.replace(config, name=f"bench_{mode}_{len(cameras)}cam", robot=robot, server=server)


def with_env_address(config, address: str):
    return dataclasses.replace(config, env=dataclasses.replace(config.env, address=address))


def machine_info(pinned: bool) -> dict[str, Any]:
    import flask  # noqa: F401  (version via metadata)
    import google.protobuf
    import zmq
    from google.protobuf.internal import api_implementation
    from importlib.metadata import version

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "protobuf": google.protobuf.__version__,
        "protobuf_backend": api_implementation.Type(),
        "flask": version("flask"),
        "werkzeug": version("werkzeug"),
        "loadavg_at_start": load,
        "pinned_cpus": pinned,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------------
# 1. ZeroMQ step round trip (sync clock)
# ------------------------------------------------------------------------------------------------
def bench_zmq_sync(cameras: tuple, steps: int, pin: bool) -> dict[str, Any]:
    from actor.env import make_env

    config = bench_config(cameras=cameras, mode="sync")
    with spawned("robot-server", _robot_server_child, config, 1 if pin else None) as address:
        _pin(0 if pin else None)
        env = make_env(with_env_address(config, address), client_name="robot_link_bench")
        try:
            env.reset(seed=0)
            rng = np.random.default_rng(0)
            actions = rng.uniform(-1.0, 1.0, (WARMUP_STEPS + steps, env.action_space.shape[0])).astype(np.float32)
            observation = None
            for action in actions[:WARMUP_STEPS]:
                observation, *_ = env.step(action)
            for name, width, height in cameras:
                image = observation[f"images/{name}"]
                if image.shape != (height, width, 3) or image.dtype != np.uint8:
                    raise RuntimeError(f"images/{name}: got {image.dtype} {image.shape}")
            latencies = np.empty(steps, dtype=np.int64)
            clock = time.perf_counter_ns
            ended = False
            with gc_paused():
                for i in range(steps):
                    action = actions[WARMUP_STEPS + i]
                    start = clock()
                    _, _, terminated, truncated, _ = env.step(action)
                    latencies[i] = clock() - start
                    ended |= terminated or truncated
            if ended:
                raise RuntimeError("the episode ended inside the timed loop (max_episode_steps too small?)")
            payload = sum(w * h * 3 for _, w, h in cameras)
        finally:
            env.close()
            if pin:
                os.sched_setaffinity(0, range(os.cpu_count() or 1))
    return {"steps": steps, "warmup_steps": WARMUP_STEPS, "cameras": [list(c) for c in cameras],
            "image_bytes_per_step": payload, **percentiles_ms(latencies)}


# ------------------------------------------------------------------------------------------------
# 2. HTTP/JSON baseline (SERL franka_server shape)
# ------------------------------------------------------------------------------------------------
class SerlLikeClient:
    """What SERL's FrankaEnv does per step: POST /pose, POST /getstate, numpy-ify the state."""

    def __init__(self, host_port: str) -> None:
        host, port = host_port.rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=10)
        self.connection.connect()
        self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _post(self, path: str, body: bytes, content_type: str | None) -> bytes:
        headers = {"Content-Length": str(len(body))}
        if content_type:
            headers["Content-Type"] = content_type
        self.connection.request("POST", path, body=body, headers=headers)
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {response.status}: {data[:200]!r}")
        return data

    def step(self, pose: np.ndarray) -> dict[str, np.ndarray]:
        self._post("/pose", json.dumps({"arr": pose.tolist()}).encode(), "application/json")
        state = json.loads(self._post("/getstate", b"", None))
        return {
            "pose": np.array(state["pose"]),
            "vel": np.array(state["vel"]),
            "force": np.array(state["force"]),
            "torque": np.array(state["torque"]),
            "q": np.array(state["q"]),
            "dq": np.array(state["dq"]),
            "jacobian": np.array(state["jacobian"]),
            "gripper_pos": np.array(state["gripper_pos"]),
        }

    def close(self) -> None:
        self.connection.close()


def bench_http(steps: int, pin: bool) -> dict[str, Any]:
    with spawned("http-server", _http_server_child, 1 if pin else None) as host_port:
        _pin(0 if pin else None)
        client = SerlLikeClient(host_port)
        try:
            rng = np.random.default_rng(0)
            poses = np.tile(np.array([0.5, 0.0, 0.25, 1.0, 0.0, 0.0, 0.0]), (WARMUP_STEPS + steps, 1))
            poses[:, :3] += rng.uniform(-0.05, 0.05, (WARMUP_STEPS + steps, 3))
            state = None
            for pose in poses[:WARMUP_STEPS]:
                state = client.step(pose)
            if state["jacobian"].shape != (6, 7) or not np.allclose(state["pose"], poses[WARMUP_STEPS - 1]):
                raise RuntimeError("HTTP baseline: unexpected /getstate reply")
            latencies = np.empty(steps, dtype=np.int64)
            clock = time.perf_counter_ns
            with gc_paused():
                for i in range(steps):
                    pose = poses[WARMUP_STEPS + i]
                    start = clock()
                    client.step(pose)
                    latencies[i] = clock() - start
        finally:
            client.close()
            if pin:
                os.sched_setaffinity(0, range(os.cpu_count() or 1))
    return {"steps": steps, "warmup_steps": WARMUP_STEPS, "client": "http.client keep-alive (TCP_NODELAY)",
            "server": "Flask + werkzeug dev server, threaded", **percentiles_ms(latencies)}


# ------------------------------------------------------------------------------------------------
# 3. Realtime loop
# ------------------------------------------------------------------------------------------------
def bench_realtime(steps: int, pin: bool) -> dict[str, Any]:
    from actor.env import make_env

    config = bench_config(mode="realtime", rate_hz=REALTIME_RATE_HZ)
    period_ns = 1e9 / REALTIME_RATE_HZ
    with spawned("robot-server", _robot_server_child, config, 1 if pin else None) as address:
        _pin(0 if pin else None)
        env = make_env(with_env_address(config, address), client_name="robot_link_bench_rt")
        try:
            env.reset(seed=0)
            action = np.zeros(env.action_space.shape[0], dtype=np.float32)
            for _ in range(REALTIME_WARMUP_STEPS):
                env.step(action)
            returns = np.empty(steps + 1, dtype=np.int64)
            clock = time.perf_counter_ns
            info: dict = {}
            with gc_paused():
                returns[0] = clock()
                for i in range(1, steps + 1):
                    _, _, _, _, info = env.step(action)
                    returns[i] = clock()
        finally:
            env.close()
            if pin:
                os.sched_setaffinity(0, range(os.cpu_count() or 1))
    periods = np.diff(returns).astype(np.float64)
    deviation_ms = np.abs(periods - period_ns) / 1e6
    return {
        "rate_hz": REALTIME_RATE_HZ,
        "steps": steps,
        "period_mean_ms": float(periods.mean() / 1e6),
        "period_p50_ms": float(np.percentile(periods, 50) / 1e6),
        "jitter_p50_ms": float(np.percentile(deviation_ms, 50)),
        "jitter_p99_ms": float(np.percentile(deviation_ms, 99)),
        "jitter_max_ms": float(deviation_ms.max()),
        "server_missed_ticks": float(info.get("missed_ticks", float("nan"))),
    }


# ------------------------------------------------------------------------------------------------
# 4. In-process breakdown of one step (no sockets)
# ------------------------------------------------------------------------------------------------
def _median_us(fn: Callable[[int], Any], iterations: int) -> float:
    samples = np.empty(iterations, dtype=np.int64)
    clock = time.perf_counter_ns
    with gc_paused():
        for i in range(iterations):
            start = clock()
            fn(i)
            samples[i] = clock() - start
    return float(np.median(samples) / 1e3)


def bench_breakdown(cameras: tuple, iterations: int) -> dict[str, float]:
    """Median cost (us) of each piece of a step, measured in this process."""
    import zmq

    from actor.env import RobotEnv
    from robot_server.cell import RobotCell
    from transport import steerl_pb2 as pb
    from transport.codec import (decode_observation, decode_tensor, encode_observation, encode_tensor,
                                 info_to_pb, parse_envelope)

    config = bench_config(cameras=cameras, mode="sync")
    cell = RobotCell(config)
    cell.reset(0)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (iterations, config.robot.action.dim)).astype(np.float32)
    action64 = actions.astype(np.float64)
    state = cell.backend.read_state()
    result = cell.step(actions[0])

    def server_encode(i: int) -> bytes:
        reply = pb.Envelope(request_id=i + 1, protocol_version=1)
        out = reply.step_reply
        encode_observation(result.observation, result.stamp_s, out.observation)
        out.reward = result.reward
        out.terminated = result.terminated
        out.truncated = result.truncated
        info_to_pb(result.info, out.info)
        return reply.SerializeToString()

    reply_bytes = server_encode(0)

    def client_request(i: int) -> bytes:
        request = pb.Envelope()
        encode_tensor(np.asarray(actions[i], dtype=np.float32), request.step.action)
        request.protocol_version = 1
        request.request_id = i + 1
        return request.SerializeToString()

    request_bytes = client_request(0)

    def server_parse(i: int) -> np.ndarray:
        envelope = parse_envelope(request_bytes, config.server.max_message_bytes)
        envelope.WhichOneof("body")
        return np.asarray(decode_tensor(envelope.step.action, "step.action"))

    def client_decode(i: int):
        reply = parse_envelope(reply_bytes, 64 * 1024 * 1024).step_reply
        return decode_observation(reply.observation), dict(reply.info)

    class _FakeLink:
        spaces = cell.spaces

        def __init__(self) -> None:
            from actor.env import StepOutcome

            self.outcome = StepOutcome(result.observation, 0.0, False, False, dict(result.info))

        def step(self, action):
            return self.outcome

    fake_env = RobotEnv(_FakeLink())

    # Bare ZeroMQ ping-pong of the same frame sizes over loopback tcp in this process (threads
    # would share the GIL; this measures libzmq + pyzmq call overhead, not a second process).
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")

    def zmq_pingpong(i: int) -> None:
        dealer.send(request_bytes, copy=False)
        router.poll(1000)
        identity, frame = router.recv_multipart(copy=False)
        router.send_multipart([identity, reply_bytes], flags=zmq.NOBLOCK)
        dealer.poll(1000)
        dealer.recv(copy=False).bytes

    try:
        for _ in range(50):
            zmq_pingpong(0)
        pieces = {
            "client_encode_request_us": _median_us(client_request, iterations),
            "server_parse_request_us": _median_us(server_parse, iterations),
            "server_safety_validate_target_us": _median_us(
                lambda i: cell.safety.target(cell.safety.validate(actions[i]), state), iterations),
            "server_observation_assembly_us": _median_us(lambda i: cell._observe(), iterations),
            "server_cell_step_us": _median_us(lambda i: cell.step(actions[i]), iterations),
            "server_encode_reply_us": _median_us(server_encode, iterations),
            "client_parse_decode_reply_us": _median_us(client_decode, iterations),
            "client_env_wrapper_us": _median_us(lambda i: fake_env.step(action64[i]), iterations),
            "zmq_loopback_pingpong_same_process_us": _median_us(zmq_pingpong, iterations),
        }
    finally:
        dealer.close(0)
        router.close(0)
        context.term()
        cell.close()
    pieces["reply_bytes"] = float(len(reply_bytes))
    pieces["request_bytes"] = float(len(request_bytes))
    return pieces


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def evaluate_targets(results: dict[str, Any]) -> tuple[dict[str, bool], dict[str, dict]]:
    flags, details = {}, {}
    for name, (path, op, limit, description) in TARGETS.items():
        value: Any = results
        for key in path:
            value = value[key]
        ok = bool(value <= limit) if op == "<=" else bool(value >= limit)
        flags[name] = ok
        details[name] = {"description": description, "measured": float(value), "op": op, "limit": limit,
                         "pass": ok}
    return flags, details


def print_report(results: dict[str, Any]) -> None:
    machine = results["machine"]
    print(f"\nrobot link benchmark ({'quick' if results['quick'] else 'full'}) on {machine['cpu_model']}, "
          f"{machine['cpu_count']} cores, python {machine['python']}, pyzmq {machine['pyzmq']}, "
          f"protobuf {machine['protobuf']} ({machine['protobuf_backend']}), numpy {machine['numpy']}"
          f"{', pinned to separate cores' if machine['pinned_cpus'] else ''}")
    header = f"{'round trip per step':<42} {'steps':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    rows = [("ZeroMQ + protobuf, state only", results["zmq_state"]),
            ("ZeroMQ + protobuf, state + 2x128x128 RGB", results["zmq_images"]),
            ("HTTP/JSON (SERL Flask shape)", results["http_json"])]
    for label, row in rows:
        print(f"{label:<42} {row['steps']:>6} {row['p50_ms']:>8.3f} {row['p90_ms']:>8.3f} "
              f"{row['p99_ms']:>8.3f} {row['max_ms']:>8.3f}")
    print(f"\nHTTP p50 / ZeroMQ state-only p50: {results['http_over_zmq_p50_ratio']:.1f}x")
    rt = results["realtime"]
    print(f"realtime {rt['rate_hz']:g} Hz, {rt['steps']} steps: period p50 {rt['period_p50_ms']:.3f} ms; "
          f"|period - {1000 / rt['rate_hz']:g} ms| p50 {rt['jitter_p50_ms']:.3f}, p99 {rt['jitter_p99_ms']:.3f}, "
          f"max {rt['jitter_max_ms']:.3f} ms; server missed ticks {rt['server_missed_ticks']:g}")
    if "breakdown" in results:
        print("\nin-process breakdown (median us per step; no sockets):")
        print(f"  {'piece':<42} {'state':>9} {'2 images':>9}")
        state, images = results["breakdown"]["state"], results["breakdown"]["images"]
        for key in state:
            print(f"  {key:<42} {state[key]:>9.1f} {images[key]:>9.1f}")
    print("\ntargets:")
    for name, detail in results["target_details"].items():
        verdict = "PASS" if detail["pass"] else "FAIL"
        print(f"  [{verdict}] {detail['description']:<48} measured {detail['measured']:.3f}")


def run(quick: bool, pin: bool, breakdown: bool) -> dict[str, Any]:
    steps = QUICK_STEPS if quick else FULL_STEPS
    realtime_steps = QUICK_REALTIME_STEPS if quick else FULL_REALTIME_STEPS
    if pin and (not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2):
        print("--pin needs sched_setaffinity and 2 cores; running unpinned", file=sys.stderr)
        pin = False
    results: dict[str, Any] = {"benchmark": "robot_link", "quick": quick, "machine": machine_info(pin)}
    print("ZeroMQ, state only ...", flush=True)
    results["zmq_state"] = bench_zmq_sync((), steps, pin)
    print("ZeroMQ, state + two 128x128 images ...", flush=True)
    results["zmq_images"] = bench_zmq_sync(CAMERAS, steps, pin)
    print("HTTP/JSON baseline ...", flush=True)
    results["http_json"] = bench_http(steps, pin)
    results["http_over_zmq_p50_ratio"] = results["http_json"]["p50_ms"] / results["zmq_state"]["p50_ms"]
    print(f"realtime loop ({realtime_steps} steps at {REALTIME_RATE_HZ:g} Hz) ...", flush=True)
    results["realtime"] = bench_realtime(realtime_steps, pin)
    if breakdown:
        iterations = BREAKDOWN_ITERATIONS // (5 if quick else 1)
        results["breakdown"] = {"state": bench_breakdown((), iterations),
                                "images": bench_breakdown(CAMERAS, iterations)}
    results["targets"], results["target_details"] = evaluate_targets(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write all numbers and machine info to this file")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps per round-trip variant, {QUICK_REALTIME_STEPS} realtime steps")
    parser.add_argument("--pin", action="store_true",
                        help="pin the client to CPU 0 and each server to CPU 1 (sched_setaffinity)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the in-process cost breakdown")
    args = parser.parse_args(argv)
    results = run(args.quick, args.pin, not args.no_breakdown)
    print_report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
