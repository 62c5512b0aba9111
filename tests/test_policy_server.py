"""The policy server and the actor's remote policy, over real ZeroMQ sockets on loopback.

The policy is a real :class:`~policies.base.Policy` subclass registered as kind ``test_linear``
(``tanh(W x + b)`` over the observation fields, Gaussian noise when stochastic), saved to a
directory and loaded through ``load_policy``, exactly as ``steerl policy-server`` loads any kind.
The end-to-end test drives the kinematic robot cell in-process with the real acting loop.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import gymnasium as gym
import numpy as np
import pytest
import safetensors.torch
import torch

from actor.acting import ActingLoop
from actor.env import make_env
from actor.remote_policy import (
    HoldAction,
    HoldReason,
    PolicyServerIncompatible,
    PolicyServerRefused,
    RemotePolicy,
    connect_remote_policy,
)
from hardware_configs.schema import (
    CurveClientKeys,
    CurveServerKeys,
    PolicyServerConfig,
    SessionConfig,
    load_config,
    save_config,
)
from learner.policy_server import PolicyServer
from policies.base import Policy, PolicyInput, load_policy, read_policy_file, register_policy, write_policy_file
from tools.cli import main as steerl_main
from transport import steerl_pb2 as pb
from transport.codec import PROTOCOL_VERSION, encode_tensor, spaces_to_pb
from transport.spaces import FieldSpec, RobotSpaces
from transport.zmq_link import RemoteError, RpcClient, generate_keypair

from conftest import configure, free_tcp_address

KEYS = ("gripper_width", "tcp_pose", "tcp_velocity")
TIMEOUT_S = 10.0


# --- a real policy kind -------------------------------------------------------------------------------

@register_policy("test_linear")
class LinearPolicy(Policy):
    """``tanh(W x + b)``, ``x`` the float fields of :attr:`spaces` concatenated in key order; with
    ``deterministic=False`` Gaussian noise (std 0.1) is added. Records every sample call's batch size
    (:attr:`calls`) and can be slowed down (:attr:`delay_s`) or broken (:attr:`fail_with`) by tests."""

    def __init__(self, spaces: RobotSpaces, weight: np.ndarray, bias: np.ndarray) -> None:
        self.spaces = spaces
        self.keys = tuple(sorted(spaces.observation))
        self.weight = torch.as_tensor(weight, dtype=torch.float32)
        self.bias = torch.as_tensor(bias, dtype=torch.float32)
        self.action_dim = int(self.bias.shape[0])
        self.calls: list[int] = []
        self.instructions: list[list[str]] = []
        self.delay_s = 0.0
        self.fail_with: Exception | None = None
        self.nan_output = False

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def to(self, device: torch.device | str) -> "LinearPolicy":
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        return self

    def sample(self, observations: PolicyInput, num_samples: int, deterministic: bool = False) -> torch.Tensor:
        features = [torch.as_tensor(np.asarray(observations[key]), dtype=torch.float32) for key in self.keys]
        batch = features[0].shape[0]
        self.calls.append(batch)
        if "instruction" in observations:
            self.instructions.append(list(observations["instruction"]))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        x = torch.cat([feature.reshape(batch, -1) for feature in features], dim=1).to(self.device)
        mean = torch.tanh(x @ self.weight.T + self.bias)
        actions = mean[:, None, :].expand(batch, num_samples, self.action_dim).clone()
        if not deterministic:
            actions = (actions + 0.1 * torch.randn_like(actions)).clamp(-1.0, 1.0)
        if self.nan_output:
            actions[:] = float("nan")
        return actions

    def save(self, directory: str | Path) -> None:
        directory = write_policy_file(directory, self.kind, spaces=self.spaces.to_json())
        safetensors.torch.save_file({"weight": self.weight.cpu().contiguous(), "bias": self.bias.cpu().contiguous()},
                                    str(directory / "model.safetensors"))

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "LinearPolicy":
        content = read_policy_file(directory)
        tensors = safetensors.torch.load_file(str(directory / "model.safetensors"))
        return cls(RobotSpaces.from_json(content["spaces"]), tensors["weight"], tensors["bias"]).to(device)


# --- helpers ------------------------------------------------------------------------------------------

def env_config(max_episode_steps: int = 50) -> SessionConfig:
    """The kinematic reach cell in-process; the actor acts with its policy from the first step."""
    config = configure(backend="kinematic", task__max_episode_steps=max_episode_steps)
    return dataclasses.replace(
        config, env=dataclasses.replace(config.env, connection="inproc"),
        learner=dataclasses.replace(config.learner, observation_keys=KEYS),
        actor=dataclasses.replace(config.actor, random_steps=0, eval_every_episodes=0, policy_source="remote"))


@pytest.fixture(scope="module")
def spaces() -> RobotSpaces:
    env = make_env(env_config())
    try:
        return RobotSpaces.from_gym(env.observation_space, env.action_space).select(KEYS)
    finally:
        env.close()


def observation(spaces: RobotSpaces, seed: int, batch: int | None = None) -> dict[str, np.ndarray]:
    """A random observation inside the spaces (a batch of them with ``batch``)."""
    rng = np.random.default_rng(seed)
    fields = {}
    for name, spec in spaces.observation.items():
        shape = tuple(spec.shape) if batch is None else (batch, *spec.shape)
        low, high = np.broadcast_to(spec.low, spec.shape), np.broadcast_to(spec.high, spec.shape)
        fields[name] = rng.uniform(low, high, shape).astype(spec.dtype)
    return fields


def save_linear_policy(directory: Path, spaces: RobotSpaces, seed: int = 0,
                       bias: tuple[float, ...] | None = None) -> Path:
    rng = np.random.default_rng(seed)
    inputs = sum(int(np.prod(spec.shape)) for spec in spaces.observation.values())
    action_dim = spaces.action.shape[0]
    weight = rng.normal(0.0, 0.3, (action_dim, inputs)) if bias is None else np.zeros((action_dim, inputs))
    LinearPolicy(spaces, weight, rng.normal(0.0, 0.3, action_dim) if bias is None else np.asarray(bias)).save(directory)
    return directory


class ServerThread:
    """A PolicyServer (from a policy object or a directory) serving on a thread until :meth:`stop`."""

    def __init__(self, policy: Policy | Path, address: str | None = None, **config_changes) -> None:
        config = dataclasses.replace(PolicyServerConfig(), address=address or free_tcp_address(), **config_changes)
        self.server = (PolicyServer.from_directory(policy, config) if isinstance(policy, Path)
                       else PolicyServer(policy, config))
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        self.server.stop()
        self._thread.join(timeout=TIMEOUT_S)
        assert not self._thread.is_alive(), "policy server did not stop"


@contextmanager
def serving(policy: Policy | Path, address: str | None = None, **config_changes) -> Iterator[PolicyServer]:
    """A :class:`ServerThread`'s server, stopped on exit."""
    thread = ServerThread(policy, address, **config_changes)
    try:
        yield thread.server
    finally:
        thread.stop()


