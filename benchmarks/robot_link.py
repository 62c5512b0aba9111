#!/usr/bin/env python
"""Robot link benchmark: how long one env step takes from the actor to the robot server and back.

    python benchmarks/robot_link.py [--json PATH] [--quick]
                                    [--pin] [--server-gc-freeze] [--fifo] [--no-breakdown]

Every server runs in its own spawned process on an ephemeral loopback tcp port (it binds port 0
and reports the port back); the client is this process. The round-trip variants (1 and 2) run
side by side and are timed in interleaved blocks (order rotating, a few untimed steps at each
block start), so that on a shared machine they all see the same background load and their ratio
stays meaningful. Measured:

1. **ZeroMQ step round trip** (``make_env`` -> ``RobotServer``) with the ``kinematic`` backend (no
   physics: transport + protobuf codec + safety + observation assembly), ``sync`` clock, one long
   episode (no resets in the timed loop), state only and state + two 128x128 RGB cameras. Each
   ``env.step`` is timed with ``time.perf_counter_ns`` after a warm-up, client GC paused.
   Reference row: a bare pyzmq DEALER/ROUTER ping-pong between two processes with the same frame
   sizes (no protobuf, no robot cell): the floor any Python ZeroMQ link has on this machine.
2. **HTTP/JSON baseline** shaped like SERL's Franka server (``serl_robot_infra``
   ``franka_server.py``): a threaded werkzeug/Flask process keeping the state; one step =
   ``POST /pose {"arr": [x, y, z, qx, qy, qz, qw]}`` + ``POST /getstate`` + JSON decode into numpy.
   Main variant (used for the ratio): one keep-alive ``http.client`` connection, the best case for
   HTTP. Extra variant: a new connection per request, which is what SERL's module-level
   ``requests.post`` calls do (without the ``requests`` library's own overhead).
3. **Realtime loop**: the ZeroMQ link with ``control.mode = realtime`` at 10 Hz; the client steps
   as fast as the server lets it, and the period between consecutive step returns is compared
   with 100 ms.
4. **Breakdown**: one more state-only and two-image run with timers wrapped around each piece of
   the step in the server process and in the client (median microseconds per step), plus the
   server's full-GC pause. It explains where the round trip goes; its own timers add ~1 us each.

Targets (PASS/FAIL, stored in the JSON as booleans; a miss does not fail the script): state-only
p99 <= 0.5 ms, two-image p99 <= 1.5 ms, HTTP p50 / ZeroMQ p50 >= 10, realtime p99 |period - 100 ms|
<= 1 ms. The script exits non-zero only on errors.

Defaults measure the code as it ships. What-ifs for the owner of the server: ``--server-gc-freeze``
(robot servers call ``gc.collect(); gc.freeze()`` after start-up), ``--fifo`` (the client and all
servers run under ``SCHED_FIFO``, as a real-time control PC would; needs root or CAP_SYS_NICE),
``--pin`` (client on CPU 0, servers on CPU 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import http.client
import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (benchmarks/machine.py: what every benchmark records)

CONFIG_NAME = "sim_panda_reach"
LONG_EPISODE = 100_000
WARMUP_STEPS = 200
FULL_STEPS = 5000
QUICK_STEPS = 500
FULL_BREAKDOWN_STEPS = 2000
QUICK_BREAKDOWN_STEPS = 300
REALTIME_RATE_HZ = 10.0
FULL_REALTIME_STEPS = 1000
QUICK_REALTIME_STEPS = 50
REALTIME_WARMUP_STEPS = 3
REWARM_STEPS = 20  # untimed steps at the start of each interleaved block
FULL_BLOCK = 500
QUICK_BLOCK = 100
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
CAMERAS = (("front", 128, 128), ("wrist", 128, 128))

TARGETS = {
    # name: (path of the measured value in the results, comparison, limit, description)
    "zmq_state_p99_le_0.5ms": (("zmq_state", "p99_ms"), "<=", 0.5, "ZeroMQ state-only p99 <= 0.5 ms"),
    "zmq_images_p99_le_1.5ms": (("zmq_images", "p99_ms"), "<=", 1.5, "ZeroMQ two 128x128 images p99 <= 1.5 ms"),
    "http_over_zmq_p50_ge_10": (("http_over_zmq_p50_ratio",), ">=", 10.0, "HTTP p50 / ZeroMQ state-only p50 >= 10"),
    "realtime_jitter_p99_le_1ms": (("realtime", "jitter_p99_ms"), "<=", 1.0,
                                   "realtime 10 Hz p99 |period - 100 ms| <= 1 ms"),
}


# ------------------------------------------------------------------------------------------------
# child processes (spawned: each imports this module afresh as __mp_main__)
# ------------------------------------------------------------------------------------------------
_START_AFFINITY = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def _unpin() -> None:
    if _START_AFFINITY is not None:
        os.sched_setaffinity(0, _START_AFFINITY)


@dataclasses.dataclass(frozen=True)
class Options:
    """How the processes are set up. Defaults measure the code as it ships; the rest are what-ifs."""

    pin: bool = False  # client on CPU 0, servers on CPU 1
    server_gc_freeze: bool = False  # robot servers: gc.collect(); gc.freeze() after start-up
    fifo: bool = False  # every benchmark process (client and servers): SCHED_FIFO priority FIFO_PRIORITY

    @property
    def client_cpu(self) -> int | None:
        return 0 if self.pin else None

    @property
    def server_cpu(self) -> int | None:
        return 1 if self.pin else None


FIFO_PRIORITY = 10


def _set_fifo() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY))
    except (AttributeError, PermissionError, OSError) as error:
        raise RuntimeError(f"--fifo: cannot set SCHED_FIFO ({error}); run as root or with "
                           "CAP_SYS_NICE, or drop the option") from None


class _Timers:
    """Wraps callables so that each call's duration is recorded under a name."""

    def __init__(self) -> None:
        self.samples: dict[str, list[int]] = {}
        self.missing: list[str] = []  # hooks not found (the code under test changed): skipped
        self._undo: list[tuple[Any, str, Any, bool]] = []

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        original = getattr(owner, attribute, None)
        if not callable(original):
            self.missing.append(name)
            return
        had_own = isinstance(owner, type) or attribute in getattr(owner, "__dict__", {})
        samples = self.samples.setdefault(name, [])
        clock = time.perf_counter_ns

        def timed(*args, **kwargs):
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                samples.append(clock() - start)

        setattr(owner, attribute, timed)
        self._undo.append((owner, attribute, original, had_own))

    def restore(self) -> None:
        for owner, attribute, original, had_own in reversed(self._undo):
            if had_own or not hasattr(type(owner), attribute):
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)
        self._undo.clear()

    def medians_us(self) -> dict[str, float]:
        return {name: float(np.median(values) / 1e3) for name, values in self.samples.items() if values}


