"""Observation/action field specs shared by the robot server, the env client and the learner.

A robot's spaces are a flat mapping of named Box fields (``tcp_pose``, ``images/front``...). The
server announces them in the handshake; the client builds its gymnasium spaces from them, and both
sides compare a hash of them so that a mismatch is refused before any motion.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
from gymnasium import spaces

ALLOWED_DTYPES = ("uint8", "int32", "int64", "float32", "float64", "bool")


@dataclass(frozen=True)
class FieldSpec:
    """A Box-shaped field: dtype, shape and elementwise bounds (scalars broadcast)."""

    dtype: str
    shape: tuple[int, ...]
    low: float | tuple[float, ...]
    high: float | tuple[float, ...]

    def __post_init__(self) -> None:
        if self.dtype not in ALLOWED_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {ALLOWED_DTYPES}")

    def to_box(self) -> spaces.Box:
        shape = tuple(self.shape)
        low = np.broadcast_to(np.asarray(self.low, dtype=self.dtype), shape).copy()
        high = np.broadcast_to(np.asarray(self.high, dtype=self.dtype), shape).copy()
        return spaces.Box(low=low, high=high, shape=shape, dtype=np.dtype(self.dtype))

    def describe(self) -> str:
        """``float32(7,) in [-1, 1]``: dtype, shape and the bounds (the range of them when they vary)."""
        def span(bound: float | tuple[float, ...]) -> str:
            values = np.atleast_1d(bound).astype(np.float64)
            low, high = float(values.min()), float(values.max())
            return f"{low:g}" if low == high else f"{low:g}..{high:g}"

        return f"{self.dtype}{tuple(self.shape)} in [{span(self.low)}, {span(self.high)}]"

    def canonical(self) -> dict:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "low": [float(v) for v in np.atleast_1d(self.low)],
            "high": [float(v) for v in np.atleast_1d(self.high)],
        }


def _contrast(ours: FieldSpec, theirs: FieldSpec, mine: str, their_name: str) -> str:
    """How two unequal specs differ, in words."""
    a, b = ours.describe(), theirs.describe()
    return f"{mine} {a}, {their_name} {b}" if a != b else f"element-wise bounds differ (both {a})"


@dataclass(frozen=True)
class RobotSpaces:
    """The observation fields and the action field of a robot cell."""

    observation: dict[str, FieldSpec]
    action: FieldSpec

    @classmethod
    def from_gym(cls, observation_space: spaces.Dict, action_space: spaces.Box) -> "RobotSpaces":
        """Specs of a gymnasium Dict-of-Box observation space and Box action space."""

        def spec(box: spaces.Box) -> FieldSpec:
            low, high = box.low.astype(np.float64).ravel(), box.high.astype(np.float64).ravel()
            uniform = low.min() == low.max() and high.min() == high.max()
            return FieldSpec(box.dtype.name, tuple(box.shape), float(low[0]) if uniform else tuple(map(float, low)),
                             float(high[0]) if uniform else tuple(map(float, high)))

        return cls(observation={k: spec(v) for k, v in observation_space.spaces.items()}, action=spec(action_space))

    def select(self, keys: tuple[str, ...] | list[str]) -> "RobotSpaces":
        """The same spaces with only the observation fields in ``keys`` (all when empty)."""
        if not keys:
            return self
        missing = [key for key in keys if key not in self.observation]
        if missing:
            raise KeyError(f"observation fields {missing} are not served by this robot "
                           f"(it has: {', '.join(sorted(self.observation))})")
        return RobotSpaces(observation={key: self.observation[key] for key in keys}, action=self.action)

    def to_json(self) -> dict:
        return {"observation": {k: v.canonical() for k, v in self.observation.items()},
                "action": self.action.canonical()}

    @classmethod
    def from_json(cls, data: dict) -> "RobotSpaces":
        def spec(entry: dict) -> FieldSpec:
            low, high = entry["low"], entry["high"]
            return FieldSpec(entry["dtype"], tuple(entry["shape"]),
                             low[0] if len(low) == 1 else tuple(low), high[0] if len(high) == 1 else tuple(high))

        return cls(observation={k: spec(v) for k, v in data["observation"].items()}, action=spec(data["action"]))

    def observation_space(self) -> spaces.Dict:
        return spaces.Dict({name: spec.to_box() for name, spec in sorted(self.observation.items())})

    def action_space(self) -> spaces.Box:
        return self.action.to_box()

    def differences(self, other: "RobotSpaces", mine: str = "this side", theirs: str = "the other side",
                    extra_fields_differ: bool = True) -> list[str]:
        """What differs between these spaces and ``other``, one readable line per field, e.g.
        ``"observation field 'tcp_pose': this side float32(7,), the other side float32(8,)"``;
        empty when they are equal. With ``extra_fields_differ=False``, fields that only ``self`` has
        are not differences (a client may offer more fields than a server needs)."""
        lines = []
        names = sorted(set(self.observation) | set(other.observation))
        for name in names:
            ours, their = self.observation.get(name), other.observation.get(name)
            if their is None:
                if extra_fields_differ:
                    lines.append(f"observation field {name!r}: only {mine} has it")
            elif ours is None:
                lines.append(f"observation field {name!r}: missing on {mine} ({theirs} has {their.describe()})")
            elif ours.canonical() != their.canonical():
                lines.append(f"observation field {name!r}: {_contrast(ours, their, mine, theirs)}")
        if self.action.canonical() != other.action.canonical():
            lines.append(f"action: {_contrast(self.action, other.action, mine, theirs)}")
        return lines

    def digest(self) -> str:
        """A stable hash of the spaces; equal on both ends of a compatible link."""
        canonical = {
            "observation": {k: v.canonical() for k, v in sorted(self.observation.items())},
            "action": self.action.canonical(),
        }
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
