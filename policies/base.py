"""The one interface every policy class implements: K action samples for a batch of observations.

A *policy* maps a batch of observations to actions in the robot's normalised action space
(``Box(-1, 1, (A,))``, the space the robot server's action config scales). Everything that
consumes policies (the actor, the policy server, V-GPS re-ranking, PA-RL) goes through
:class:`Policy` only:

``sample(observations, num_samples, deterministic=False) -> Tensor [B, K, A]``
    ``observations`` is a mapping from observation key to a batch (numpy arrays or tensors with
    a leading batch dimension ``B``; images uint8 ``[B, H, W, C]``; a language instruction, where a
    policy takes one, is a key holding a sequence of ``B`` strings). The result lives on the
    policy's device. ``deterministic=True`` returns the policy's single best guess for every one of
    the ``K`` slots (the mean for a Gaussian, DDIM from zero noise for a diffusion policy, greedy
    decoding for a VLA), so callers never need a second code path.
``act(observation, deterministic=False) -> np.ndarray [A]``
    One unbatched observation -> one float32 action; a convenience over :meth:`Policy.sample`.
``to(device)``
    Moves the policy; returns it.
``save(directory)`` / ``load_policy(directory)``
    A policy directory holds ``policy.json`` (``{"kind": ..., ...}``) and whatever weights the kind
    needs (safetensors, never pickle). :func:`load_policy` dispatches on ``kind`` through the
    registry that :func:`register_policy` fills.

Helpers shared by the kinds: :func:`observations_to_tensors` (numpy or tensor fields -> tensors on
a device), :func:`save_module_weights` / :func:`load_module_weights` (an ``nn.Module``'s state
as ``model.safetensors``, loaded strictly with errors that name the file) and
:class:`SeededGenerators` (reproducible random draws on whatever device a policy moves to).
"""

from __future__ import annotations

import abc
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar, Union

import numpy as np
import safetensors
import safetensors.torch
from safetensors.torch import load as load_safetensors
import torch
from torch import nn

PolicyInput = Mapping[str, Union[np.ndarray, torch.Tensor, Sequence[str]]]
POLICY_FILE = "policy.json"
WEIGHTS_FILE = "model.safetensors"

_REGISTRY: dict[str, type["Policy"]] = {}
P = TypeVar("P", bound=type["Policy"])


class SeededGenerators:
    """One ``torch.Generator`` per device, seeded with ``seed`` when first asked for: a policy's random
    draws repeat from its seed on whichever device it runs, and never touch torch's global stream.

    ``generators(device) -> torch.Generator``.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._by_device: dict[torch.device, torch.Generator] = {}

    def __call__(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        if device not in self._by_device:
            self._by_device[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._by_device[device]


class Policy(abc.ABC):
    """Base class of every policy (see the module docstring)."""

    #: the ``kind`` written to ``policy.json``; set by :func:`register_policy`.
    kind: ClassVar[str] = ""
    #: dimension ``A`` of the normalised action space.
    action_dim: int

    @abc.abstractmethod
    def sample(self, observations: PolicyInput, num_samples: int, deterministic: bool = False) -> torch.Tensor:
        """``num_samples`` actions per observation, ``[B, K, A]`` in ``[-1, 1]`` on :attr:`device`."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where the policy's weights (and the samples it returns) live."""

    @abc.abstractmethod
    def to(self, device: torch.device | str) -> "Policy":
        """Move the policy to ``device``; returns ``self``."""

    @abc.abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write ``policy.json`` and the weights into ``directory`` (created if missing)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "Policy":
        """Rebuild a policy that :meth:`save` wrote into ``directory``."""

    def act(self, observation: PolicyInput, deterministic: bool = False) -> np.ndarray:
        """One unbatched observation -> one float32 action ``[A]``."""
        batched = {key: batch_of_one(value) for key, value in observation.items()}
        with torch.inference_mode():
            action = self.sample(batched, 1, deterministic=deterministic)[0, 0]
        return action.float().cpu().numpy()


class SteeredPolicy(Policy):
    """A base policy whose samples a critic chooses among (V-GPS, PA-RL's acting policy): the
    two live on the base policy's device and move together. Subclasses set ``base`` and ``critic``."""

    base: Policy
    critic: Any

    @property
    def device(self) -> torch.device:
        return self.base.device

    def to(self, device: torch.device | str) -> "SteeredPolicy":
        self.base.to(device)
        self.critic.to(device)
        return self