def _robot_server_child(config, options: Options, instrument: bool, reply) -> None:
    """Run a RobotServer as ``steerl robot-server`` does; report its bound address when ready.
    With ``instrument``, time each piece of a request and send the medians on SIGTERM."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="robot-server: %(name)s: %(message)s")
    _pin(options.server_cpu)
    if options.fifo:
        _set_fifo()
    from robot_server import server as server_module
    from robot_server.server import RobotServer

    server = RobotServer(config)
    server.install_signal_handlers()
    extra: dict[str, float] = {}
    timers = _Timers()
    if instrument:
        extra["gc_tracked_objects"] = float(len(gc.get_objects()))
        start = time.perf_counter_ns()
        gc.collect()
        extra["full_gc_pause_us"] = (time.perf_counter_ns() - start) / 1e3
        cell = server.cell
        zmq_socket = getattr(server, "_socket", None)
        timers.wrap(server, "_serve_one", "serve_one_total")
        timers.wrap(zmq_socket, "recv_multipart", "recv_multipart")
        timers.wrap(server_module, "parse_envelope", "parse_request")
        timers.wrap(server_module, "decode_tensor", "decode_action")
        timers.wrap(cell, "step", "cell_step_total")
        timers.wrap(getattr(cell, "safety", None), "validate", "safety_validate")
        timers.wrap(getattr(cell, "safety", None), "target", "safety_target")
        timers.wrap(cell, "_observe", "observation_assembly")
        timers.wrap(server_module, "encode_observation", "encode_observation")
        timers.wrap(server_module, "info_to_pb", "info_to_pb")
        timers.wrap(server, "_reply", "serialize_and_send_reply")
        timers.wrap(zmq_socket, "send_multipart", "zmq_send_multipart")
    if options.server_gc_freeze:
        gc.collect()
        gc.freeze()
    reply.send(server.address)
    server.serve_forever()
    if instrument:
        for values in timers.samples.values():
            del values[:WARMUP_STEPS]  # handshake, reset and warm-up requests
        reply.send({**timers.medians_us(), **extra, "missing_hooks": timers.missing})
    reply.close()


def _http_server_child(options: Options, reply) -> None:
    """A Flask server shaped like SERL's franka_server.py (state kept here, no physics)."""
    import logging

    from flask import Flask, jsonify, request
    from werkzeug.serving import make_server

    _pin(options.server_cpu)
    if options.fifo:
        _set_fifo()
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


