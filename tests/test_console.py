"""The operator console's plumbing on real loopback sockets: the actor's ConsoleLink, the
dashboard's TelemetryHub, the HTTP API of ``steerl dashboard``, and the dashboard config.
(The page itself, in Chromium, is tested in test_dashboard_browser.py.)"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest
import yaml
import zmq

from actor.acting import ActingLoop
from actor.console import ConsoleLink, operator_command_frame
from actor.env import make_env
from conftest import configure, free_tcp_address, free_tcp_port, running_server
from hardware_configs.loader import ConfigError, to_dict
from hardware_configs.schema import DashboardConfig, SessionConfig, load_config, save_config
from tools.dashboard.hub import CommandRefused, TelemetryHub, encode_jpeg
from transport import steerl_pb2 as pb
from transport.codec import PROTOCOL_VERSION, encode_tensor


def _with_console_addresses(config: SessionConfig) -> SessionConfig:
    return dataclasses.replace(config, dashboard=dataclasses.replace(
        config.dashboard, telemetry_address=free_tcp_address(), command_address=free_tcp_address()))


def _wait(condition, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def _events(console: ConsoleLink, count: int, timeout_s: float = 5.0) -> list[str]:
    events: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(events) < count and time.monotonic() < deadline:
        events += console.read_events()
        time.sleep(0.01)
    return events


def test_buttons_arrive_as_operator_events_and_malformed_commands_do_nothing() -> None:
    config = _with_console_addresses(configure("sim_panda_reach"))
    console = ConsoleLink(config.dashboard, "actor-test", config.name)
    hub = TelemetryHub(config)
    sender = zmq.Context.instance().socket(zmq.PUSH)
    sender.connect(config.dashboard.command_address)
    try:
        _wait(lambda: _try_send(hub, "PAUSE_TOGGLE"), "the command socket to connect")
        assert _events(console, 1) == ["PAUSE_TOGGLE"]

        wrong_type = pb.Envelope(protocol_version=PROTOCOL_VERSION)
        wrong_type.observe.SetInParent()
        for frame in (b"\x00garbage", wrong_type.SerializeToString(), operator_command_frame("LAUNCH_ROCKET"),
                      operator_command_frame("MARK_SUCCESS", stop_session=True), operator_command_frame("")):
            sender.send(frame)
        sender.send(operator_command_frame("MARK_SUCCESS", origin="test"))
        assert _events(console, 1) == ["MARK_SUCCESS"]  # the good one after five bad ones is not lost
        assert console.commands_refused == 5
        assert not console.stop_requested

        hub.send_command(stop_session=True)
        _wait(lambda: console.read_events() == [] and console.stop_requested, "the stop request")

        with pytest.raises(CommandRefused, match="not one of"):
            hub.send_command("LAUNCH_ROCKET")
        with pytest.raises(CommandRefused, match="exactly one"):
            hub.send_command("MARK_SUCCESS", stop_session=True)
    finally:
        sender.close(linger=0)
        hub.close()
        console.close()


def _try_send(hub: TelemetryHub, event: str) -> bool:
    try:
        hub.send_command(event)
    except CommandRefused:
        return False
    return True


def test_a_press_with_no_actor_is_refused_not_queued_for_a_later_actor() -> None:
    config = _with_console_addresses(configure("sim_panda_reach"))
    hub = TelemetryHub(config)
    try:
        with pytest.raises(CommandRefused, match="no actor"):
            hub.send_command("MARK_SUCCESS")
        console = ConsoleLink(config.dashboard, "actor-late", config.name)
        try:
            _wait(lambda: _try_send(hub, "RESUME"), "the late actor's command socket")
            events = _events(console, 2, timeout_s=1.0)
            assert events == ["RESUME"]  # the MARK_SUCCESS pressed before it connected never arrives
        finally:
            console.close()
    finally:
        hub.close()


def test_telemetry_reaches_the_hub_with_jpeg_frames_and_bad_messages_are_dropped() -> None:
    config = _with_console_addresses(configure("sim_panda_reach"))
    hub = TelemetryHub(config)
    console = ConsoleLink(config.dashboard, "actor-test", config.name, total_steps=500)
    image = np.zeros((48, 64, 3), np.uint8)
    image[8:24, 16:40] = (255, 0, 0)  # a red block on black, in RGB
    try:
        console.episode_finished(pb.ConsoleEpisode(episode=3, env_steps=120, episode_return=-1.5, length=40,
                                                   success=True, ended_by="success"))

        def publish_until_seen() -> bool:
            console.publish({"env_steps": 123, "episode": 4, "operator_state": "running", "intervened": True,
                             "learner_updates": 7, "link_latency_ms": 2.5}, {"emergency_stopped": 0.0},
                            {"front": image}, np.array([0.5, -0.25, 0.0, 1.0]), {"MARK_SUCCESS": 1})
            time.sleep(0.05)
            return "front" in hub.frames()

        _wait(publish_until_seen, "a frame at the hub")
        decoded = cv2.imdecode(np.frombuffer(hub.frames()["front"].jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == (48, 64, 3)
        blue, green, red = decoded[16, 28]  # OpenCV decodes to BGR
        assert red > 200 and green < 60 and blue < 60 and decoded[40, 60].max() < 40
        snapshot = hub.snapshot()
        assert snapshot["live"] and snapshot["cameras"] == ["front"]
        actor = snapshot["actor"]
        assert (actor["env_steps"], actor["total_steps"], actor["episode"], actor["intervened"]) == (123, 500, 4, True)
        assert actor["action"] == [0.5, -0.25, 0.0, 1.0] and actor["link_latency_ms"] == 2.5
        assert actor["operator_events"] == {"MARK_SUCCESS": 1}
        assert snapshot["episodes"] == [{"episode": 3, "env_steps": 120, "episode_return": -1.5, "length": 40,
                                         "success": True, "intervention_rate": 0.0, "evaluation": False,
                                         "discarded": False, "ended_by": "success"}]

        # A peer publishing garbage on the telemetry address is counted and ignored.
        rogue_config = _with_console_addresses(configure("sim_panda_reach"))
        rogue_hub = TelemetryHub(rogue_config)
        rogue = zmq.Context.instance().socket(zmq.PUB)
        rogue.bind(rogue_config.dashboard.telemetry_address)
        try:
            bad_image = pb.Envelope(protocol_version=PROTOCOL_VERSION)
            encode_tensor(np.zeros((4, 4, 5), np.uint8), bad_image.console_telemetry.images["front"])
            _wait(lambda: rogue.send(b"\xff\x00not protobuf") or rogue.send(bad_image.SerializeToString())
                  or rogue_hub.malformed >= 2, "the hub to drop the rogue messages")
            assert rogue_hub.frames() == {} and not rogue_hub.snapshot()["live"]
        finally:
            rogue.close(linger=0)
            rogue_hub.close()
    finally:
        console.close()
        hub.close()


def test_jpeg_encoding_takes_rgb_and_grey_and_names_what_it_refuses() -> None:
    grey = np.full((10, 12), 128, np.uint8)
    assert cv2.imdecode(np.frombuffer(encode_jpeg(grey, 90), np.uint8), cv2.IMREAD_UNCHANGED).shape == (10, 12)
    assert cv2.imdecode(np.frombuffer(encode_jpeg(grey[:, :, None], 90), np.uint8),
                        cv2.IMREAD_UNCHANGED).shape == (10, 12)
    with pytest.raises(ValueError, match="uint8"):
        encode_jpeg(np.zeros((4, 4, 3), np.float32), 80)
    with pytest.raises(ValueError, match="shape"):
        encode_jpeg(np.zeros((4, 4, 4), np.uint8), 80)


def test_the_acting_loop_publishes_steps_and_obeys_the_console_with_the_robot_server_holding() -> None:
    """A PyBullet cell with a camera behind a real robot server; the loop acts in a thread; the
    console's emergency stop reaches the robot server both ways and the loop stops stepping."""
    config = _with_console_addresses(configure("sim_panda_reach", backend="pybullet", cameras=[("front", 32, 32)]))
    config = dataclasses.replace(config, actor=dataclasses.replace(config.actor, random_steps=10**6,
                                                                  eval_every_episodes=0))
    with running_server(config) as server:
        env = make_env(config)
        console = ConsoleLink(config.dashboard, "actor-loop", config.name, total_steps=10**6)
        hub = TelemetryHub(config)
        loop = ActingLoop(config, env, None, tuple(env.observation_space.spaces), console=console)
        thread = threading.Thread(target=loop.run, args=(10**6,), daemon=True)
        thread.start()
        try:
            _wait(lambda: hub.snapshot()["actor"].get("env_steps", 0) > 5 and "front" in hub.frames(),
                  "steps and frames at the hub")
            result = hub.send_command("EMERGENCY_STOP")
            assert result["robot"]["held"] and result["actor"] == "delivered"
            assert server.cell.emergency_stopped
            _wait(lambda: hub.snapshot()["actor"]["operator_state"] == "e-stopped", "the loop's stopped state")
            steps = loop.stats.env_steps
            time.sleep(0.5)
            assert loop.stats.env_steps == steps
            hub.send_command("RESUME")
            _wait(lambda: loop.stats.env_steps > steps + 3, "the loop to act again")
            assert not server.cell.emergency_stopped
            hub.send_command(stop_session=True)
            thread.join(timeout=30)
            assert not thread.is_alive()
        finally:
            loop.request_stop()
            thread.join(timeout=30)
            hub.close()
            console.close()
            env.close()