def batch_of_one(value: Any) -> Any:
    """Add a leading batch dimension of one to an array, a tensor or a string."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, torch.Tensor):
        return value.unsqueeze(0)
    return np.asarray(value)[None]


def observations_to_tensors(
    observations: PolicyInput, keys: Sequence[str], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """The fields ``keys`` of a batch (numpy arrays or tensors) as tensors on ``device``, dtypes kept
    (uint8 images stay uint8); a missing field is a ``KeyError`` naming it and the fields present."""
    missing = [key for key in keys if key not in observations]
    if missing:
        raise KeyError(f"observation fields {missing} are missing (got: {', '.join(sorted(observations))})")
    tensors = {}
    for key in keys:
        value = observations[key]
        if not isinstance(value, torch.Tensor):
            array = np.asarray(value)
            # A read-only array (e.g. a view of a received message) cannot back a tensor: copy it.
            value = torch.from_numpy(array if array.flags.writeable else array.copy())
        tensors[key] = value.to(device, non_blocking=True)
    return tensors


def save_module_weights(module: nn.Module, directory: str | Path) -> Path:
    """Write ``module.state_dict()`` (CPU, contiguous) as ``directory/model.safetensors``."""
    path = Path(directory) / WEIGHTS_FILE
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in module.state_dict().items()}
    safetensors.torch.save_file(state, str(path))
    return path


def load_module_weights(module: nn.Module, directory: str | Path) -> None:
    """Load ``directory/model.safetensors`` into ``module`` strictly: missing, unexpected or
    differently shaped tensors (weights that do not belong to the policy ``policy.json`` describes)
    raise errors naming the file."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the policy's weights)")
    try:
        tensors = safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: the tensors do not match the policy described by {POLICY_FILE} "
                         f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    wrong = [f"{name} {tuple(tensors[name].shape)}, expected {tuple(tensor.shape)}"
             for name, tensor in expected.items() if tensors[name].shape != tensor.shape]
    if wrong:
        raise ValueError(f"{path}: tensor shapes do not match the policy described by {POLICY_FILE}: "
                         + "; ".join(wrong[:3]))
    module.load_state_dict(tensors, strict=True)


def register_policy(kind: str) -> Callable[[P], P]:
    """Class decorator: make ``kind`` loadable by :func:`load_policy`."""

    def decorate(cls: P) -> P:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"policy kind {kind!r} is already registered by {_REGISTRY[kind].__name__}")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return decorate


def write_policy_file(directory: str | Path, kind: str, **fields: Any) -> Path:
    """Create ``directory`` and write its ``policy.json`` (``kind`` plus JSON-safe ``fields``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / POLICY_FILE).write_text(json.dumps({"kind": kind, **fields}, indent=2, sort_keys=True))
    return directory


def read_policy_file(directory: str | Path) -> dict[str, Any]:
    """The parsed ``policy.json`` of ``directory``, with errors that name the file."""
    path = Path(directory) / POLICY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a policy directory written by Policy.save)")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(content, dict) or not isinstance(content.get("kind"), str):
        raise ValueError(f"{path}: needs a string field 'kind'")
    return content


POLICY_BUNDLE_FORMAT = "steerl-policy-directory/1"


def policy_to_bytes(policy: Policy) -> bytes:
    """A policy's whole directory (:meth:`Policy.save`) as one safetensors blob, every file a
    ``uint8`` tensor named by its relative path: any policy kind travels in a ``Weights`` message
    or a checkpoint file this way, with no pickle. :func:`policy_from_bytes` reverses it."""
    with tempfile.TemporaryDirectory(prefix="steerl-policy-") as tmp:
        policy.save(tmp)
        files = {}
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                content = path.read_bytes()
                files[path.relative_to(tmp).as_posix()] = (torch.frombuffer(bytearray(content), dtype=torch.uint8)
                                                           if content else torch.zeros(0, dtype=torch.uint8))
    return safetensors.torch.save(files, metadata={"format": POLICY_BUNDLE_FORMAT})


def policy_from_bytes(blob: bytes, device: torch.device | str = "cpu") -> Policy:
    """The policy :func:`policy_to_bytes` packed (any registered kind, via :func:`load_policy`)."""
    try:
        files = load_safetensors(blob)  # safetensors: tensors only, no code (not torch.load)
    except Exception as error:  # noqa: BLE001 - safetensors raises several kinds on a bad header
        raise ValueError(f"not a policy bundle: {error}") from None
    with tempfile.TemporaryDirectory(prefix="steerl-policy-") as tmp:
        root = Path(tmp).resolve()
        for name, tensor in files.items():
            target = (root / name).resolve()
            if root not in target.parents or tensor.dtype != torch.uint8 or tensor.dim() != 1:
                raise ValueError(f"policy bundle: {name!r} is not a file of the policy directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tensor.numpy().tobytes())
        return load_policy(root, device)


def load_policy(directory: str | Path, device: torch.device | str = "cpu") -> Policy:
    """Load any registered policy kind from a directory written by :meth:`Policy.save`."""
    _import_builtin_policies()
    kind = read_policy_file(directory)["kind"]
    if kind not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"{Path(directory) / POLICY_FILE}: unknown policy kind {kind!r} (known: {known})")
    return _REGISTRY[kind].load(Path(directory), device)


def _import_builtin_policies() -> None:
    """Import the modules that register the built-in kinds (they are imported lazily because the
    VLA adapter pulls in transformers)."""
    import importlib

    for module in ("policies.sac_policy", "policies.diffusion", "policies.openvla", "policies.vgps", "learner.parl"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