@contextmanager
def client(address: str, spaces: RobotSpaces, timeout_ms: int = 2000, connect: bool = True,
           **kwargs) -> Iterator[RemotePolicy]:
    remote = RemotePolicy(address, spaces, timeout_ms=timeout_ms, **kwargs)
    try:
        if connect:
            remote.connect(TIMEOUT_S)
        yield remote
    finally:
        remote.close()


def wait_until(condition, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def handshake_envelope(spaces: RobotSpaces, **fields) -> pb.Envelope:
    envelope = pb.Envelope(protocol_version=PROTOCOL_VERSION)
    envelope.policy_handshake.protocol_version = PROTOCOL_VERSION
    envelope.policy_handshake.spaces.CopyFrom(spaces_to_pb(spaces))
    envelope.policy_handshake.spaces_hash = spaces.digest()
    for name, value in fields.items():
        setattr(envelope.policy_handshake, name, value)
    return envelope


def action_envelope(fields: Mapping[str, np.ndarray], **request) -> pb.Envelope:
    envelope = pb.Envelope(protocol_version=PROTOCOL_VERSION)
    for name, value in fields.items():
        encode_tensor(value, envelope.action_request.observation.fields[name])
    envelope.action_request.num_samples = request.pop("num_samples", 1)
    for name, value in request.items():
        setattr(envelope.action_request, name, value)
    return envelope


def concurrently(remotes: tuple[RemotePolicy, ...], act) -> list:
    """``act(index, remote)`` for every remote at once (threads released together); the results."""
    results: list = [None] * len(remotes)
    barrier = threading.Barrier(len(remotes))

    def run(index: int) -> None:
        barrier.wait()
        results[index] = act(index, remotes[index])

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(remotes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    return results


def local_actions(directory: Path, fields: Mapping[str, np.ndarray], num_samples: int = 1) -> np.ndarray:
    """What the same policy directory gives in this process (deterministic)."""
    return load_policy(directory).sample(fields, num_samples, deterministic=True).numpy()


# --- serving ------------------------------------------------------------------------------------------

def test_remote_actions_equal_the_local_policys(tmp_path: Path, spaces: RobotSpaces) -> None:
    directory = save_linear_policy(tmp_path / "linear", spaces)
    with serving(directory) as server, client(server.address, spaces) as remote:
        assert (remote.server.policy_kind, remote.server.policy_name) == ("test_linear", "linear")
        single = observation(spaces, seed=1)
        action = remote.act(single, deterministic=True)
        expected = local_actions(directory, {k: v[None] for k, v in single.items()})[0, 0]
        assert action.dtype == np.float32 and action.shape == (4,)
        np.testing.assert_allclose(action, expected, rtol=0, atol=1e-6)

        batch = observation(spaces, seed=2, batch=3)
        samples = remote.sample(batch, num_samples=5, deterministic=True)
        assert samples.shape == (3, 5, 4)
        np.testing.assert_allclose(samples, local_actions(directory, batch, 5), rtol=0, atol=1e-6)

        stochastic = remote.sample(batch, num_samples=5)
        assert stochastic.shape == (3, 5, 4) and np.all(np.abs(stochastic) <= 1.0)
        assert not np.allclose(stochastic, samples), "deterministic=False must reach the policy"
    assert remote.stats.answered == 1 and not remote.stats.holds


@register_policy("test_other")
class OtherPolicy(LinearPolicy):
    """Another kind, for the checks that refuse a policy of another kind."""


def test_newer_weights_are_swapped_in_between_sample_calls(tmp_path: Path, spaces: RobotSpaces) -> None:
    directory = save_linear_policy(tmp_path / "linear", spaces)
    newer = save_linear_policy(tmp_path / "newer", spaces, seed=1)
    fields = observation(spaces, seed=8)
    with serving(directory) as server, client(server.address, spaces) as remote:
        remote.act(fields, deterministic=True)
        assert (remote.stats.policy_name, remote.stats.policy_version) == ("linear", 1)
        assert server.set_policy(load_policy(newer), name="newer") == 2
        action = remote.act(fields, deterministic=True)
        np.testing.assert_allclose(action, local_actions(newer, {k: v[None] for k, v in fields.items()})[0, 0],
                                   rtol=0, atol=1e-6)
        assert (remote.stats.policy_name, remote.stats.policy_version) == ("newer", 2)
        other = OtherPolicy(spaces, np.zeros((4, 14)), np.zeros(4))
        with pytest.raises(ValueError, match="kind 'test_other' differs from the served kind 'test_linear'"):
            server.set_policy(other)


def test_concurrent_clients_are_served_in_one_sample_call(tmp_path: Path, spaces: RobotSpaces) -> None:
    directory = save_linear_policy(tmp_path / "linear", spaces)
    # A long batching wait (for a loaded test machine), well inside the server's ACTIVE_WINDOW_S: it
    # ends as soon as both recently active clients have a request in.
    with serving(directory, batch_wait_ms=300.0) as server, \
            client(server.address, spaces) as first, client(server.address, spaces) as second:
        policy: LinearPolicy = server.policy  # type: ignore[assignment]
        concurrently((first, second), lambda _, remote: remote.act(observation(spaces, 0)))  # both active now
        policy.calls.clear()
        observations = [observation(spaces, seed=10), observation(spaces, seed=11)]
        results = concurrently((first, second),
                               lambda index, remote: remote.act(observations[index], deterministic=True))
        assert policy.calls == [2], "both requests in one sample call"
        assert first.stats.batch_size == second.stats.batch_size == 2
        for index in (0, 1):  # each client got the rows of its own observation
            expected = local_actions(directory, {k: v[None] for k, v in observations[index].items()})[0, 0]
            np.testing.assert_allclose(results[index], expected, rtol=0, atol=1e-6)
        assert not first.stats.holds and not second.stats.holds


def test_only_requests_with_the_same_samples_flag_and_instruction_share_a_call(tmp_path: Path,
                                                                             spaces: RobotSpaces) -> None:
    directory = save_linear_policy(tmp_path / "linear", spaces)
    with serving(directory, batch_wait_ms=300.0) as server, \
            client(server.address, spaces, instruction="pick up the cube") as instructed, \
            client(server.address, spaces) as plain, client(server.address, spaces) as stochastic:
        policy: LinearPolicy = server.policy  # type: ignore[assignment]
        remotes = (instructed, plain, stochastic)

        def act(_: int, remote: RemotePolicy) -> np.ndarray:
            return remote.act(observation(spaces, 1), deterministic=remote is not stochastic)

        concurrently(remotes, act)  # all three active now
        policy.calls.clear()
        policy.instructions.clear()
        concurrently(remotes, act)
        assert sorted(policy.calls) == [1, 1, 1]
        assert policy.instructions == [["pick up the cube"]]
        assert all(remote.stats.answered == 2 for remote in remotes)


def test_malformed_requests_get_an_error_naming_the_field_and_the_server_keeps_serving(
        tmp_path: Path, spaces: RobotSpaces) -> None:
    directory = save_linear_policy(tmp_path / "linear", spaces)
    good = observation(spaces, seed=3)
    nan_pose = dict(good, tcp_pose=np.full(7, np.nan, np.float32))
    cases = [  # (request, error code, field named, words in the message)
        (action_envelope(good, num_samples=0), pb.ERROR_INVALID_ARGUMENT, "action_request.num_samples", "1..256"),
        (action_envelope(good, num_samples=10_000), pb.ERROR_INVALID_ARGUMENT, "action_request.num_samples", "10000"),
        (action_envelope({k: v for k, v in good.items() if k != "tcp_velocity"}), pb.ERROR_INVALID_ARGUMENT,
         "action_request.observation.fields[tcp_velocity]", "missing"),
        (action_envelope(dict(good, extra=np.zeros(2, np.float32))), pb.ERROR_INVALID_ARGUMENT,
         "action_request.observation.fields[extra]", "not a field of this policy"),
        (action_envelope(dict(good, tcp_pose=np.zeros(8, np.float32))), pb.ERROR_INVALID_ARGUMENT,
         "action_request.observation.fields[tcp_pose]", "expected (7,)"),
        (action_envelope(dict(good, tcp_pose=good["tcp_pose"].astype(np.float64))), pb.ERROR_INVALID_ARGUMENT,
         "action_request.observation.fields[tcp_pose]", "dtype float64, expected float32"),
        (action_envelope(nan_pose), pb.ERROR_INVALID_ARGUMENT, "action_request.observation.fields[tcp_pose]",
         "non-finite"),
        (action_envelope(good, batched=True), pb.ERROR_INVALID_ARGUMENT,
         "action_request.observation.fields[gripper_width]", "expected (B, 1)"),
        (action_envelope(dict(observation(spaces, 4, batch=2), tcp_pose=np.zeros((3, 7), np.float32)), batched=True),
         pb.ERROR_INVALID_ARGUMENT, "action_request.observation.fields[tcp_pose]", "batch of 3"),
        (action_envelope(observation(spaces, 4, batch=65), batched=True), pb.ERROR_INVALID_ARGUMENT,
         "action_request.observation", "65 observations"),
        (action_envelope(good, instruction="x" * 5000), pb.ERROR_INVALID_ARGUMENT, "action_request.instruction",
         "5000 characters"),
    ]
    broken_tensor = action_envelope(good)
    broken_tensor.action_request.observation.fields["tcp_pose"].data = b"\x00" * 3
    cases.append((broken_tensor, pb.ERROR_INVALID_ARGUMENT, "action_request.observation.fields[tcp_pose]", "3 bytes"))
    wrong_type = pb.Envelope(protocol_version=PROTOCOL_VERSION)
    wrong_type.step.SetInParent()
    cases.append((wrong_type, pb.ERROR_UNEXPECTED_MESSAGE, "", "'step'"))

    with serving(directory, max_message_bytes=16 * 1024) as server:
        raw = RpcClient(server.address)
        try:
            with pytest.raises(RemoteError, match="send a policy_handshake first") as refused:
                raw.call(action_envelope(good), 2000)
            assert refused.value.code == pb.ERROR_NOT_CONTROLLER
            raw.call(handshake_envelope(spaces), 2000)
            for envelope, code, field, words in cases:
                with pytest.raises(RemoteError) as error:
                    raw.call(envelope, 2000)
                assert (error.value.code, error.value.field) == (code, field), error.value
                assert words in str(error.value), error.value
            # Frames that cannot be parsed get an error with request id 0 (theirs is unknown).
            raw.send_raw(b"\xff\x00 not a protobuf")
            assert pb.Envelope.FromString(raw.recv_raw(2000)).error.code == pb.ERROR_MALFORMED
            raw.send_raw(action_envelope(good, instruction="y" * 40_000).SerializeToString())
            too_large = pb.Envelope.FromString(raw.recv_raw(2000)).error
            assert too_large.code == pb.ERROR_TOO_LARGE and "exceeds the limit of 16384 bytes" in too_large.message
            reply = raw.call(action_envelope(good, deterministic=True), 2000)  # still serving
            assert tuple(reply.action_reply.actions.shape) == (1, 4)
        finally:
            raw.close()
        assert server.stats.errors["ERROR_INVALID_ARGUMENT"] == len(cases) - 1
        assert server.policy.calls == [1]  # type: ignore[attr-defined]  # no bad request reached the policy


def test_a_failing_or_nan_policy_gets_an_error_reply_and_the_actor_holds(tmp_path: Path, spaces: RobotSpaces) -> None:
    directory = save_linear_policy(tmp_path / "linear", spaces)
    with serving(directory) as server, client(server.address, spaces) as remote:
        policy: LinearPolicy = server.policy  # type: ignore[assignment]
        policy.fail_with = RuntimeError("CUDA out of memory")
        np.testing.assert_array_equal(remote.act(observation(spaces, 0)), [0, 0, 0, -1])
        with pytest.raises(PolicyServerRefused, match="CUDA out of memory"):
            remote.sample(observation(spaces, 0, batch=2), 1)
        policy.fail_with, policy.nan_output = None, True
        np.testing.assert_array_equal(remote.act(observation(spaces, 0)), [0, 0, 0, -1])
        policy.nan_output = False
        assert np.any(remote.act(observation(spaces, 0)) != [0, 0, 0, -1])
        assert remote.stats.holds == {"server_error": 2}
        assert server.stats.errors["ERROR_INTERNAL"] == 3


# --- deadlines, late replies, restarts ----------------------------------------------------------------

def test_a_reply_past_the_deadline_yields_the_hold_action_and_is_discarded_when_it_comes(
        tmp_path: Path, spaces: RobotSpaces) -> None:
    directory = save_linear_policy(tmp_path / "linear", spaces)
    with serving(directory) as server, client(server.address, spaces, timeout_ms=150) as remote:
        policy: LinearPolicy = server.policy  # type: ignore[assignment]
        remote.note_executed(np.array([0.2, 0.1, 0.0, 1.0], np.float32))  # the gripper was closed
        previous = remote.act(observation(spaces, 5), deterministic=True)
        policy.delay_s = 0.6
        started = time.monotonic()
        held = remote.act(observation(spaces, 6), deterministic=True)
        assert time.monotonic() - started < 0.5, "act waited past its deadline"
        np.testing.assert_array_equal(held, [0, 0, 0, 1])  # zero motion, gripper kept closed
        assert not np.array_equal(held, previous), "never the previous action"
        assert remote.stats.holds == {"timeout": 1} and remote.stats.holding
        policy.delay_s = 0.0
        wait_until(lambda: server.stats.replies == 2)  # the late reply is on its way to the client
        fresh = observation(spaces, 7)
        action = remote.act(fresh, deterministic=True)
        expected = local_actions(directory, {k: v[None] for k, v in fresh.items()})[0, 0]
        np.testing.assert_allclose(action, expected, rtol=0, atol=1e-6)  # not the late reply's action
        assert remote.stats.late_replies == 1 and not remote.stats.holding
        assert server.stats.late_replies == 1


def test_a_backlog_of_requests_from_one_client_costs_one_sample(tmp_path: Path, spaces: RobotSpaces) -> None:
    directory = save_linear_policy(tmp_path / "linear", spaces)
    with serving(directory) as server, client(server.address, spaces, timeout_ms=100) as remote:
        policy: LinearPolicy = server.policy  # type: ignore[assignment]
        policy.delay_s = 1.0  # the server stalls on the first request...
        for seed in range(3):  # ...while the actor gives up on three in a row
            np.testing.assert_array_equal(remote.act(observation(spaces, seed)), [0, 0, 0, -1])
        policy.delay_s = 0.0
        wait_until(lambda: server.stats.replies == 2)
        assert policy.calls == [1, 1] and server.stats.superseded == 1  # the second request was never sampled
        assert remote.stats.holds == {"timeout": 3}


def test_a_restarted_server_is_reconnected_by_itself(tmp_path: Path, spaces: RobotSpaces) -> None:
    directory = save_linear_policy(tmp_path / "linear", spaces)
    address = free_tcp_address()
    with client(address, spaces, timeout_ms=150, connect=False) as remote:
        with serving(directory, address=address):
            remote.connect(TIMEOUT_S)
            assert np.any(remote.act(observation(spaces, 0)) != [0, 0, 0, -1])
        np.testing.assert_array_equal(remote.act(observation(spaces, 0)), [0, 0, 0, -1])  # server gone: hold
        assert sum(remote.stats.holds.values()) == 1
        assert set(remote.stats.holds) <= {"disconnected", "timeout"}
        with serving(directory, address=address) as restarted:
            wait_until(lambda: np.any(remote.act(observation(spaces, 1), deterministic=True) != [0, 0, 0, -1]))
            assert remote.stats.handshakes == 2 and not remote.stats.holding
            assert remote.server.session_id == restarted.session_id


# --- handshake ----------------------------------------------------------------------------------------

def _respec(spaces: RobotSpaces, name: str, spec: FieldSpec | None) -> RobotSpaces:
    fields = dict(spaces.observation)
    if spec is None:
        del fields[name]
    else:
        fields[name] = spec
    return RobotSpaces(observation=fields, action=spaces.action)


def test_handshake_mismatch_is_refused_saying_what_differs(tmp_path: Path, spaces: RobotSpaces) -> None:
    directory = save_linear_policy(tmp_path / "linear", spaces)
    longer_pose = _respec(spaces, "tcp_pose", FieldSpec("float32", (8,), -2.0, 2.0))
    no_velocity = _respec(spaces, "tcp_velocity", None)
    with_yaw = RobotSpaces(observation=spaces.observation, action=FieldSpec("float32", (5,), -1.0, 1.0))
    with serving(directory) as server:
        expectations = [
            (dict(spaces=longer_pose), ["observation field 'tcp_pose'", "client float32(8,)", "policy float32(7,)"]),
            (dict(spaces=no_velocity), ["observation field 'tcp_velocity': missing on client"]),
            (dict(spaces=with_yaw), ["action: client float32(5,)", "policy float32(4,)"]),
            (dict(spaces=spaces, policy_kind="openvla"),
             ["expects a 'openvla' policy", "'linear' of kind 'test_linear'"]),
        ]
        for arguments, words in expectations:
            arguments = dict(arguments)
            with pytest.raises(PolicyServerIncompatible) as refused:
                with client(server.address, arguments.pop("spaces"), **arguments):
                    pass
            for word in words:
                assert word in str(refused.value), refused.value
        raw = RpcClient(server.address)
        try:
            old = handshake_envelope(spaces)
            old.policy_handshake.protocol_version = 99
            with pytest.raises(RemoteError, match="client protocol version 99, server 1"):
                raw.call(old, 2000)
        finally:
            raw.close()
        # A client that offers more fields than the policy takes is accepted and told what to send.
        extra = _respec(spaces, "task/goal_xyz", FieldSpec("float32", (3,), -2.0, 2.0))
        with client(server.address, extra) as remote:
            assert sorted(remote.server.spaces.observation) == sorted(KEYS)
            assert np.any(remote.act(dict(observation(extra, 0))) != [0, 0, 0, -1])


def test_curve_keys_admit_only_authorised_actors(tmp_path: Path, spaces: RobotSpaces) -> None:
    directory = save_linear_policy(tmp_path / "linear", spaces)
    server_public, server_secret = generate_keypair(tmp_path / "server", "policy-server")
    authorised = tmp_path / "authorised"
    actor_public, actor_secret = generate_keypair(authorised, "actor")
    _, stranger_secret = generate_keypair(tmp_path / "stranger", "stranger")
    curve = CurveServerKeys(secret_key_file=str(server_secret), authorized_keys_dir=str(authorised))
    with serving(directory, curve=curve) as server:
        with client(server.address, spaces, curve=CurveClientKeys(str(actor_secret), str(server_public))) as remote:
            assert np.any(remote.act(observation(spaces, 0)) != [0, 0, 0, -1])
        with client(server.address, spaces, timeout_ms=200, connect=False,
                    curve=CurveClientKeys(str(stranger_secret), str(server_public))) as stranger:
            np.testing.assert_array_equal(stranger.act(observation(spaces, 0)), [0, 0, 0, -1])
            assert not stranger.connected


def test_binding_beyond_loopback_needs_curve_keys(tmp_path: Path, spaces: RobotSpaces, capsys) -> None:
    with pytest.raises(ValueError, match="binds beyond loopback"):
        PolicyServerConfig(address="tcp://0.0.0.0:5570").validate()
    directory = save_linear_policy(tmp_path / "linear", spaces)
    assert steerl_main(["policy-server", "--policy", str(directory), "--address", "tcp://0.0.0.0:5999"]) == 2
    assert "learner.policy_server: address 'tcp://0.0.0.0:5999' binds beyond loopback" in capsys.readouterr().err
    assert steerl_main(["policy-server", "--policy", str(tmp_path / "nothing")]) == 2
    assert "policy.json: missing" in capsys.readouterr().err


# --- the actor ----------------------------------------------------------------------------------------

def test_hold_action_is_zero_motion_with_the_last_executed_gripper_command() -> None:
    hold = HoldAction(5)
    np.testing.assert_array_equal(hold(), [0, 0, 0, 0, -1])
    hold.note_executed(np.array([0.3, -0.2, 0.1, 0.5, 0.7], np.float32))
    np.testing.assert_array_equal(hold(), np.array([0, 0, 0, 0, 0.7], np.float32))
    hold.note_executed(np.array([0.0, 0.0, 0.0, 0.0, np.nan]))  # never a non-finite command
    assert hold.gripper == pytest.approx(0.7)
    hold.begin_episode()
    assert hold.gripper == -1.0


class Recorder(gym.Wrapper):
    """Records every executed action and the TCP position after it; ``after_step(n)`` runs after
    the n-th step (1-based, counted over the whole test)."""

    def __init__(self, env: gym.Env, after_step) -> None:
        super().__init__(env)
        self.after_step = after_step
        self.actions: list[np.ndarray] = []
        self.tcp: list[np.ndarray] = []
        self.reset_tcp: list[np.ndarray] = []

    def reset(self, **kwargs):
        result = self.env.reset(**kwargs)
        self.reset_tcp.append(result[0]["tcp_pose"][:3].copy())
        return result

    def step(self, action):
        result = self.env.step(action)
        self.actions.append(np.asarray(action, np.float32).copy())
        self.tcp.append(result[0]["tcp_pose"][:3].copy())
        self.after_step(len(self.actions))
        return result


def test_the_actor_moves_with_a_remote_policy_and_holds_while_the_server_is_stopped(
        tmp_path: Path, spaces: RobotSpaces) -> None:
    """Episode 1: the server answers for 4 steps (move +x, close the gripper), then stops; the actor
    holds in place with the gripper closed. Episode 2: no server: held at the reset pose, gripper
    open. Episode 3: a restarted server: the arm moves again."""
    steps = 10
    config = env_config(max_episode_steps=steps)
    config = dataclasses.replace(config, actor=dataclasses.replace(
        config.actor, policy_server=dataclasses.replace(config.actor.policy_server, address=free_tcp_address(),
                                                        timeout_ms=100, connect_timeout_ms=10_000)))
    directory = save_linear_policy(tmp_path / "reach", spaces, bias=(0.5, 0.0, 0.0, 3.0))
    policy_action = np.tanh(np.array([0.5, 0.0, 0.0, 3.0], np.float32))  # +x, gripper (almost) closed
    address = config.actor.policy_server.address
    first_server = ServerThread(directory, address=address)
    env = Recorder(make_env(config), after_step=lambda n: n == 4 and first_server.stop())
    remote = connect_remote_policy(config.actor.policy_server, spaces, client_name="test-actor")
    try:
        loop = ActingLoop(config, env, None, KEYS)
        loop.policy = remote
        assert loop.run_episode(deterministic=True)[1] == steps  # the loop ran every step, held or not
        actions, tcp = np.array(env.actions), np.array(env.tcp)
        np.testing.assert_allclose(actions[:4], np.repeat(policy_action[None], 4, 0), atol=1e-6)
        assert tcp[3, 0] - env.reset_tcp[0][0] == pytest.approx(4 * policy_action[0] * 0.03, abs=1e-5)
        hold = np.array([0, 0, 0, policy_action[3]], np.float32)  # zero motion, the gripper stays closed
        np.testing.assert_array_equal(actions[4:], np.repeat(hold[None], steps - 4, 0))
        np.testing.assert_allclose(tcp[4:], np.repeat(tcp[3:4], steps - 4, 0), atol=1e-9)  # the TCP did not move

        loop.run_episode(deterministic=True)  # no server at all
        np.testing.assert_array_equal(np.array(env.actions[steps:]), np.repeat([[0, 0, 0, -1]], steps, 0))
        np.testing.assert_allclose(np.array(env.tcp[steps:]), np.repeat(env.reset_tcp[1][None], steps, 0), atol=1e-9)
        assert sum(remote.stats.holds.values()) == 2 * steps - 4
        assert set(remote.stats.holds) <= {HoldReason.DISCONNECTED.value, HoldReason.TIMEOUT.value}

        with serving(directory, address=address):
            loop.run_episode(deterministic=True)
        moved = np.array(env.tcp[2 * steps:])[:, 0] - env.reset_tcp[2][0]
        assert moved[-1] > 0.1, "the arm moves again once the server is back"
        assert remote.stats.handshakes == 2
    finally:
        remote.close()
        env.close()
        first_server.stop()


def test_policy_source_remote_config_round_trips(tmp_path: Path) -> None:
    config = env_config()
    loaded = load_config(save_config(config, tmp_path / "remote.yaml"))
    assert loaded.actor.policy_source == "remote" and loaded.actor.policy_server == config.actor.policy_server
    assert loaded.learner.policy_server == PolicyServerConfig()


def test_run_actor_with_policy_source_remote_acts_through_the_server_and_ships_to_the_learner(
        tmp_path: Path, spaces: RobotSpaces) -> None:
    """The wiring of ``steerl actor`` / ``steerl train``: run_actor connects the remote policy, the
    learner link only ships transitions, and the actions executed are the server's."""
    import io

    from rich.console import Console

    from learner.service import LearnerService
    from tools.session import run_actor

    config = env_config(max_episode_steps=10)
    config = dataclasses.replace(
        config, learner=dataclasses.replace(config.learner, address=free_tcp_address()),
        actor=dataclasses.replace(config.actor, eval_episodes=0, policy_server=dataclasses.replace(
            config.actor.policy_server, address=free_tcp_address(), timeout_ms=2000, connect_timeout_ms=10_000)))
    stored: list[np.ndarray] = []
    service = LearnerService(config.learner.address, None, lambda _, transition: stored.append(transition["action"]))
    stop = threading.Event()

    def serve_learner() -> None:
        while not stop.is_set():
            service.poll(timeout_ms=10)

    learner_thread = threading.Thread(target=serve_learner, daemon=True)
    learner_thread.start()
    directory = save_linear_policy(tmp_path / "reach", spaces, bias=(0.5, 0.0, 0.0, 3.0))
    output = io.StringIO()
    env = make_env(config)
    try:
        with serving(directory, address=config.actor.policy_server.address) as server:
            stats = run_actor(config, env, total_steps=20, actor_id="actor-remote", console=Console(file=output))
            assert server.stats.replies >= 20
    finally:
        env.close()
        stop.set()
        learner_thread.join(TIMEOUT_S)
        service.close()
    assert stats.env_steps >= 20 and len(stored) >= 20
    policy_action = np.tanh(np.array([0.5, 0.0, 0.0, 3.0], np.float32))
    assert np.all(np.abs(np.array(stored) - policy_action) < 0.6)  # the server's (stochastic) actions
    assert "policy: reach (test_linear) served at" in output.getvalue()