def _echo_server_child(reply_bytes: int, options: Options, reply) -> None:
    """Bare pyzmq ROUTER answering every frame with ``reply_bytes`` bytes: the transport floor."""
    import zmq

    _pin(options.server_cpu)
    if options.fifo:
        _set_fifo()
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    payload = b"\x00" * reply_bytes
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    reply.send(f"tcp://127.0.0.1:{port}")
    reply.close()
    while not stopping:
        if router.poll(50, zmq.POLLIN):
            identity, _ = router.recv_multipart(copy=False)
            router.send_multipart([identity, payload], flags=zmq.NOBLOCK)
    router.close(0)
    context.term()


class Child:
    """A spawned child process; ``ready`` waits for (once) and returns its first message."""

    _UNSET = object()

    def __init__(self, name: str, process: Any, pipe: Any) -> None:
        self.name, self.process, self.pipe = name, process, pipe
        self._ready: Any = self._UNSET

    @property
    def ready(self) -> Any:
        if self._ready is self._UNSET:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not self.pipe.poll(0.1):
                if not self.process.is_alive():
                    raise RuntimeError(f"{self.name} exited with code {self.process.exitcode} before it was ready")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT_S:.0f} s")
            try:
                self._ready = self.pipe.recv()
            except EOFError:
                raise RuntimeError(f"{self.name} closed its pipe before it was ready") from None
        return self._ready

    def stop_and_collect(self, timeout_s: float = STOP_TIMEOUT_S) -> Any:
        """SIGTERM the child and return the next thing it sends (None if it sends nothing)."""
        self.process.terminate()
        try:
            if self.pipe.poll(timeout_s):
                return self.pipe.recv()
        except EOFError:
            pass
        return None


