"""The wire schema and codec: round trips, validation of untrusted tensors, generated code current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transport import steerl_pb2 as pb
from transport.codec import (
    ProtocolError,
    decode_observation,
    decode_tensor,
    encode_observation,
    encode_tensor,
    parse_envelope,
    spaces_from_pb,
    spaces_to_pb,
)
from transport.spaces import FieldSpec, RobotSpaces

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", ["uint8", "int32", "int64", "float32", "float64", "bool"])
def test_tensor_round_trip(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    decoded = decode_tensor(encode_tensor(array), "t")
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_non_contiguous_arrays_are_sent_in_c_order() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    np.testing.assert_array_equal(decode_tensor(encode_tensor(array), "t"), array)


def test_tensor_with_wrong_byte_count_names_the_field() -> None:
    tensor = pb.Tensor(dtype="float32", shape=[4], data=b"\x00" * 12)
    with pytest.raises(ProtocolError, match=r"step.action: 12 bytes do not hold a float32 tensor of shape \(4,\)") as error:
        decode_tensor(tensor, "step.action")
    assert error.value.code == pb.ERROR_INVALID_ARGUMENT and error.value.field == "step.action"


@pytest.mark.parametrize("dtype", ["object", "float16", "", "<f8"])
def test_tensor_with_unknown_dtype_is_refused(dtype: str) -> None:
    with pytest.raises(ProtocolError, match="dtype"):
        decode_tensor(pb.Tensor(dtype=dtype, shape=[1], data=b"\x00" * 8), "x")


def test_tensor_with_negative_shape_is_refused() -> None:
    with pytest.raises(ProtocolError, match="invalid shape"):
        decode_tensor(pb.Tensor(dtype="uint8", shape=[-1], data=b""), "x")


def test_observation_round_trip_keeps_every_field() -> None:
    fields = {"tcp_pose": np.arange(7, dtype=np.float32), "images/front": np.full((8, 8, 3), 7, np.uint8)}
    message = encode_observation(fields, stamp_s=12.5)
    decoded = decode_observation(pb.Observation.FromString(message.SerializeToString()))
    assert set(decoded) == set(fields)
    for key in fields:
        np.testing.assert_array_equal(decoded[key], fields[key])


def test_spaces_round_trip_and_hash() -> None:
    spaces = RobotSpaces(
        observation={"a": FieldSpec("float32", (3,), (-1.0, -2.0, -3.0), 1.0),
                     "images/x": FieldSpec("uint8", (4, 4, 3), 0, 255)},
        action=FieldSpec("float32", (4,), -1.0, 1.0),
    )
    again = spaces_from_pb(pb.Spaces.FromString(spaces_to_pb(spaces).SerializeToString()))
    assert again.digest() == spaces.digest()
    other = RobotSpaces(observation=spaces.observation, action=FieldSpec("float32", (5,), -1.0, 1.0))
    assert other.digest() != spaces.digest()
    box = again.observation_space()["a"]
    np.testing.assert_array_equal(box.low, [-1, -2, -3])


def test_spaces_differences_name_every_field_that_differs() -> None:
    ours = RobotSpaces(observation={"a": FieldSpec("float32", (3,), (-1.0, -2.0, -3.0), 1.0),
                                    "b": FieldSpec("uint8", (4, 4, 3), 0, 255),
                                    "extra": FieldSpec("float32", (1,), 0.0, 1.0)},
                       action=FieldSpec("float32", (4,), -1.0, 1.0))
    theirs = RobotSpaces(observation={"a": FieldSpec("float32", (3,), (-1.0, -3.0, -2.0), 1.0),
                                      "b": FieldSpec("uint8", (8, 8, 3), 0, 255),
                                      "c": FieldSpec("int64", (), 0, 9)},
                         action=FieldSpec("float32", (5,), -1.0, 1.0))
    assert ours.differences(ours) == []
    assert ours.differences(theirs, "client", "server") == [
        "observation field 'a': element-wise bounds differ (both float32(3,) in [-3..-1, 1])",
        "observation field 'b': client uint8(4, 4, 3) in [0, 255], server uint8(8, 8, 3) in [0, 255]",
        "observation field 'c': missing on client (server has int64() in [0, 9])",
        "observation field 'extra': only client has it",
        "action: client float32(4,) in [-1, 1], server float32(5,) in [-1, 1]",
    ]
    assert not any("extra" in line for line in ours.differences(theirs, extra_fields_differ=False))


def test_parse_envelope_refuses_garbage_oversize_and_empty() -> None:
    with pytest.raises(ProtocolError) as error:
        parse_envelope(b"\xff\xff\xff\xff\xff", max_bytes=1024)
    assert error.value.code == pb.ERROR_MALFORMED
    with pytest.raises(ProtocolError) as error:
        parse_envelope(b"\x00" * 2048, max_bytes=1024)
    assert error.value.code == pb.ERROR_TOO_LARGE and "2048 bytes exceeds the limit of 1024" in str(error.value)
    with pytest.raises(ProtocolError, match="no body"):
        parse_envelope(pb.Envelope(protocol_version=1).SerializeToString(), max_bytes=1024)


def test_generated_module_matches_the_schema(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'transport'}", f"--python_out={tmp_path}",
         str(REPO / "transport" / "steerl.proto")],
        check=True,
    )
    regenerated = (tmp_path / "steerl_pb2.py").read_text()
    assert regenerated == (REPO / "transport" / "steerl_pb2.py").read_text(), "run `make proto`"


def test_answer_request_checks_every_request_and_never_raises() -> None:
    import zmq

    from transport.codec import PROTOCOL_VERSION
    from transport.zmq_link import answer_request, bind_server

    context = zmq.Context()
    server, _ = bind_server(context, "tcp://127.0.0.1:0", 1 << 16)
    client = context.socket(zmq.DEALER)
    client.connect(server.getsockopt_string(zmq.LAST_ENDPOINT))
    handled: list[str] = []

    def handle(identity: bytes, envelope: pb.Envelope) -> pb.Envelope | None:
        handled.append(envelope.WhichOneof("body"))
        if envelope.request_id == 4:
            raise RuntimeError("camera unplugged")
        if envelope.request_id == 5:
            return None  # answered later
        reply = pb.Envelope(request_id=envelope.request_id)
        reply.goodbye_reply.SetInParent()
        return reply

    def envelope(request_id: int, version: int = PROTOCOL_VERSION, body: str = "goodbye") -> bytes:
        message = pb.Envelope(protocol_version=version, request_id=request_id)
        getattr(message, body).SetInParent()
        return message.SerializeToString()

    def ask(*frames: bytes, **options) -> pb.Envelope | None:
        client.send_multipart(list(frames))
        assert server.poll(5000)
        _, reply = answer_request(server, 1 << 16, handle, server="test server", accepts=("goodbye",), **options)
        return reply

    try:
        reply = ask(envelope(1))
        assert reply.WhichOneof("body") == "goodbye_reply" and reply.protocol_version == PROTOCOL_VERSION
        assert ask(envelope(2), b"extra").error.code == pb.ERROR_MALFORMED
        assert ask(b"\xff\x00 not protobuf").error.code == pb.ERROR_MALFORMED
        wrong_version = ask(envelope(3, version=PROTOCOL_VERSION + 1))
        assert wrong_version.error.code == pb.ERROR_PROTOCOL_VERSION and wrong_version.request_id == 3
        assert "this test server speaks" in wrong_version.error.message
        wrong_type = ask(envelope(3, body="hold"))
        assert wrong_type.error.code == pb.ERROR_UNEXPECTED_MESSAGE and "a test server accepts goodbye" in wrong_type.error.message
        failed = ask(envelope(4))
        assert failed.error.code == pb.ERROR_INTERNAL and "camera unplugged" in failed.error.message
        seen: list[str] = []
        custom = ask(envelope(4), internal_error=lambda error, client: seen.append(client) or ProtocolError(
            pb.ERROR_INTERNAL, f"held: {error}"))
        assert custom.error.message == "held: camera unplugged" and seen and seen[0].startswith("client ")
        assert ask(envelope(5)) is None
        assert handled == ["goodbye", "goodbye", "goodbye", "goodbye"]  # only well-formed, accepted requests
    finally:
        client.close(0)
        server.close(0)
        context.term()
