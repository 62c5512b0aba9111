"""The robot server over real ZeroMQ sockets on loopback: protocol, control, and bad input.

Every bad input must get a clear error reply (or be dropped with a log line), leave the arm where
it was, and leave the server serving the next request and the next client.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from actor.env import RobotLinkError, ZmqRobotLink, make_env
from hardware_configs.schema import CurveClientKeys, CurveServerKeys, save_config
from transport import steerl_pb2 as pb
from transport.codec import PROTOCOL_VERSION, decode_observation, encode_tensor
from transport.zmq_link import RemoteError, RpcClient, generate_keypair

from conftest import running_server


def _handshake(client: RpcClient, role=pb.ROLE_CONTROLLER, name="test", timeout_ms=3000,
               **fields) -> pb.HandshakeReply:
    request = pb.Envelope()
    request.handshake.protocol_version = fields.pop("protocol_version", PROTOCOL_VERSION)
    request.handshake.client_name = name
    request.handshake.role = role
    for key, value in fields.items():
        field = getattr(request.handshake, key)
        field.update(value) if isinstance(value, dict) else setattr(request.handshake, key, value)
    return client.call(request, timeout_ms).handshake_reply


def _reset(client: RpcClient, seed: int = 0) -> pb.ResetReply:
    request = pb.Envelope()
    request.reset.has_seed = True
    request.reset.seed = seed
    return client.call(request, 3000).reset_reply


def _step(client: RpcClient, action) -> pb.StepReply:
    request = pb.Envelope()
    encode_tensor(np.asarray(action), request.step.action)
    return client.call(request, 3000).step_reply


def _observe_tcp(client: RpcClient) -> np.ndarray:
    request = pb.Envelope()
    request.observe.SetInParent()
    return decode_observation(client.call(request, 3000).observe_reply.observation)["tcp_pose"][:3].copy()


def _error_reply(client: RpcClient, frame: bytes) -> pb.Error:
    client.send_raw(frame)
    raw = client.recv_raw(3000)
    assert raw is not None, "no reply to a bad frame"
    reply = pb.Envelope.FromString(raw)
    assert reply.WhichOneof("body") == "error"
    return reply.error


@pytest.fixture
def server(kinematic_config):
    with running_server(kinematic_config) as running:
        yield running


@pytest.fixture
def controller(server):
    client = RpcClient(server.address)
    _handshake(client)
    _reset(client)
    yield client
    client.close()


def test_handshake_announces_spaces_and_hashes(server) -> None:
    client = RpcClient(server.address)
    reply = _handshake(client)
    assert reply.spaces_hash == server.cell.spaces.digest()
    assert set(reply.spaces.observation) == {"tcp_pose", "tcp_velocity", "gripper_width"}
    assert list(reply.spaces.action.shape) == [4]
    assert reply.config_name == "sim_panda_reach" and reply.backend == "kinematic"
    client.close()


def test_wrong_protocol_version_is_refused_with_both_versions(server) -> None:
    client = RpcClient(server.address)
    with pytest.raises(RemoteError) as error:
        _handshake(client, protocol_version=PROTOCOL_VERSION + 1)
    assert error.value.code == pb.ERROR_PROTOCOL_VERSION
    assert f"{PROTOCOL_VERSION + 1}" in error.value.detail and f"{PROTOCOL_VERSION}" in error.value.detail
    envelope = pb.Envelope(protocol_version=99)
    envelope.observe.SetInParent()
    error = _error_reply(client, envelope.SerializeToString())
    assert error.code == pb.ERROR_PROTOCOL_VERSION and "protocol version 99" in error.message


def test_config_mismatch_names_the_sections(server, kinematic_config) -> None:
    import dataclasses

    other = dataclasses.replace(kinematic_config, robot=dataclasses.replace(
        kinematic_config.robot, action=dataclasses.replace(kinematic_config.robot.action, xyz_scale_m=0.05)))
    with pytest.raises(RobotLinkError, match=r"config sections differ.*robot\.action") as error:
        make_env(other)
    assert "robot.task" not in str(error.value)


def test_spaces_hash_mismatch_is_refused(server) -> None:
    client = RpcClient(server.address)
    with pytest.raises(RemoteError, match="expects spaces deadbeef") as error:
        _handshake(client, spaces_hash="deadbeef")
    assert error.value.code == pb.ERROR_INCOMPATIBLE


def test_malformed_bytes_get_an_error_and_server_keeps_serving(controller) -> None:
    error = _error_reply(controller, b"\x0a\xff\xff\xff\xff\x0f garbage")
    assert error.code == pb.ERROR_MALFORMED and "not a steerl Envelope" in error.message
    error = _error_reply(controller, b"")
    assert error.code == pb.ERROR_MALFORMED and "no body" in error.message
    assert _step(controller, np.zeros(4, np.float32)).observation.fields["tcp_pose"].dtype == "float32"


def test_valid_message_of_the_wrong_type_is_refused(controller) -> None:
    envelope = pb.Envelope(protocol_version=PROTOCOL_VERSION, request_id=7)
    envelope.step_reply.reward = 1.0
    error = _error_reply(controller, envelope.SerializeToString())
    assert error.code == pb.ERROR_UNEXPECTED_MESSAGE and "'step_reply'" in error.message


@pytest.mark.parametrize("action, message", [
    (np.zeros(7, np.float32), r"step.action: expected shape \(4,\)"),
    (np.array([np.nan, 0, 0, 0], np.float32), "non-finite values"),
    (np.zeros(4, np.int32), "not a float type"),
])
def test_bad_action_is_refused_and_arm_stays(controller, action, message) -> None:
    before = _observe_tcp(controller)
    with pytest.raises(RemoteError, match=message) as error:
        _step(controller, action)
    assert error.value.code == pb.ERROR_INVALID_ARGUMENT and error.value.field == "step.action"
    np.testing.assert_array_equal(_observe_tcp(controller), before)
    _step(controller, np.array([0.5, 0, 0, 0], np.float32))
    assert _observe_tcp(controller)[0] == pytest.approx(before[0] + 0.015, abs=1e-6)


def test_tensor_whose_bytes_do_not_match_its_shape_is_refused(controller) -> None:
    request = pb.Envelope()
    request.step.action.dtype = "float32"
    request.step.action.shape[:] = [4]
    request.step.action.data = b"\x00" * 3
    with pytest.raises(RemoteError, match="3 bytes do not hold a float32 tensor"):
        controller.call(request, 3000)


def test_oversized_frame_gets_an_error_and_a_huge_one_is_dropped(server, controller) -> None:
    limit = server.config.server.max_message_bytes
    error = _error_reply(controller, b"\x00" * (limit + 1))
    assert error.code == pb.ERROR_TOO_LARGE and f"limit of {limit} bytes" in error.message
    # Far beyond the limit, ZeroMQ itself drops the frame and the peer; the server carries on.
    brute = RpcClient(server.address, max_message_bytes=64 * limit)
    brute.send_raw(b"\x00" * (8 * limit))
    assert brute.recv_raw(300) is None
    brute.close()
    assert _step(controller, np.zeros(4, np.float32)).HasField("observation")


def test_multipart_message_is_refused(server, controller) -> None:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(server.address)
    socket.send_multipart([b"a", b"b"])
    assert socket.poll(3000)
    reply = pb.Envelope.FromString(socket.recv())
    assert reply.error.code == pb.ERROR_MALFORMED and "one frame" in reply.error.message
    socket.close(linger=0)


def test_requests_before_handshake_are_refused(server) -> None:
    client = RpcClient(server.address)
    with pytest.raises(RemoteError, match="send a handshake first"):
        _step(client, np.zeros(4, np.float32))


def test_one_controller_at_a_time_and_observers_may_watch(server) -> None:
    first, second, observer = RpcClient(server.address), RpcClient(server.address), RpcClient(server.address)
    _handshake(first, name="first")
    with pytest.raises(RemoteError, match="controlled by 'first'") as error:
        _handshake(second, name="second")
    assert error.value.code == pb.ERROR_NOT_CONTROLLER
    _handshake(observer, role=pb.ROLE_OBSERVER, name="viewer")
    with pytest.raises(RemoteError, match="not the controller"):
        _reset(observer)
    assert _observe_tcp(observer).shape == (3,)
    # A goodbye hands control over.
    goodbye = pb.Envelope()
    goodbye.goodbye.SetInParent()
    first.call(goodbye, 3000)
    _handshake(second, name="second")
    _reset(second)
    for client in (first, second, observer):
        client.close()


def test_silent_controller_loses_control_after_its_lease(kinematic_config) -> None:
    import dataclasses

    config = dataclasses.replace(kinematic_config, server=dataclasses.replace(
        kinematic_config.server, controller_lease_ms=300))
    with running_server(config) as server:
        first, second = RpcClient(server.address), RpcClient(server.address)
        _handshake(first, name="first")
        with pytest.raises(RemoteError, match="controlled by 'first'"):
            _handshake(second, name="second")
        time.sleep(0.4)
        _handshake(second, name="second")
        with pytest.raises(RemoteError, match="send a handshake first"):
            _reset(first)
        first.close()
        second.close()


def test_client_vanishing_mid_request_does_not_disturb_the_next(kinematic_config) -> None:
    import dataclasses

    config = dataclasses.replace(kinematic_config, server=dataclasses.replace(
        kinematic_config.server, controller_lease_ms=300))
    with running_server(config) as server:
        for body in ("reset", "step"):
            ghost = RpcClient(server.address)
            _handshake(ghost, name="ghost")
            if body == "step":
                _reset(ghost)
                request = pb.Envelope(protocol_version=PROTOCOL_VERSION, request_id=99)
                encode_tensor(np.array([1.0, 0, 0, 0], np.float32), request.step.action)
            else:
                request = pb.Envelope(protocol_version=PROTOCOL_VERSION, request_id=99)
                request.reset.SetInParent()
            ghost.send_raw(request.SerializeToString())
            ghost.close()  # gone before the reply arrives
            observer = RpcClient(server.address)
            _handshake(observer, role=pb.ROLE_OBSERVER)
            assert _observe_tcp(observer).shape == (3,)
            observer.close()
            time.sleep(0.4)  # the ghost's lease runs out
            successor = RpcClient(server.address)
            _handshake(successor, name="successor")
            _reset(successor)
            assert _step(successor, np.zeros(4, np.float32)).info["episode_step"] == 1.0
            goodbye = pb.Envelope()
            goodbye.goodbye.SetInParent()
            successor.call(goodbye, 3000)
            successor.close()


def test_reconnecting_link_keeps_working(server, kinematic_config) -> None:
    link = ZmqRobotLink(kinematic_config, client_name="first-run")
    link.reset(seed=1)
    link.step(np.zeros(4, np.float32))
    link.close()
    env = make_env(kinematic_config)
    observation, _ = env.reset(seed=1)
    assert env.observation_space.contains(observation)
    env.close()


def test_watchdog_holds_a_silent_controller_in_realtime(kinematic_config) -> None:
    import dataclasses

    robot = kinematic_config.robot
    robot = dataclasses.replace(robot, control=dataclasses.replace(robot.control, mode="realtime", rate_hz=50.0),
                                safety=dataclasses.replace(robot.safety, watchdog_ms=100))
    config = dataclasses.replace(kinematic_config, robot=robot)
    with running_server(config) as server:
        env = make_env(config)
        env.reset(seed=0)
        _, _, _, _, info = env.step(np.zeros(4, np.float32))
        assert info["watchdog_tripped"] == 0.0
        time.sleep(0.3)
        assert server.cell.counters.watchdog_trips == 1  # fired by the server loop, before any request
        _, _, _, _, info = env.step(np.zeros(4, np.float32))
        assert info["watchdog_tripped"] == 1.0
        env.close()


def test_realtime_steps_are_paced_by_the_server_clock(kinematic_config) -> None:
    import dataclasses

    robot = kinematic_config.robot
    robot = dataclasses.replace(robot, control=dataclasses.replace(robot.control, mode="realtime", rate_hz=20.0))
    config = dataclasses.replace(kinematic_config, robot=robot)
    with running_server(config):
        env = make_env(config)
        env.reset(seed=0)
        stamps = []
        for _ in range(10):
            env.step(np.zeros(4, np.float32))
            stamps.append(time.monotonic())
        env.close()
    periods = np.diff(stamps)
    assert np.median(periods) == pytest.approx(0.05, abs=0.005)


def test_curve_admits_authorised_clients_only(tmp_path, kinematic_config) -> None:
    import dataclasses

    server_public, server_secret = generate_keypair(tmp_path / "server", "robot")
    _, client_secret = generate_keypair(tmp_path / "authorised", "actor")
    _, stranger_secret = generate_keypair(tmp_path / "strangers", "stranger")
    config = dataclasses.replace(kinematic_config, server=dataclasses.replace(
        kinematic_config.server,
        curve=CurveServerKeys(secret_key_file=str(server_secret), authorized_keys_dir=str(tmp_path / "authorised"))))
    with running_server(config) as server:
        good = RpcClient(server.address, curve=CurveClientKeys(str(client_secret), str(server_public)))
        assert _handshake(good).spaces_hash == server.cell.spaces.digest()
        bad = RpcClient(server.address, curve=CurveClientKeys(str(stranger_secret), str(server_public)))
        with pytest.raises(TimeoutError):
            _handshake(bad, name="stranger", timeout_ms=500)
        plain = RpcClient(server.address)
        with pytest.raises(TimeoutError):
            _handshake(plain, name="plaintext", timeout_ms=500)
        for client in (good, bad, plain):
            client.close()


def test_robot_server_process_stops_cleanly_on_sigterm(tmp_path, kinematic_config) -> None:
    config_file = save_config(kinematic_config, tmp_path / "cell.yaml")
    process = subprocess.Popen([sys.executable, "-m", "tools.cli", "robot-server", "--config", str(config_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        link = None
        deadline = time.monotonic() + 30
        while link is None:
            try:
                link = ZmqRobotLink(kinematic_config)
            except RobotLinkError:
                assert time.monotonic() < deadline, "robot server did not come up"
        link.reset(seed=0)
        link.close()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
        assert process.returncode == 0
        assert "stopped" in output
    finally:
        if process.poll() is None:
            process.kill()


def test_a_forgotten_controller_rejoins_at_its_next_reset_but_never_replays_a_step(kinematic_config,
                                                                                  monkeypatch) -> None:
    import dataclasses

    import robot_server.server as server_module

    # An actor that waits long for its learner between episodes says nothing to the robot server
    # meanwhile; the server forgets it after its client expiry (shortened here).
    monkeypatch.setattr(server_module, "CLIENT_EXPIRY_S", 0.3)
    config = dataclasses.replace(kinematic_config, server=dataclasses.replace(
        kinematic_config.server, controller_lease_ms=300))
    with running_server(config) as server:
        link = ZmqRobotLink(dataclasses.replace(config, env=dataclasses.replace(config.env, address=server.address)))
        zero = np.zeros(link.spaces.action_space().shape, np.float32)
        link.reset(0)
        link.step(zero)
        time.sleep(0.8)
        with pytest.raises(RobotLinkError, match="send a handshake first"):
            link.step(zero)  # the episode is gone: a step is not repeated after rejoining
        observation, _ = link.reset(1)  # a new episode: handshake again, then reset
        assert set(observation) == set(link.spaces.observation_space().spaces)
        link.step(zero)
        # Forgotten again while another client took control: the rejoin is refused, and says why.
        time.sleep(0.8)
        other = RpcClient(server.address)
        _handshake(other, name="other")
        with pytest.raises(RobotLinkError, match="controlled by 'other'"):
            link.reset(2)
        other.close()
        link.close()