@contextmanager
def spawned(name: str, target: Callable, *args: Any) -> Iterator[Child]:
    """Start ``target(*args, pipe)`` in a spawned process (``Child.ready`` waits for its first
    message, so several children can start at once). The child is always stopped on exit
    (SIGTERM, then SIGKILL)."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=target, args=(*args, send), name=name, daemon=True)
    process.start()
    send.close()
    try:
        yield Child(name, process, receive)
    finally:
        if process.is_alive():
            process.terminate()
            process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join(5)
        receive.close()


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
    """sim_panda_reach on the kinematic backend, one long episode, an ephemeral loopback port."""
    from hardware_configs.schema import CameraConfig, load_config

    config = load_config(CONFIG_NAME)
    robot = dataclasses.replace(
        config.robot,
        backend="kinematic",
        cameras=tuple(CameraConfig(name, width, height) for name, width, height in cameras),
        control=dataclasses.replace(config.robot.control, mode=mode, rate_hz=rate_hz),
        task=dataclasses.replace(config.robot.task, max_episode_steps=LONG_EPISODE),
    )
    server = dataclasses.replace(config.server, address="tcp://127.0.0.1:*")  # the child reports the port
    return dataclasses.replace(config, name=f"bench_{mode}_{len(cameras)}cam", robot=robot, server=server)


def with_env_address(config, address: str):
    return dataclasses.replace(config, env=dataclasses.replace(config.env, address=address))


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    import google.protobuf
    import zmq
    from google.protobuf.internal import api_implementation

    return machine.machine_info(
        pyzmq=zmq.__version__, libzmq=zmq.zmq_version(), protobuf=google.protobuf.__version__,
        protobuf_backend=api_implementation.Type(), flask=version("flask"), werkzeug=version("werkzeug"),
        cpu_steal_s_at_start=_steal_s())


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_accounting() -> dict[str, float] | None:
    """Busy CPU seconds of the whole machine, and of this process and its waited-for children."""
    import resource

    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy_machine = (sum(fields[:8]) - idle - (fields[7] if len(fields) > 7 else 0)) / tick
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        own += usage.ru_utime + usage.ru_stime
    return {"machine_busy_s": busy_machine, "own_s": own, "monotonic_s": time.monotonic()}


def _foreign_load(start: dict[str, float] | None) -> dict[str, float]:
    """CPU used by processes other than this benchmark during the run (other users' jobs)."""
    end = _cpu_accounting()
    if start is None or end is None:
        return {}
    wall = end["monotonic_s"] - start["monotonic_s"]
    foreign = max(0.0, (end["machine_busy_s"] - start["machine_busy_s"]) - (end["own_s"] - start["own_s"]))
    return {"foreign_cpu_s_during_run": foreign,
            "foreign_cpu_share_during_run": foreign / max(wall * (os.cpu_count() or 1), 1e-9)}


def _steal_s() -> float | None:
    """CPU time the hypervisor took from this VM since boot (all CPUs), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------
# 1. + 2. round trips: one "stepper" per variant, all measured interleaved
# ------------------------------------------------------------------------------------------------
class ZmqStepper:
    """``env.step`` over ZeroMQ to a spawned RobotServer (kinematic backend, sync clock)."""

    def __init__(self, stack: ExitStack, cameras: tuple, options: Options, instrument: bool = False) -> None:
        self.cameras = cameras
        self.config = bench_config(cameras=cameras, mode="sync")
        self.child = stack.enter_context(
            spawned("robot-server", _robot_server_child, self.config, options, instrument))
        self._stack = stack
        self.env = None

    def connect(self) -> None:
        from actor.env import make_env

        self.env = make_env(with_env_address(self.config, self.child.ready), client_name="robot_link_bench")
        self._closed = False
        self._stack.callback(self.close)  # LIFO: the env says goodbye before its server is stopped
        self.env.reset(seed=0)
        rng = np.random.default_rng(0)
        self.actions = rng.uniform(-1.0, 1.0, (4096, self.env.action_space.shape[0])).astype(np.float32)
        self.index = 0

    def step(self) -> None:
        _, _, terminated, truncated, _ = self.env.step(self.actions[self.index & 4095])
        self.index += 1
        if terminated or truncated:
            raise RuntimeError("the episode ended inside the benchmark (max_episode_steps too small?)")

    def verify(self) -> None:
        observation, *_ = self.env.step(self.actions[0])
        for name, width, height in self.cameras:
            image = observation[f"images/{name}"]
            if image.shape != (height, width, 3) or image.dtype != np.uint8:
                raise RuntimeError(f"images/{name}: got {image.dtype} {image.shape}")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.env.close()


class ZmqFloorStepper:
    """Bare pyzmq DEALER -> ROUTER -> DEALER between two processes with a step's frame sizes: no
    protobuf, no robot cell. What any Python ZeroMQ link costs on this machine."""

    def __init__(self, stack: ExitStack, cameras: tuple, options: Options) -> None:
        import zmq

        self.request_bytes, self.reply_bytes = step_frame_bytes(cameras)
        self.child = stack.enter_context(spawned("echo-server", _echo_server_child, self.reply_bytes, options))
        self._stack = stack
        self._payload = b"\x00" * self.request_bytes
        self._pollin = zmq.POLLIN

    def connect(self) -> None:
        import zmq

        self._context = zmq.Context()
        self._dealer = self._context.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.connect(self.child.ready)
        self._stack.callback(self.close)

    def step(self) -> None:
        self._dealer.send(self._payload, copy=False)
        if not self._dealer.poll(5000, self._pollin):
            raise RuntimeError("echo server did not answer within 5 s")
        self._dealer.recv(copy=False)

    def verify(self) -> None:
        self._dealer.send(self._payload)
        if not self._dealer.poll(5000, self._pollin) or len(self._dealer.recv()) != self.reply_bytes:
            raise RuntimeError("echo server: unexpected reply")

    def close(self) -> None:
        self._dealer.close(0)
        self._context.term()


def step_frame_bytes(cameras: tuple) -> tuple[int, int]:
    """(request, reply) sizes in bytes of one step on the wire, from an in-process RobotCell."""
    from robot_server.cell import RobotCell
    from transport import steerl_pb2 as pb
    from transport.codec import PROTOCOL_VERSION, encode_observation, encode_tensor, info_to_pb

    config = bench_config(cameras=cameras, mode="sync")
    cell = RobotCell(config)
    try:
        cell.reset(0)
        action = np.zeros(config.robot.action.dim, dtype=np.float32)
        result = cell.step(action)
    finally:
        cell.close()
    request = pb.Envelope(protocol_version=PROTOCOL_VERSION, request_id=123456)
    encode_tensor(action, request.step.action)
    reply = pb.Envelope(protocol_version=PROTOCOL_VERSION, request_id=123456)
    encode_observation(result.observation, result.stamp_s, reply.step_reply.observation)
    reply.step_reply.reward = result.reward
    info_to_pb(result.info, reply.step_reply.info)
    return len(request.SerializeToString()), len(reply.SerializeToString())


class SerlLikeClient:
    """What SERL's FrankaEnv does per step: POST /pose, POST /getstate, numpy-ify the state."""

    def __init__(self, host_port: str, keep_alive: bool = True) -> None:
        host, port = host_port.rsplit(":", 1)
        self.host, self.port, self.keep_alive = host, int(port), keep_alive
        self.connection = self._connect() if keep_alive else None

    def _connect(self) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        connection.connect()
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def _post(self, path: str, body: bytes, content_type: str | None) -> bytes:
        connection = self.connection if self.keep_alive else self._connect()
        headers = {"Content-Length": str(len(body))}
        if content_type:
            headers["Content-Type"] = content_type
        if not self.keep_alive:
            headers["Connection"] = "close"
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            if not self.keep_alive:
                connection.close()
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
        if self.connection is not None:
            self.connection.close()


class HttpStepper:
    """The SERL-shaped HTTP/JSON step against a spawned Flask server."""

    def __init__(self, stack: ExitStack, options: Options, keep_alive: bool) -> None:
        self.child = stack.enter_context(spawned("http-server", _http_server_child, options))
        self.keep_alive = keep_alive
        self._stack = stack
        rng = np.random.default_rng(0)
        self.poses = np.tile(np.array([0.5, 0.0, 0.25, 1.0, 0.0, 0.0, 0.0]), (4096, 1))
        self.poses[:, :3] += rng.uniform(-0.05, 0.05, (4096, 3))
        self.index = 0
        self.description = ("http.client, one keep-alive connection (TCP_NODELAY)" if keep_alive else
                            "http.client, a new connection per request (like requests.post without a Session)")

    def connect(self) -> None:
        self.client = SerlLikeClient(self.child.ready, keep_alive=self.keep_alive)
        self._stack.callback(self.client.close)

    def step(self) -> None:
        self.client.step(self.poses[self.index & 4095])
        self.index += 1

    def verify(self) -> None:
        state = self.client.step(self.poses[7])
        if state["jacobian"].shape != (6, 7) or not np.allclose(state["pose"], self.poses[7]):
            raise RuntimeError("HTTP baseline: unexpected /getstate reply")


def bench_round_trips(steps: int, block: int, options: Options) -> dict[str, dict[str, Any]]:
    """All round-trip variants at once, each behind its own server process, timed in interleaved
    blocks (order rotating) so that they share whatever else the machine is doing at the time."""
    clock = time.perf_counter_ns
    with ExitStack() as stack:
        steppers: dict[str, Any] = {
            "zmq_state": ZmqStepper(stack, (), options),
            "zmq_images": ZmqStepper(stack, CAMERAS, options),
            "zmq_floor_state": ZmqFloorStepper(stack, (), options),
            "zmq_floor_images": ZmqFloorStepper(stack, CAMERAS, options),
            "http_json": HttpStepper(stack, options, keep_alive=True),
            "http_json_new_connection": HttpStepper(stack, options, keep_alive=False),
        }
        for stepper in steppers.values():  # all children start at once; connect as each is ready
            stepper.connect()
        _pin(options.client_cpu)
        if options.pin:
            stack.callback(_unpin)
        for stepper in steppers.values():
            for _ in range(WARMUP_STEPS):
                stepper.step()
            stepper.verify()
        samples: dict[str, list[np.ndarray]] = {name: [] for name in steppers}
        names = list(steppers)
        for block_index, first in enumerate(range(0, steps, block)):
            count = min(block, steps - first)
            rotation = block_index % len(names)
            for name in names[rotation:] + names[:rotation]:
                stepper = steppers[name]
                for _ in range(REWARM_STEPS):
                    stepper.step()
                latencies = np.empty(count, dtype=np.int64)
                with gc_paused():
                    for i in range(count):
                        start = clock()
                        stepper.step()
                        latencies[i] = clock() - start
                samples[name].append(latencies)
        blocks = -(-steps // block)
        results: dict[str, dict[str, Any]] = {}
        for name, stepper in steppers.items():
            row: dict[str, Any] = {"steps": steps, "warmup_steps": WARMUP_STEPS, "blocks": blocks,
                                   "rewarm_steps_per_block": REWARM_STEPS}
            if isinstance(stepper, ZmqStepper):
                row["cameras"] = [list(c) for c in stepper.cameras]
                row["image_bytes_per_step"] = sum(w * h * 3 for _, w, h in stepper.cameras)
            elif isinstance(stepper, ZmqFloorStepper):
                row["request_bytes"], row["reply_bytes"] = stepper.request_bytes, stepper.reply_bytes
            else:
                row["client"] = stepper.description
                row["server"] = "Flask + werkzeug dev server, threaded"
            row.update(percentiles_ms(np.concatenate(samples[name])))
            results[name] = row
    return results


# ------------------------------------------------------------------------------------------------
# 4. breakdown of the ZeroMQ step (instrumented, one variant at a time)
# ------------------------------------------------------------------------------------------------
def _instrument_client(env) -> _Timers:
    import actor.env as env_module
    import transport.zmq_link as zmq_link

    link, timers = env.link, _Timers()
    client = getattr(link, "_client", None)
    zmq_socket = getattr(client, "_socket", None)
    timers.wrap(env_module, "encode_tensor", "client_encode_action")
    timers.wrap(client, "call", "client_rpc_call_total")
    timers.wrap(zmq_socket, "send", "client_zmq_send")
    timers.wrap(zmq_socket, "poll", "client_wait_for_reply")
    timers.wrap(zmq_socket, "recv", "client_zmq_recv")
    timers.wrap(zmq_link, "parse_envelope", "client_parse_reply")
    timers.wrap(env_module, "decode_observation", "client_decode_observation")
    return timers


def bench_breakdown(cameras: tuple, steps: int, options: Options) -> dict[str, Any]:
    clock = time.perf_counter_ns
    with ExitStack() as stack:
        stepper = ZmqStepper(stack, cameras, options, instrument=True)
        stepper.connect()
        _pin(options.client_cpu)
        if options.pin:
            stack.callback(_unpin)
        for _ in range(WARMUP_STEPS):
            stepper.step()
        timers = _instrument_client(stepper.env)
        latencies = np.empty(steps, dtype=np.int64)
        try:
            with gc_paused():
                for i in range(steps):
                    start = clock()
                    stepper.step()
                    latencies[i] = clock() - start
        finally:
            timers.restore()
        stepper.close()
        server_pieces = stepper.child.stop_and_collect()
    if not server_pieces:
        raise RuntimeError("the instrumented robot server sent no timings")
    missing = timers.missing + server_pieces.pop("missing_hooks", [])
    if missing:
        print(f"breakdown: hooks not found (the code under test changed?), skipped: {', '.join(missing)}",
              file=sys.stderr)
    result: dict[str, Any] = {"steps": float(steps), "client_env_step_total_us": float(np.median(latencies) / 1e3),
                              **timers.medians_us(), **{f"server_{k}": v for k, v in server_pieces.items()},
                              "missing_hooks": missing}

    def derive(name: str, plus: tuple[str, ...], minus: tuple[str, ...]) -> None:
        if all(key in result for key in plus + minus):
            result[name] = sum(result[key] for key in plus) - sum(result[key] for key in minus)

    derive("server_cell_step_other_us", ("server_cell_step_total",),
           ("server_safety_validate", "server_safety_target", "server_observation_assembly"))
    derive("server_serialize_reply_us", ("server_serialize_and_send_reply",), ("server_zmq_send_multipart",))
    # Python work in the server from recv to handing the reply to zmq. send_multipart itself is
    # left out: with 2 cores and 4 busy threads (2 mains + 2 zmq I/O threads) the server is
    # usually preempted inside it while the reply travels and the client runs.
    derive("server_compute_us", ("server_serve_one_total",), ("server_zmq_send_multipart",))
    derive("transport_and_wakeups_us", ("client_wait_for_reply", "client_zmq_send", "client_zmq_recv"),
           ("server_compute_us",))
    return result


# ------------------------------------------------------------------------------------------------
# 3. Realtime loop
# ------------------------------------------------------------------------------------------------
def bench_realtime(steps: int, options: Options) -> dict[str, Any]:
    from actor.env import make_env

    config = bench_config(mode="realtime", rate_hz=REALTIME_RATE_HZ)
    period_ns = 1e9 / REALTIME_RATE_HZ
    with spawned("robot-server", _robot_server_child, config, options, False) as child:
        _pin(options.client_cpu)
        env = make_env(with_env_address(config, child.ready), client_name="robot_link_bench_rt")
        try:
            env.reset(seed=0)
            action = np.zeros(env.action_space.shape[0], dtype=np.float32)
            returns = np.empty(steps + 1, dtype=np.int64)
            clock = time.perf_counter_ns
            info: dict = {}
            with gc_paused():
                for _ in range(REALTIME_WARMUP_STEPS):
                    env.step(action)
                returns[0] = clock()
                for i in range(1, steps + 1):
                    _, _, _, _, info = env.step(action)
                    returns[i] = clock()
        finally:
            env.close()
            if options.pin:
                _unpin()
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
        "periods_off_by_more_than_1ms": int(np.count_nonzero(deviation_ms > 1.0)),
        "server_missed_ticks": float(info.get("missed_ticks", float("nan"))),
    }


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


BREAKDOWN_ROWS = [
    ("client_env_step_total_us", "client: env.step total (instrumented run)"),
    ("client_encode_action", "client: encode action tensor"),
    ("client_zmq_send", "client: zmq send"),
    ("client_wait_for_reply", "client: poll until the reply arrives"),
    ("client_zmq_recv", "client: zmq recv"),
    ("client_parse_reply", "client: parse Envelope"),
    ("client_decode_observation", "client: decode observation tensors"),
    ("server_compute_us", "server: recv to reply handed to zmq"),
    ("server_recv_multipart", "server: zmq recv_multipart"),
    ("server_parse_request", "server: parse Envelope"),
    ("server_decode_action", "server: decode action tensor"),
    ("server_cell_step_total", "server: RobotCell.step total"),
    ("server_safety_validate", "server:   safety validate"),
    ("server_safety_target", "server:   safety target (scale, clip, box)"),
    ("server_observation_assembly", "server:   observation assembly (_observe)"),
    ("server_cell_step_other_us", "server:   rest of step (state, info, clock)"),
    ("server_encode_observation", "server: encode observation tensors"),
    ("server_info_to_pb", "server: info map"),
    ("server_serialize_reply_us", "server: serialize reply Envelope"),
    ("server_zmq_send_multipart", "server: zmq send_multipart (incl. preemption)"),
    ("transport_and_wakeups_us", "transport + wake-ups (client wait - server work)"),
    ("server_full_gc_pause_us", "server: one full gc.collect() pause"),
    ("server_gc_tracked_objects", "server: objects tracked by the GC (count)"),
]


def print_report(results: dict[str, Any]) -> None:
    host = results["machine"]
    print(f"\nrobot link benchmark ({'quick' if results['quick'] else 'full'}) on {host['cpu_model']}, "
          f"{host['cpu_count']} cores, python {host['python']}, pyzmq {host['pyzmq']} "
          f"(libzmq {host['libzmq']}), protobuf {host['protobuf']} ({host['protobuf_backend']}), "
          f"numpy {host['numpy']}")
    print("options: " + ", ".join(f"{k}={v}" for k, v in results["options"].items()))
    if "foreign_cpu_share_during_run" in host:
        print(f"other processes used {host['foreign_cpu_share_during_run']:.0%} of the machine's CPU during "
              f"the run; load average {host['loadavg_at_start'][0]:.2f} at start, "
              f"{host['loadavg_at_end'][0]:.2f} at end; steal {host.get('cpu_steal_s_during_run', 0):.2f} s")
        by_section = host.get("foreign_cpu_share_by_section", {})
        print("  by section: " + ", ".join(f"{name} {share:.0%}" for name, share in by_section.items()
                                           if share is not None))
    header = f"{'round trip per step':<48} {'steps':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    rows = [("ZeroMQ + protobuf, state only", results["zmq_state"]),
            ("ZeroMQ + protobuf, state + 2x128x128 RGB", results["zmq_images"]),
            ("bare pyzmq ping-pong, state-size frames", results["zmq_floor_state"]),
            ("bare pyzmq ping-pong, 2-image-size frames", results["zmq_floor_images"]),
            ("HTTP/JSON (SERL shape), keep-alive", results["http_json"]),
            ("HTTP/JSON (SERL shape), new conn. per request", results["http_json_new_connection"])]
    for label, row in rows:
        print(f"{label:<48} {row['steps']:>6} {row['p50_ms']:>8.3f} {row['p90_ms']:>8.3f} "
              f"{row['p99_ms']:>8.3f} {row['max_ms']:>8.3f}")
    print(f"\nHTTP keep-alive p50 / ZeroMQ state-only p50: {results['http_over_zmq_p50_ratio']:.1f}x "
          f"(new connection per request: {results['http_new_connection_over_zmq_p50_ratio']:.1f}x)")
    rt = results["realtime"]
    print(f"realtime {rt['rate_hz']:g} Hz, {rt['steps']} steps: period p50 {rt['period_p50_ms']:.3f} ms; "
          f"|period - {1000 / rt['rate_hz']:g} ms| p50 {rt['jitter_p50_ms']:.3f}, p99 {rt['jitter_p99_ms']:.3f}, "
          f"max {rt['jitter_max_ms']:.3f} ms; {rt['periods_off_by_more_than_1ms']} periods off by > 1 ms; "
          f"server missed ticks {rt['server_missed_ticks']:g}")
    if "breakdown" in results:
        state, images = results["breakdown"]["state"], results["breakdown"]["images"]
        print(f"\nbreakdown, median us per step (instrumented runs of {results['breakdown']['steps']} steps):")
        print(f"  {'piece':<50} {'state':>9} {'2 images':>9}")
        for key, label in BREAKDOWN_ROWS:
            if key in state:
                print(f"  {label:<50} {state[key]:>9.1f} {images.get(key, float('nan')):>9.1f}")
    print("\ntargets:")
    for detail in results["target_details"].values():
        verdict = "PASS" if detail["pass"] else "FAIL"
        print(f"  [{verdict}] {detail['description']:<48} measured {detail['measured']:.3f}")


