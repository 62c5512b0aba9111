"""Conversions between numpy/Python values and the protobuf messages of transport/steerl.proto.

Decoding never trusts the peer: every tensor is checked for an allowed dtype and for a byte count
that matches its shape, and a bad one raises :class:`ProtocolError` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from google.protobuf.message import DecodeError

from transport import steerl_pb2 as pb
from transport.spaces import ALLOWED_DTYPES, FieldSpec, RobotSpaces

PROTOCOL_VERSION = 1
MAX_TENSOR_DIMS = 8


class ProtocolError(Exception):
    """A message that cannot be accepted; ``code`` is a ``steerl_pb2.ErrorCode``."""

    def __init__(self, code: int, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.field = field

    def to_pb(self) -> pb.Error:
        return pb.Error(code=self.code, message=str(self), field=self.field)

    def __str__(self) -> str:
        return self.args[0]


# dtype -> wire name and wire name -> dtype, looked up once: numpy's own attribute access costs
# microseconds per call, and a robot step encodes and decodes a dozen tensors.
_WIRE_NAMES = {np.dtype(name): name for name in ALLOWED_DTYPES}
_WIRE_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}


def encode_tensor(array: np.ndarray, out: pb.Tensor | None = None) -> pb.Tensor:
    """Fill ``out`` (or a new Tensor) with the array's dtype, shape and C-order bytes."""
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    name = _WIRE_NAMES.get(array.dtype)
    if name is None:
        raise ValueError(f"dtype {array.dtype} cannot travel; allowed: {ALLOWED_DTYPES}")
    tensor = pb.Tensor() if out is None else out
    tensor.dtype = name
    tensor.shape[:] = array.shape
    tensor.data = array.tobytes()
    return tensor


def decode_tensor(tensor: pb.Tensor, field: str) -> np.ndarray:
    """A read-only numpy view of the tensor's bytes, validated against its dtype and shape."""
    dtype = _WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ProtocolError(
            pb.ERROR_INVALID_ARGUMENT, f"{field}: dtype {tensor.dtype!r} is not one of {ALLOWED_DTYPES}", field
        )
    shape = tuple(tensor.shape)
    if len(shape) > MAX_TENSOR_DIMS or any(d < 0 for d in shape):
        raise ProtocolError(pb.ERROR_INVALID_ARGUMENT, f"{field}: invalid shape {shape}", field)
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ProtocolError(
            pb.ERROR_INVALID_ARGUMENT,
            f"{field}: {len(tensor.data)} bytes do not hold a {tensor.dtype} tensor of shape {shape} "
            f"({expected} bytes)",
            field,
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def encode_observation(
    fields: Mapping[str, np.ndarray], stamp_s: float, out: pb.Observation | None = None
) -> pb.Observation:
    observation = pb.Observation() if out is None else out
    observation.stamp_s = stamp_s
    for name, value in fields.items():
        encode_tensor(value, observation.fields[name])
    return observation


def decode_observation(observation: pb.Observation, field: str = "observation") -> dict[str, np.ndarray]:
    return {name: decode_tensor(t, f"{field}.fields[{name}]") for name, t in observation.fields.items()}


def _bounds_to_pb(bound: float | tuple[float, ...]) -> list[float]:
    return list(bound) if isinstance(bound, tuple) else [bound]


def _bounds_from_pb(values, field: str) -> float | tuple[float, ...]:
    if len(values) == 0:
        raise ProtocolError(pb.ERROR_MALFORMED, f"{field}: no bounds", field)
    return values[0] if len(values) == 1 else tuple(values)


def field_spec_to_pb(spec: FieldSpec) -> pb.FieldSpec:
    return pb.FieldSpec(
        dtype=spec.dtype, shape=list(spec.shape), low=_bounds_to_pb(spec.low), high=_bounds_to_pb(spec.high)
    )


def field_spec_from_pb(message: pb.FieldSpec, field: str) -> FieldSpec:
    try:
        return FieldSpec(
            dtype=message.dtype,
            shape=tuple(message.shape),
            low=_bounds_from_pb(message.low, f"{field}.low"),
            high=_bounds_from_pb(message.high, f"{field}.high"),
        )
    except ValueError as error:
        raise ProtocolError(pb.ERROR_MALFORMED, f"{field}: {error}", field) from None


def spaces_to_pb(robot_spaces: RobotSpaces) -> pb.Spaces:
    message = pb.Spaces(action=field_spec_to_pb(robot_spaces.action))
    for name, spec in robot_spaces.observation.items():
        message.observation[name].CopyFrom(field_spec_to_pb(spec))
    return message


def spaces_from_pb(message: pb.Spaces) -> RobotSpaces:
    return RobotSpaces(
        observation={k: field_spec_from_pb(v, f"spaces.observation[{k}]") for k, v in message.observation.items()},
        action=field_spec_from_pb(message.action, "spaces.action"),
    )


def parse_envelope(frame: bytes, max_bytes: int) -> pb.Envelope:
    """Parse one frame into an Envelope, refusing oversized, unparsable and body-less frames."""
    if len(frame) > max_bytes:
        raise ProtocolError(
            pb.ERROR_TOO_LARGE, f"message of {len(frame)} bytes exceeds the limit of {max_bytes} bytes"
        )
    envelope = pb.Envelope()
    try:
        envelope.ParseFromString(frame)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ProtocolError(pb.ERROR_MALFORMED, f"malformed message: not a steerl Envelope ({error})") from None
    if envelope.WhichOneof("body") is None:
        raise ProtocolError(pb.ERROR_MALFORMED, "malformed message: Envelope has no body")
    return envelope


def error_envelope(request_id: int, error: ProtocolError) -> pb.Envelope:
    return pb.Envelope(protocol_version=PROTOCOL_VERSION, request_id=request_id, error=error.to_pb())


def info_to_pb(info: Mapping[str, float], out) -> None:
    for key, value in info.items():
        out[key] = float(value)


def encode_transition(out: pb.Transition, episode: int, step: int, observation: Mapping[str, np.ndarray],
                      action: np.ndarray, reward: float, next_observation: Mapping[str, np.ndarray],
                      terminated: bool, truncated: bool, intervened: bool = False) -> pb.Transition:
    """Fill ``out`` with one executed step."""
    out.episode = episode
    out.step = step
    encode_observation(observation, 0.0, out.observation)
    encode_tensor(np.asarray(action, dtype=np.float32), out.action)
    out.reward = float(reward)
    encode_observation(next_observation, 0.0, out.next_observation)
    out.terminated = bool(terminated)
    out.truncated = bool(truncated)
    out.intervened = bool(intervened)
    return out


def decode_transition(message: pb.Transition) -> dict:
    """The step's arrays, flags and numbers (validated byte counts; shapes are the replay's to check)."""
    where = f"transition[{message.episode}:{message.step}]"
    return {
        "episode": message.episode,
        "step": message.step,
        "observation": decode_observation(message.observation, f"{where}.observation"),
        "action": decode_tensor(message.action, f"{where}.action"),
        "reward": message.reward,
        "next_observation": decode_observation(message.next_observation, f"{where}.next_observation"),
        "terminated": message.terminated,
        "truncated": message.truncated,
        "intervened": message.intervened,
    }