def test_dashboard_config_is_validated_and_names_the_field(tmp_path) -> None:
    config = load_config("sim_panda_pick_cube")
    for changes, field in (({"telemetry_address": "tcp://10.0.0.5:5570"}, "dashboard: telemetry_address"),
                           ({"command_address": "udp://127.0.0.1:1"}, "dashboard: command_address"),
                           ({"port": 70000}, "dashboard: port"),
                           ({"telemetry_hz": 0}, "dashboard: telemetry_hz"),
                           ({"jpeg_quality": 101}, "dashboard: jpeg_quality"),
                           ({"command_address": config.dashboard.telemetry_address}, "dashboard: telemetry_address "
                                                                                    "and command_address")):
        plain = json.loads(json.dumps(to_dict(config)))
        plain["dashboard"].update(changes)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(plain))
        with pytest.raises(ConfigError, match=field):
            load_config(path)
    assert DashboardConfig(host="127.0.0.1").loopback_only and DashboardConfig(host="localhost").loopback_only
    assert not DashboardConfig(host="0.0.0.0").loopback_only


def _request(url: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_http_api_refuses_bad_requests_naming_the_field(tmp_path) -> None:
    config = _with_console_addresses(configure("sim_panda_reach"))
    port = free_tcp_port()
    config = dataclasses.replace(config, dashboard=dataclasses.replace(config.dashboard, port=port))
    config_file = save_config(config, tmp_path / "api.yaml")
    checkpoint = tmp_path / "runs" / "old_run" / "checkpoints" / "ckpt-000000100"
    checkpoint.mkdir(parents=True)
    (checkpoint / "learner.json").write_text(json.dumps({"updates": 100, "transitions_received": 400}))
    server = subprocess.Popen([sys.executable, "-m", "tools.cli", "dashboard", "--config", str(config_file),
                               "--runs-dir", str(tmp_path / "runs")])
    base = f"http://127.0.0.1:{port}/"
    try:
        _wait(lambda: _ok(base + "api/state"), "the dashboard", timeout_s=60)
        cases = [
            ("api/command", b"not json", 422, "body"),
            ("api/command", b"[1, 2]", 422, "body"),
            ("api/command", json.dumps({"event": 3}).encode(), 400, "event"),
            ("api/command", json.dumps({"event": "SELF_DESTRUCT"}).encode(), 400, "event"),
            ("api/command", json.dumps({"stop_session": "yes"}).encode(), 400, "stop_session"),
            ("api/command", json.dumps({"event": "MARK_SUCCESS"}).encode(), 409, "no actor"),
            ("api/session/start", json.dumps({"config": "no_such_cell", "steps": 10}).encode(), 400, "config"),
            ("api/session/start", json.dumps({"config": "sim_panda_reach", "steps": -1}).encode(), 400, "steps"),
            ("api/session/stop", b"{}", 409, "no session"),
            ("api/evaluate", json.dumps({"config": "sim_panda_reach", "checkpoint": "/etc", "episodes": 2}).encode(),
             400, "checkpoint"),
            ("api/evaluate", json.dumps({"config": "sim_panda_reach", "checkpoint": str(checkpoint),
                                         "episodes": 0}).encode(), 400, "episodes"),
        ]
        for path, body, status, words in cases:
            code, payload = _request(base + path, body)
            assert code == status and words in payload["error"], (path, body, code, payload)
        code, payload = _request(base + "api/frames/front.jpg")
        assert code == 404 and "front" in payload["error"]
        code, listed = _request(base + "api/checkpoints")
        assert code == 200 and [(c["run"], c["name"], c["updates"], c["transitions"])
                                for c in listed["checkpoints"]] == [("old_run", "ckpt-000000100", 100, 400)]
        code, configs = _request(base + "api/configs")
        assert configs["configs"][0] == str(config_file) and "sim_panda_pick_cube" in configs["configs"]
        assert server.poll() is None  # nothing above took the server down
    finally:
        server.terminate()
        server.wait(timeout=30)


def _ok(url: str) -> bool:
    try:
        return _request(url)[0] == 200
    except (urllib.error.URLError, ConnectionError):
        return False