def run(quick: bool, options: Options, breakdown: bool) -> dict[str, Any]:
    steps = QUICK_STEPS if quick else FULL_STEPS
    realtime_steps = QUICK_REALTIME_STEPS if quick else FULL_REALTIME_STEPS
    if options.pin and (not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2):
        print("--pin needs sched_setaffinity and 2 cores; running unpinned", file=sys.stderr)
        options = dataclasses.replace(options, pin=False)
    if options.fifo:
        _set_fifo()
    started = time.monotonic()
    accounting = _cpu_accounting()
    results: dict[str, Any] = {
        "benchmark": "robot_link", "quick": quick, "machine": machine_info(),
        "options": {**dataclasses.asdict(options), "client_gc_disabled_in_timed_loops": True,
                    "transport": "tcp loopback", "backend": "kinematic", "config": CONFIG_NAME},
    }
    block = QUICK_BLOCK if quick else FULL_BLOCK
    print(f"round trips: ZeroMQ (state, 2 images), bare pyzmq floor, HTTP/JSON (keep-alive, new connection); "
          f"{steps} steps each, interleaved in blocks of {block} ...", flush=True)
    section = _cpu_accounting()
    results.update(bench_round_trips(steps, block, options))
    foreign = results["machine"].setdefault("foreign_cpu_share_by_section", {})
    foreign["round_trips"] = _foreign_load(section).get("foreign_cpu_share_during_run")
    results["http_over_zmq_p50_ratio"] = results["http_json"]["p50_ms"] / results["zmq_state"]["p50_ms"]
    results["http_new_connection_over_zmq_p50_ratio"] = (
        results["http_json_new_connection"]["p50_ms"] / results["zmq_state"]["p50_ms"])
    print(f"realtime loop ({realtime_steps} steps at {REALTIME_RATE_HZ:g} Hz) ...", flush=True)
    section = _cpu_accounting()
    results["realtime"] = bench_realtime(realtime_steps, options)
    foreign["realtime"] = _foreign_load(section).get("foreign_cpu_share_during_run")
    if breakdown:
        print("breakdown (instrumented runs) ...", flush=True)
        breakdown_steps = QUICK_BREAKDOWN_STEPS if quick else FULL_BREAKDOWN_STEPS
        section = _cpu_accounting()
        results["breakdown"] = {
            "steps": breakdown_steps,
            "state": bench_breakdown((), breakdown_steps, options),
            "images": bench_breakdown(CAMERAS, breakdown_steps, options),
        }
        foreign["breakdown"] = _foreign_load(section).get("foreign_cpu_share_during_run")
    results["targets"], results["target_details"] = evaluate_targets(results)
    results["machine"]["loadavg_at_end"] = _loadavg()
    steal_end, steal_start = _steal_s(), results["machine"]["cpu_steal_s_at_start"]
    if steal_end is not None and steal_start is not None:
        results["machine"]["cpu_steal_s_during_run"] = steal_end - steal_start
    results["machine"].update(_foreign_load(accounting))
    results["wall_time_s"] = time.monotonic() - started
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write all numbers and machine info to this file")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps per round-trip variant, {QUICK_REALTIME_STEPS} realtime steps")
    parser.add_argument("--pin", action="store_true",
                        help="pin the client to CPU 0 and each server to CPU 1 (sched_setaffinity)")
    parser.add_argument("--server-gc-freeze", action="store_true",
                        help="what-if: robot servers run gc.collect(); gc.freeze() after start-up")
    parser.add_argument("--fifo", action="store_true",
                        help=f"what-if: the client and every server run under SCHED_FIFO priority {FIFO_PRIORITY} "
                             "(needs root or CAP_SYS_NICE)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the instrumented breakdown runs")
    args = parser.parse_args(argv)
    options = Options(pin=args.pin, server_gc_freeze=args.server_gc_freeze, fifo=args.fifo)
    results = run(args.quick, options, not args.no_breakdown)
    print_report(results)
    machine.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
