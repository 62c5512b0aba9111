"""OpenVLA adapter: an OpenVLA checkpoint behind the :class:`~policies.base.Policy` interface.

The checkpoint is a local directory laid out like ``openvla/openvla-7b`` on the Hugging Face hub and
is loaded offline (``local_files_only``) through transformers' remote code (``trust_remote_code``:
the directory's ``*_prismatic.py`` files run in this process; load only checkpoints you trust).

Format and math (sources: repository ``openvla/openvla``, files
``prismatic/extern/hf/{configuration,modeling,processing}_prismatic.py`` (the remote code the hub
checkpoint ships), ``prismatic/vla/action_tokenizer.py``, ``prismatic/vla/datasets/datasets.py``,
``prismatic/vla/datasets/rlds/utils/data_utils.py``, ``experiments/robot/openvla_utils.py``,
``experiments/robot/robot_utils.py``; ``openvla/openvla-7b``'s ``config.json``)

Prompt
    ``"In: What action should the robot take to {instruction}?\\nOut:"`` with the instruction
    lower-cased (training lower-cases the dataset's instruction, ``RLDSBatchTransform``; evaluation
    does ``task_label.lower()``, ``get_vla_action``). The tokenizer adds ``<s>``; then the "empty"
    token 29871 (Llama 2's ``"▁"``, the space after ``"Out:"`` seen in training) is appended when the
    prompt does not already end with it (``OpenVLAForActionPrediction.predict_action``).
Image
    The checkpoint's processor turns each RGB image into ``pixel_values`` (openvla-7b: two towers,
    DINOv2 + SigLIP, 224 px, six channels); the model inserts the projected patch embeddings right
    after ``<s>`` (``PrismaticForConditionalGeneration.forward``). Fine-tunes trained with random
    crops want ``center_crop_scale=0.9``: keep the central ``sqrt(0.9)`` of each side and resize back
    (``crop_and_resize``; here with PIL bilinear, not TensorFlow's, so not bit-identical).
Action tokens
    ``n_action_bins`` (256) uniform bin *edges* over [-1, 1], ``edges = linspace(-1, 1, n_bins)``,
    and the ``n_bins - 1`` centres between them. The un-padded vocabulary size is
    ``V = text_config.vocab_size - pad_to_multiple_of`` (openvla-7b: 32064 - 64 = 32000). Training
    encodes ``d = digitize(clip(a, -1, 1), edges)`` in ``1..n_bins`` as token ``V - d``, so the
    action tokens are the last ``n_bins`` ids of the un-padded vocabulary, ``V - n_bins .. V - 1``
    (31744..31999). Decoding maps token ``t`` to ``centres[clip(V - t - 1, 0, n_bins - 2)]``: id
    ``V - 1`` is the lowest centre ``-1 + 1/255``, ids ``V - 256`` and ``V - 255`` both the highest.
Un-normalisation (``BOUNDS_Q99``)
    ``a = 0.5 (n + 1) (q99 - q01) + q01`` where ``mask`` is true, ``a = n`` where false, with
    ``norm_stats[unnorm_key]["action"]`` = ``{"q01", "q99", "mask", ...}`` from ``config.json``
    (absent mask = all true); a fine-tuned checkpoint's ``dataset_statistics.json`` (same layout)
    adds to / overrides those keys. openvla-7b's mask is false for the gripper, which therefore comes
    out as a bin centre in [0, 1]: the RLDS convention 0 = closed, 1 = open. ``unnorm_key`` may be
    omitted only when the statistics hold a single dataset.
Raw action
    7-D for the OXE datasets: ``[dx, dy, dz, droll, dpitch, dyaw, gripper]``, deltas in the
    dataset's units per dataset step (metres, radians), gripper as above.

Decoding here (differs from ``predict_action`` on purpose)
    The adapter runs the vision backbone and projector once per observation, builds the multimodal
    prefix embeddings itself (Prismatic's insertion after ``<s>``), left-pads them, runs the language
    model over the prefix once per observation (its key/value cache, :meth:`OpenVLAPolicy.prefill`),
    repeats each row of the cache and of the prefix ``K`` times and calls
    ``model.language_model.generate`` with the prefix embeddings and that cache *once* for all ``B * K``
    rows: the K samples share the image, the prompt and their prefill, and only the ``A_raw`` decoding
    steps run on ``B * K`` rows, exactly ``A_raw`` new tokens each. ``generate`` decodes greedily; the
    sampling happens in a logits processor that leaves only the ``n_bins`` action tokens and, unless
    ``deterministic=True``, adds Gumbel noise to their ``logits / temperature`` (the Gumbel-max trick:
    the argmax is a draw from ``softmax(logits / temperature)`` over the action tokens, the same
    distribution as sampling the full vocabulary with the other tokens masked out, without
    transformers' default ``top_k=50`` and without ``torch.multinomial`` over 32k tokens, which on a
    CPU costs about 0.8 ms per row and token). It does not
    call the checkpoint's own ``generate``: the hub remote code refuses batches larger than one
    (``prepare_inputs_for_generation``, openvla/openvla issue #228), and on transformers >= 4.50 its
    first generation step is cut to the last prompt token, so the image is never seen (issue #346).

Steerl's action space
    :meth:`OpenVLAPolicy.predict_raw` returns the un-normalised OpenVLA actions; :meth:`sample`
    maps them into the robot's normalised ``[-1, 1]`` space with an explicit :class:`ActionMapping`
    (selection, scale, offset and clip per output dimension). The default matches
    :class:`hardware_configs.schema.ActionConfig`'s defaults: ``[dx, dy, dz, gripper]`` with
    ``dx / 0.03 m`` and the gripper turned from 0 = closed / 1 = open into -1 = open / +1 = closed.

Saving
    :meth:`OpenVLAPolicy.save` writes only ``policy.json`` (kind ``"openvla"``, the adapter config
    with the checkpoint's absolute path): the multi-gigabyte checkpoint stays where it is and is not
    copied. A relative ``checkpoint`` in a hand-written ``policy.json`` is resolved against the
    policy directory.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
import torch

from policies.base import POLICY_FILE, Policy, PolicyInput, read_policy_file, register_policy, write_policy_file

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
#: Llama 2's "▁" piece, appended after "Out:" (hard-coded in ``predict_action``).
LLAMA_EMPTY_TOKEN_ID = 29871
CONFIG_FILE = "config.json"
DATASET_STATISTICS_FILE = "dataset_statistics.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
WEIGHT_FILE = "model.safetensors"
WEIGHT_INDEX_FILE = "model.safetensors.index.json"
#: ``auto_map`` keys that may name the model class, in order of preference (openvla-7b uses the
#: first, which transformers 5 no longer has as an auto class; the adapter resolves it itself).
MODEL_AUTO_MAP_KEYS = ("AutoModelForVision2Seq", "AutoModelForImageTextToText", "AutoModelForCausalLM")
#: attributes of a Prismatic-layout model that the adapter uses.
PRISMATIC_MODULES = ("vision_backbone", "projector", "language_model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_real(value: Any) -> bool:
    """A real number that is not a bool (numpy scalars included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------
# Prompt, tokens, statistics
# --------------------------------------------------------------------------------------------------


def build_prompt(instruction: str) -> str:
    """OpenVLA's prompt for one instruction (stripped and lower-cased, as in training)."""
    text = instruction.strip()
    if not text:
        raise ValueError("instruction is empty")
    return PROMPT_TEMPLATE.format(instruction=text.lower())


@dataclass(frozen=True)
class ActionTokenLayout:
    """Where the action bins live in the vocabulary and what each token decodes to.

    ``vocab_size`` is the *un-padded* vocabulary size ``V`` (``text_config.vocab_size -
    pad_to_multiple_of``); the action tokens are ``V - n_bins .. V - 1``.
    """

    vocab_size: int
    n_bins: int = 256

    def __post_init__(self) -> None:
        if self.n_bins < 2:
            raise ValueError(f"n_action_bins must be at least 2, got {self.n_bins}")
        if self.vocab_size <= self.n_bins:
            raise ValueError(f"vocabulary size {self.vocab_size} leaves no room for {self.n_bins} action bins")

    @classmethod
    def from_model_config(cls, config: Any, source: str = CONFIG_FILE) -> "ActionTokenLayout":
        """From a checkpoint config: ``text_config.vocab_size``, ``pad_to_multiple_of``, ``n_action_bins``."""
        text_config = getattr(config, "text_config", None)
        padded = getattr(text_config, "vocab_size", None)
        pad_multiple = getattr(config, "pad_to_multiple_of", None)
        n_bins = getattr(config, "n_action_bins", None)
        for name, value in (("text_config.vocab_size", padded), ("pad_to_multiple_of", pad_multiple),
                            ("n_action_bins", n_bins)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{source}: needs an integer {name}, got {value!r}")
        try:
            return cls(vocab_size=padded - pad_multiple, n_bins=n_bins)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @property
    def first_token_id(self) -> int:
        return self.vocab_size - self.n_bins

    @property
    def token_ids(self) -> range:
        return range(self.first_token_id, self.vocab_size)

    def bin_edges(self) -> torch.Tensor:
        return torch.linspace(-1.0, 1.0, self.n_bins, dtype=torch.float64)

    def bin_centers(self) -> torch.Tensor:
        edges = self.bin_edges()
        return (edges[:-1] + edges[1:]) / 2.0

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Action token ids -> normalised actions in [-1, 1] (float32, same shape)."""
        index = (self.vocab_size - token_ids.long() - 1).clamp(0, self.n_bins - 2)
        return self.bin_centers().to(token_ids.device)[index].float()

    def encode(self, normalised: torch.Tensor) -> torch.Tensor:
        """Normalised actions -> token ids, as training tokenises them (``np.digitize`` on the edges)."""
        edges = self.bin_edges().to(normalised.device)
        digitised = torch.bucketize(normalised.double().clamp(-1.0, 1.0), edges, right=True)
        return self.vocab_size - digitised


@dataclass(frozen=True)
class ActionStats:
    """One dataset's action statistics: ``q01``, ``q99`` and the normalisation ``mask``."""

    q01: tuple[float, ...]
    q99: tuple[float, ...]
    mask: tuple[bool, ...]

    @property
    def dim(self) -> int:
        return len(self.q01)

    @classmethod
    def from_norm_stats(cls, norm_stats: Mapping[str, Any], unnorm_key: Optional[str],
                        source: str = CONFIG_FILE) -> tuple[str, "ActionStats"]:
        """Pick ``norm_stats[unnorm_key]["action"]`` (or the only dataset when the key is None);
        returns the resolved key and the statistics. Errors name ``source`` and list the keys."""
        if not isinstance(norm_stats, Mapping) or not norm_stats:
            raise ValueError(f"{source}: no norm_stats (OpenVLA's per-dataset action statistics)")
        available = ", ".join(sorted(map(str, norm_stats)))
        if unnorm_key is None:
            if len(norm_stats) != 1:
                raise ValueError(f"{source}: norm_stats holds {len(norm_stats)} datasets, set unnorm_key to one of: "
                                 f"{available}")
            unnorm_key = next(iter(norm_stats))
        if unnorm_key not in norm_stats:
            raise ValueError(f"{source}: norm_stats has no unnorm_key {unnorm_key!r}; available: {available}")
        where = f"{source}: norm_stats[{unnorm_key!r}]['action']"
        entry = norm_stats[unnorm_key]
        action = entry.get("action") if isinstance(entry, Mapping) else None
        if not isinstance(action, Mapping):
            raise ValueError(f"{where} is missing")
        vectors: dict[str, list[Any]] = {}
        for name in ("q01", "q99"):
            value = action.get(name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{where}[{name!r}] must be a non-empty list, got {value!r}")
            vectors[name] = list(value)
        mask = action.get("mask", [True] * len(vectors["q01"]))
        if not isinstance(mask, (list, tuple)) or not all(isinstance(m, (bool, np.bool_)) for m in mask):
            raise ValueError(f"{where}['mask'] must be a list of booleans, got {mask!r}")
        if not len(vectors["q01"]) == len(vectors["q99"]) == len(mask):
            raise ValueError(f"{where}: q01, q99 and mask have different lengths "
                             f"({len(vectors['q01'])}, {len(vectors['q99'])}, {len(mask)})")
        if not all(_is_real(x) for x in vectors["q01"] + vectors["q99"]):
            raise ValueError(f"{where}: q01 and q99 must hold numbers")
        low = tuple(float(x) for x in vectors["q01"])
        high = tuple(float(x) for x in vectors["q99"])
        if not all(math.isfinite(lo) and math.isfinite(hi) and lo <= hi for lo, hi in zip(low, high)):
            raise ValueError(f"{where}: q01 and q99 must be finite with q01 <= q99")
        return unnorm_key, cls(q01=low, q99=high, mask=tuple(bool(m) for m in mask))

    def unnormalize(self, normalised: torch.Tensor) -> torch.Tensor:
        """``0.5 (n + 1) (q99 - q01) + q01`` where ``mask``, ``n`` elsewhere (last axis = action)."""
        low = torch.tensor(self.q01, dtype=normalised.dtype, device=normalised.device)
        high = torch.tensor(self.q99, dtype=normalised.dtype, device=normalised.device)
        mask = torch.tensor(self.mask, device=normalised.device)
        return torch.where(mask, 0.5 * (normalised + 1.0) * (high - low) + low, normalised)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Training's forward map: ``clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)`` where ``mask``."""
        low = torch.tensor(self.q01, dtype=raw.dtype, device=raw.device)
        high = torch.tensor(self.q99, dtype=raw.dtype, device=raw.device)
        mask = torch.tensor(self.mask, device=raw.device)
        return torch.where(mask, (2.0 * (raw - low) / (high - low + 1e-8) - 1.0).clamp(-1.0, 1.0), raw)


# --------------------------------------------------------------------------------------------------
# Mapping into steerl's normalised action space
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionMapping:
    """OpenVLA raw action -> the robot's normalised action, one affine map per output dimension::

        out[i] = clip((raw[source_dims[i]] - offsets[i]) / scales[i], -1, 1)

    Raw dimensions not named in ``source_dims`` are dropped (e.g. roll and pitch for a robot that
    only moves xyz and yaw); a permutation of ``source_dims`` or a negative scale re-expresses axes in
    another frame or flips a convention. ``raw_dim`` is the raw action size the mapping expects
    (checked against the checkpoint's statistics). If the robot's control period differs from the
    dataset's step, fold the ratio into the xyz/yaw scales.
    """

    source_dims: tuple[int, ...] = (0, 1, 2, 6)
    scales: tuple[float, ...] = (0.03, 0.03, 0.03, -0.5)
    offsets: tuple[float, ...] = (0.0, 0.0, 0.0, 0.5)
    raw_dim: int = 7
    clip: bool = True

    def __post_init__(self) -> None:
        for name in ("source_dims", "scales", "offsets"):  # lists (JSON, YAML) and arrays -> tuples
            value = getattr(self, name)
            if isinstance(value, (list, np.ndarray)):
                object.__setattr__(self, name, tuple(np.asarray(value).tolist() if isinstance(value, np.ndarray)
                                                     else value))
        self.validate()
        # numpy scalars -> Python numbers
        object.__setattr__(self, "raw_dim", int(self.raw_dim))
        object.__setattr__(self, "source_dims", tuple(int(dim) for dim in self.source_dims))
        object.__setattr__(self, "scales", tuple(float(scale) for scale in self.scales))
        object.__setattr__(self, "offsets", tuple(float(offset) for offset in self.offsets))

    def validate(self) -> None:
        if not isinstance(self.raw_dim, numbers.Integral) or isinstance(self.raw_dim, bool) or self.raw_dim < 1:
            raise ValueError(f"ActionMapping.raw_dim must be a positive integer, got {self.raw_dim!r}")
        if not isinstance(self.clip, bool):
            raise ValueError(f"ActionMapping.clip must be true or false, got {self.clip!r}")
        for name in ("source_dims", "scales", "offsets"):
            if not isinstance(getattr(self, name), tuple):
                raise ValueError(f"ActionMapping.{name} must be a list, got {getattr(self, name)!r}")
        if not self.source_dims:
            raise ValueError("ActionMapping.source_dims must name at least one raw dimension")
        if not len(self.source_dims) == len(self.scales) == len(self.offsets):
            raise ValueError(f"ActionMapping.source_dims, scales and offsets need one entry per output dimension, got "
                             f"{len(self.source_dims)}, {len(self.scales)}, {len(self.offsets)}")
        for index, dim in enumerate(self.source_dims):
            if not isinstance(dim, numbers.Integral) or isinstance(dim, bool) or not 0 <= dim < self.raw_dim:
                raise ValueError(f"ActionMapping.source_dims[{index}] = {dim!r} is not a raw dimension "
                                 f"(0 .. {self.raw_dim - 1} for raw_dim {self.raw_dim})")
        for index, scale in enumerate(self.scales):
            if not _is_real(scale) or not math.isfinite(scale) or scale == 0:
                raise ValueError(f"ActionMapping.scales[{index}] must be finite and non-zero, got {scale!r}")
        for index, offset in enumerate(self.offsets):
            if not _is_real(offset) or not math.isfinite(offset):
                raise ValueError(f"ActionMapping.offsets[{index}] must be finite, got {offset!r}")

    @property
    def dim(self) -> int:
        """Size ``A`` of the normalised action."""
        return len(self.source_dims)

    @classmethod
    def for_robot(cls, xyz_scale_m: float = 0.03, use_yaw: bool = False, yaw_scale_rad: float = 0.15, *,
                  raw_dim: int = 7, xyz_dims: tuple[int, int, int] = (0, 1, 2), yaw_dim: int = 5,
                  gripper_dim: int = 6, gripper_open: float = 1.0, gripper_closed: float = 0.0,
                  clip: bool = True) -> "ActionMapping":
        """Steerl's ``[dx, dy, dz, (dyaw,) gripper]`` (see ``ActionConfig``): deltas divided by the
        per-step scales, and the raw gripper (``gripper_open`` / ``gripper_closed``, OpenVLA's 1 / 0)
        sent to -1 (open) / +1 (closed)."""
        if gripper_open == gripper_closed:
            raise ValueError("gripper_open and gripper_closed must differ")
        dims = [*xyz_dims, *([yaw_dim] if use_yaw else []), gripper_dim]
        scales = [xyz_scale_m] * 3 + ([yaw_scale_rad] if use_yaw else []) + [(gripper_closed - gripper_open) / 2.0]
        offsets = [0.0] * (len(dims) - 1) + [(gripper_closed + gripper_open) / 2.0]
        return cls(tuple(dims), tuple(scales), tuple(offsets), raw_dim=raw_dim, clip=clip)

    @classmethod
    def from_action_config(cls, action_config: Any, **changes: Any) -> "ActionMapping":
        """From a :class:`hardware_configs.schema.ActionConfig` (its xyz/yaw scales and ``use_yaw``)."""
        return cls.for_robot(action_config.xyz_scale_m, action_config.use_yaw, action_config.yaw_scale_rad, **changes)

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        """``[..., raw_dim]`` -> ``[..., dim]`` (float32)."""
        if raw.shape[-1] != self.raw_dim:
            raise ValueError(f"ActionMapping expects raw actions of size {self.raw_dim}, got {raw.shape[-1]}")
        scales = torch.tensor(self.scales, dtype=torch.float32, device=raw.device)
        offsets = torch.tensor(self.offsets, dtype=torch.float32, device=raw.device)
        out = (raw[..., list(self.source_dims)].float() - offsets) / scales
        return out.clamp(-1.0, 1.0) if self.clip else out

    def inverse(self, normalised: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``[..., dim]`` -> ``[..., raw_dim]``: ``raw = out * scale + offset`` on the mapped
        dimensions, ``fill`` on the dropped ones (exact only for un-clipped values)."""
        if normalised.shape[-1] != self.dim:
            raise ValueError(f"ActionMapping.inverse expects actions of size {self.dim}, got {normalised.shape[-1]}")
        scales = torch.tensor(self.scales, dtype=torch.float32, device=normalised.device)
        offsets = torch.tensor(self.offsets, dtype=torch.float32, device=normalised.device)
        raw = normalised.new_full((*normalised.shape[:-1], self.raw_dim), fill, dtype=torch.float32)
        raw[..., list(self.source_dims)] = normalised.float() * scales + offsets
        return raw

    def to_dict(self) -> dict[str, Any]:
        return {"source_dims": list(self.source_dims), "scales": list(self.scales), "offsets": list(self.offsets),
                "raw_dim": self.raw_dim, "clip": self.clip}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "mapping") -> "ActionMapping":
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown ActionMapping field(s) {', '.join(unknown)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# Adapter config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenVLAConfig:
    """Everything the adapter needs; validated on construction, errors name the field.

    ``instruction``: a fixed task used when an observation batch has no ``instruction_key``
    (a per-observation instruction in the batch wins). ``dtype="auto"``: bfloat16 on CUDA, float32
    on CPU. ``device="auto"``: CUDA when available. ``empty_token_id``: appended after the prompt
    (None: append nothing). ``center_crop_scale``: see the module docstring.
    """

    checkpoint: str
    unnorm_key: Optional[str] = None
    image_key: str = "image"
    instruction_key: str = "instruction"
    instruction: Optional[str] = None
    temperature: float = 1.0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    mapping: ActionMapping = field(default_factory=ActionMapping)
    center_crop_scale: Optional[float] = None
    empty_token_id: Optional[int] = LLAMA_EMPTY_TOKEN_ID

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint, Path):
            object.__setattr__(self, "checkpoint", str(self.checkpoint))
        if isinstance(self.mapping, Mapping):
            object.__setattr__(self, "mapping", ActionMapping.from_dict(self.mapping, "OpenVLAConfig.mapping"))
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.checkpoint, str) or not self.checkpoint.strip():
            raise ValueError(f"OpenVLAConfig.checkpoint must be a directory path, got {self.checkpoint!r}")
        if self.unnorm_key is not None and (not isinstance(self.unnorm_key, str) or not self.unnorm_key):
            raise ValueError(f"OpenVLAConfig.unnorm_key must be a non-empty string or null, got {self.unnorm_key!r}")
        for name in ("image_key", "instruction_key"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"OpenVLAConfig.{name} must be a non-empty string, got {value!r}")
        if self.instruction is not None and (not isinstance(self.instruction, str) or not self.instruction.strip()):
            raise ValueError(f"OpenVLAConfig.instruction must be a non-empty string or null, got {self.instruction!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"OpenVLAConfig.temperature must be a positive number, got {self.temperature!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"OpenVLAConfig.dtype must be one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"OpenVLAConfig.device must be a string, got {self.device!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"OpenVLAConfig.device {self.device!r} is not a torch device (or 'auto')") from None
        if not isinstance(self.mapping, ActionMapping):
            raise ValueError(f"OpenVLAConfig.mapping must be an ActionMapping, got {type(self.mapping).__name__}")
        if self.center_crop_scale is not None and (
                not _is_real(self.center_crop_scale) or not 0.0 < self.center_crop_scale <= 1.0):
            raise ValueError(f"OpenVLAConfig.center_crop_scale must lie in (0, 1] or be null, got "
                             f"{self.center_crop_scale!r}")
        if self.empty_token_id is not None and (
                not isinstance(self.empty_token_id, int) or isinstance(self.empty_token_id, bool)
                or self.empty_token_id < 0):
            raise ValueError(f"OpenVLAConfig.empty_token_id must be a token id or null, got {self.empty_token_id!r}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["mapping"] = self.mapping.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "OpenVLAConfig") -> "OpenVLAConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: the OpenVLA config must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown OpenVLAConfig field(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(names))})")
        if "checkpoint" not in data:
            raise ValueError(f"{source}: OpenVLAConfig.checkpoint is required")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None


# --------------------------------------------------------------------------------------------------
# Checkpoint directory
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    return content


def _remote_module(reference: str, path: Path, key: str) -> str:
    """``"module.Class"`` -> ``"module.py"``; refuses references into other hub repositories."""
    if "--" in reference:
        raise ValueError(f"{path}: auto_map[{key!r}] = {reference!r} points at another repository; "
                         "checkpoints load offline, ship the module in the directory")
    parts = reference.split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{path}: auto_map[{key!r}] = {reference!r} is not 'module.Class'")
    return parts[0] + ".py"


def _auto_map(content: Mapping[str, Any], path: Path) -> dict[str, Any]:
    auto_map = content.get("auto_map") or {}
    if not isinstance(auto_map, dict):
        raise ValueError(f"{path}: auto_map must be an object, got {auto_map!r}")
    return auto_map


def check_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Check that ``directory`` holds a loadable OpenVLA checkpoint; returns its parsed config.json.

    Required: ``config.json`` (with an ``auto_map`` naming the model class), safetensors weights
    (``model.safetensors`` or an index and all its shards; pickled ``.bin`` weights are refused),
    the tokenizer (``tokenizer_config.json`` and ``tokenizer.json`` or ``tokenizer.model``),
    ``preprocessor_config.json``, and every remote-code module an ``auto_map`` names. Errors name the
    missing file.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"OpenVLA checkpoint directory {root} does not exist")
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing (not an OpenVLA checkpoint directory)")
    config = _read_json(config_path)

    index_path = root / WEIGHT_INDEX_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: has no weight_map")
        for shard in sorted(set(weight_map.values())):
            if not (root / shard).is_file():
                raise FileNotFoundError(f"{root / shard}: weight shard listed in {WEIGHT_INDEX_FILE} is missing")
    elif not (root / WEIGHT_FILE).is_file():
        pickled = sorted(path.name for path in root.glob("pytorch_model*.bin"))
        hint = f" ({', '.join(pickled)} are pickle files, which steerl does not load: convert them)" if pickled else ""
        raise FileNotFoundError(f"{root}: no weights, expected {WEIGHT_FILE} or {WEIGHT_INDEX_FILE}{hint}")

    if not (root / TOKENIZER_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{root / TOKENIZER_CONFIG_FILE}: missing (the tokenizer)")
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{root}: no tokenizer vocabulary, expected {' or '.join(TOKENIZER_FILES)}")
    preprocessor_path = root / PREPROCESSOR_FILE
    if not preprocessor_path.is_file():
        raise FileNotFoundError(f"{preprocessor_path}: missing (the image processor)")

    auto_maps = [(config_path, _auto_map(config, config_path)),
                 (preprocessor_path, _auto_map(_read_json(preprocessor_path), preprocessor_path))]
    if not any(key in auto_maps[0][1] for key in MODEL_AUTO_MAP_KEYS):
        raise ValueError(f"{config_path}: auto_map names no model class (expected one of "
                         f"{', '.join(MODEL_AUTO_MAP_KEYS)}, as openvla-7b's modeling_prismatic.py)")
    for path, auto_map in auto_maps:
        for key, reference in auto_map.items():
            for ref in reference if isinstance(reference, (list, tuple)) else [reference]:
                if ref is None:
                    continue
                module_file = _remote_module(str(ref), path, key)
                if not (root / module_file).is_file():
                    raise FileNotFoundError(f"{root / module_file}: missing "
                                            f"(named by auto_map[{key!r}] in {path.name})")
    return config


def load_norm_stats(directory: str | Path, model_config: Any) -> tuple[dict[str, Any], str]:
    """The checkpoint's ``norm_stats``, with ``dataset_statistics.json`` (fine-tunes) merged over
    ``config.json``'s; returns them and a description of their source for error messages."""
    root = Path(directory)
    norm_stats = dict(getattr(model_config, "norm_stats", None) or {})
    source = str(root / CONFIG_FILE)
    statistics_path = root / DATASET_STATISTICS_FILE
    if statistics_path.is_file():
        norm_stats.update(_read_json(statistics_path))
        source += f" + {statistics_path.name}"
    return norm_stats, source


# --------------------------------------------------------------------------------------------------
# Generation helpers
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _action_token_sampler_class() -> type:
    """:class:`ActionTokenSampler`, defined on first use so that importing this module does not import
    transformers (``load_policy`` imports every built-in policy module)."""
    from transformers import LogitsProcessor

    class ActionTokenSampler(LogitsProcessor):
        """Logits processor that leaves ``generate`` (greedy) one choice among the action tokens
        ``[first_id, stop_id)``: every other token gets ``-inf`` (also the padded embedding rows beyond
        the un-padded vocabulary); with a ``temperature`` the action tokens' scores become
        ``logits / temperature + g``, ``g`` i.i.d. standard Gumbel noise, whose argmax is a draw from
        ``softmax(logits / temperature)`` over the action tokens (the Gumbel-max trick). Without one,
        the argmax is greedy decoding."""

        def __init__(self, first_id: int, stop_id: int, temperature: Optional[float]) -> None:
            self.first_id, self.stop_id, self.temperature = first_id, stop_id, temperature

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            action_scores = scores[:, self.first_id:self.stop_id]
            if self.temperature is not None:
                exponential = torch.empty_like(action_scores).exponential_().clamp_min(torch.finfo(scores.dtype).tiny)
                action_scores = action_scores / self.temperature - exponential.log()
            chosen = torch.full_like(scores, float("-inf"))
            chosen[:, self.first_id:self.stop_id] = action_scores
            return chosen

    return ActionTokenSampler


def action_token_sampler(layout: ActionTokenLayout, temperature: Optional[float]) -> Any:
    """A transformers ``LogitsProcessor`` under which greedy ``generate`` samples only ``layout``'s
    action tokens at ``temperature`` (None: greedy among them); see ``ActionTokenSampler``."""
    return _action_token_sampler_class()(layout.first_token_id, layout.vocab_size, temperature)


@functools.cache
def cache_argument() -> str:
    """The name of the key/value cache argument of ``generate`` and of the models' ``forward``:
    ``cache`` from transformers 5.24 on (where ``past_key_values`` still works but warns),
    ``past_key_values`` before."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch ``[B, L]``: counted from each row's first unpadded entry
    (0 on the padding), as transformers' ``generate`` counts them."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def _center_crop(image: Any, scale: float) -> Any:
    """Keep the central ``sqrt(scale)`` of each side, resize back (OpenVLA's ``crop_and_resize``)."""
    from PIL import Image

    width, height = image.size
    side = math.sqrt(scale)
    crop_w, crop_h = width * side, height * side
    left, top = (width - crop_w) / 2.0, (height - crop_h) / 2.0
    return image.resize((width, height), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------


@register_policy("openvla")
class OpenVLAPolicy(Policy):
    """An OpenVLA checkpoint as a steerl :class:`~policies.base.Policy` (see the module docstring).

    Observations: ``config.image_key`` -> uint8 ``[B, H, W, 3]``; ``config.instruction_key`` -> ``B``
    strings (or ``config.instruction`` for all). :meth:`predict_raw` gives the un-normalised OpenVLA
    actions ``[B, K, A_raw]``; :meth:`sample` maps them through ``config.mapping`` into ``[-1, 1]``.
    """

    def __init__(self, config: OpenVLAConfig) -> None:
        import transformers
        from transformers import AutoConfig, AutoProcessor
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        self.config = config
        root = Path(config.checkpoint).expanduser().resolve()
        raw_config = check_checkpoint(root)
        model_config = AutoConfig.from_pretrained(root, trust_remote_code=True, local_files_only=True)

        self.layout = ActionTokenLayout.from_model_config(model_config, str(root / CONFIG_FILE))
        norm_stats, stats_source = load_norm_stats(root, model_config)
        self.unnorm_key, self.stats = ActionStats.from_norm_stats(norm_stats, config.unnorm_key, stats_source)
        if self.stats.dim != config.mapping.raw_dim:
            raise ValueError(f"{stats_source}: norm_stats[{self.unnorm_key!r}]['action'] has {self.stats.dim} "
                             f"dimensions but OpenVLAConfig.mapping.raw_dim is {config.mapping.raw_dim}")
        self.action_dim = config.mapping.dim
        if config.empty_token_id is not None and config.empty_token_id >= self.layout.first_token_id:
            raise ValueError(f"OpenVLAConfig.empty_token_id {config.empty_token_id} lies outside the text vocabulary "
                             f"(action tokens start at {self.layout.first_token_id})")

        device = config.resolved_device()
        self.dtype = config.resolved_dtype(device)
        auto_map = raw_config["auto_map"]
        model_key = next(key for key in MODEL_AUTO_MAP_KEYS if key in auto_map)
        model_class = get_class_from_dynamic_module(auto_map[model_key], root, local_files_only=True)
        # Straight onto the device when accelerate is there (transformers needs it for device_map).
        placement = {"device_map": str(device)} if importlib.util.find_spec("accelerate") is not None else {}
        self.model = model_class.from_pretrained(root, config=model_config, dtype=self.dtype, local_files_only=True,
                                                 **placement)
        missing = [name for name in PRISMATIC_MODULES if not hasattr(self.model, name)]
        if missing:
            raise TypeError(f"{root / CONFIG_FILE}: model class {model_class.__name__} lacks {', '.join(missing)} "
                            "(the adapter needs the Prismatic layout: vision_backbone, projector, language_model)")
        if not placement:
            self.model.to(device)
        self.model.eval()
        try:
            self.processor = AutoProcessor.from_pretrained(root, trust_remote_code=True, local_files_only=True)
        except AttributeError as error:
            if "valid_kwargs" not in str(error):
                raise
            raise RuntimeError(f"{root}: transformers {transformers.__version__} cannot load this checkpoint's image "
                               "processor (its remote code declares no `valid_kwargs`); install transformers<5.25 "
                               "as setup.py pins") from error
        self.checkpoint = root

    # -- Policy interface ------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> "OpenVLAPolicy":
        self.model.to(device)
        return self

    def sample(self, observations: PolicyInput, num_samples: int, deterministic: bool = False) -> torch.Tensor:
        """``[B, K, A]`` actions in ``[-1, 1]``: :meth:`predict_raw` through ``config.mapping``."""
        return self.config.mapping(self.predict_raw(observations, num_samples, deterministic))

    def save(self, directory: str | Path) -> None:
        """Write ``policy.json`` only (the checkpoint is referenced by absolute path, not copied)."""
        config = dataclasses.replace(self.config, checkpoint=str(self.checkpoint))
        write_policy_file(directory, self.kind, config=config.to_dict())

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "OpenVLAPolicy":
        """Rebuild from ``policy.json``; ``device`` overrides the saved one (and with it the "auto" dtype)."""
        directory = Path(directory)
        content = read_policy_file(directory)
        source = str(directory / POLICY_FILE)
        if "config" not in content:
            raise ValueError(f"{source}: needs a field 'config' (the OpenVLA adapter config)")
        config = OpenVLAConfig.from_dict(content["config"], source)
        checkpoint = Path(config.checkpoint).expanduser()
        if not checkpoint.is_absolute():
            checkpoint = directory / checkpoint
        return cls(dataclasses.replace(config, checkpoint=str(checkpoint), device=str(torch.device(device))))

    # -- OpenVLA specifics -----------------------------------------------------------------------

    @property
    def raw_action_dim(self) -> int:
        return self.stats.dim

    def instructions(self, observations: PolicyInput, batch_size: int) -> list[str]:
        """The ``B`` instructions of a batch: ``observations[instruction_key]`` or the fixed one."""
        key = self.config.instruction_key
        if key in observations:
            values = observations[key]
            if isinstance(values, (str, bytes)):
                raise ValueError(f"observation {key!r} must hold one string per observation, got a single string")
            values = list(np.asarray(values, dtype=object).reshape(-1) if isinstance(values, np.ndarray) else values)
            if len(values) != batch_size:
                raise ValueError(f"observation {key!r} holds {len(values)} instructions for a batch of {batch_size}")
        elif self.config.instruction is not None:
            values = [self.config.instruction] * batch_size
        else:
            raise ValueError(f"no instruction: the observations have no key {key!r} and OpenVLAConfig.instruction "
                             "is not set")
        texts = []
        for index, value in enumerate(values):
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"observation {key!r}[{index}] is empty or not a string: {value!r}")
            texts.append(value)
        return texts

    def images(self, observations: PolicyInput) -> list[Any]:
        """The batch's images as RGB PIL images (centre-cropped when configured)."""
        from PIL import Image

        key = self.config.image_key
        if key not in observations:
            raise ValueError(f"observations have no image key {key!r} (keys: {', '.join(sorted(observations))})")
        value = observations[key]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"observation {key!r} must be uint8 [B, H, W, 3], got {array.dtype} {list(array.shape)}")
        images = [Image.fromarray(np.ascontiguousarray(frame)) for frame in array]
        if self.config.center_crop_scale is not None and self.config.center_crop_scale < 1.0:
            images = [_center_crop(image, self.config.center_crop_scale) for image in images]
        return images

    def prompts(self, observations: PolicyInput, batch_size: int) -> list[str]:
        return [build_prompt(text) for text in self.instructions(observations, batch_size)]

    def decode_raw(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Action token ids ``[..., A_raw]`` -> un-normalised actions (float32)."""
        return self.stats.unnormalize(self.layout.decode(token_ids))

    def predict_raw(self, observations: PolicyInput, num_samples: int = 1, deterministic: bool = False) -> torch.Tensor:
        """``[B, K, A_raw]`` un-normalised OpenVLA actions (float32, on :attr:`device`)."""
        return self.decode_raw(self.generate_action_tokens(observations, num_samples, deterministic))

    @torch.inference_mode()
    def generate_action_tokens(self, observations: PolicyInput, num_samples: int,
                               deterministic: bool = False) -> torch.Tensor:
        """``[B, K, A_raw]`` action token ids from one batched ``generate`` call."""
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        images = self.images(observations)
        batch = len(images)
        if batch == 0:
            raise ValueError(f"observation {self.config.image_key!r} holds an empty batch")
        prompts = self.prompts(observations, batch)
        embeddings, attention_mask = self.prefix_embeddings(prompts, images)
        cache = self.prefill(embeddings, attention_mask)
        rows = 1 if deterministic else num_samples
        if rows > 1:
            cache.batch_repeat_interleave(rows)
            embeddings = embeddings.repeat_interleave(rows, dim=0)
            attention_mask = attention_mask.repeat_interleave(rows, dim=0)
        tokens = self.decode_action_tokens(embeddings, attention_mask, cache, deterministic)
        tokens = tokens.reshape(batch, rows, self.raw_action_dim)
        return tokens.repeat(1, num_samples // rows, 1)  # greedy: the one best guess in every slot

    def decode_action_tokens(self, embeddings: torch.Tensor, attention_mask: torch.Tensor, cache: Optional[Any],
                             deterministic: bool = False) -> torch.Tensor:
        """``[rows, A_raw]`` action tokens that one ``generate`` call appends to left-padded prefixes
        (``inputs_embeds [rows, L, H]``, ``attention_mask [rows, L]``), sampled at the configured
        temperature or greedy; ``cache`` (:meth:`prefill`, one entry per row) holds the positions the
        model need not run again, None runs it over the whole prefix."""
        from transformers import GenerationConfig, LogitsProcessorList

        tokenizer = self.processor.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generation = GenerationConfig(max_new_tokens=self.raw_action_dim, do_sample=False, num_beams=1,
                                      use_cache=True, pad_token_id=pad_id)
        sampler = action_token_sampler(self.layout, None if deterministic else float(self.config.temperature))
        # with a cache, generate sees the whole prefix but runs the model only past the cached
        # positions: the last prefix position (which predicts the first action token) and the
        # A_raw - 1 tokens after it
        generated = self.model.language_model.generate(
            inputs_embeds=embeddings, attention_mask=attention_mask, generation_config=generation,
            logits_processor=LogitsProcessorList([sampler]), **({} if cache is None else {cache_argument(): cache}),
        )
        return generated[:, -self.raw_action_dim:]

    def prefill(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """The language model's key/value cache of every prefix position but the last, one row per
        observation (a transformers ``DynamicCache``): the part of decoding that K samples share.

        Positions count from each row's first unpadded entry, as ``generate`` counts them."""
        from transformers import DynamicCache

        language_model = self.model.language_model
        cache = DynamicCache(config=language_model.config)
        language_model.get_decoder()(inputs_embeds=embeddings[:, :-1], attention_mask=attention_mask[:, :-1],
                                     position_ids=token_positions(attention_mask)[:, :-1], use_cache=True,
                                     **{cache_argument(): cache})
        return cache

    def prompt_token_ids(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Each prompt's token ids as the model sees them: ``<s>``, the prompt, the empty token."""
        return self._token_rows(self.processor.tokenizer(list(prompts), padding=True, return_tensors="pt"))

    def _token_rows(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        bos = self.processor.tokenizer.bos_token_id
        empty = self.config.empty_token_id
        rows: list[torch.Tensor] = []
        for ids, keep in zip(inputs["input_ids"], inputs["attention_mask"]):
            ids = ids[keep.bool()]
            if bos is not None and (len(ids) == 0 or int(ids[0]) != bos):
                raise ValueError("the checkpoint's tokenizer did not start the prompt with <s>; the image patches go "
                                 "right after it")
            if empty is not None and int(ids[-1]) != empty:
                ids = torch.cat([ids, ids.new_tensor([empty])])
            rows.append(ids)
        return rows

    def prefix_embeddings(self, prompts: Sequence[str], images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded multimodal prefix: ``<s>``, projected patches, the rest of the prompt (+ the
        empty token); returns ``inputs_embeds [B, L, H]`` and ``attention_mask [B, L]``."""
        inputs = self.processor(text=list(prompts), images=list(images), padding=True, return_tensors="pt")
        rows = self._token_rows(inputs)
        device = self.device
        pixel_values = inputs["pixel_values"].to(device=device, dtype=self.dtype)
        patches = self.model.projector(self.model.vision_backbone(pixel_values))  # [B, P, H]
        embed = self.model.get_input_embeddings()
        longest = max(len(ids) for ids in rows) + patches.shape[1]
        embeddings = patches.new_zeros((len(rows), longest, patches.shape[2]))
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long, device=device)
        for index, ids in enumerate(rows):
            tokens = embed(ids.to(device))
            row = torch.cat([tokens[:1], patches[index], tokens[1:]], dim=0)
            embeddings[index, longest - len(row):] = row
            attention_mask[index, longest - len(row):] = 1
        return embeddings, attention_mask

    # -- supervised training (PA-RL's distillation, learner/parl.py) ----------------------------------

    def action_tokens(self, actions: torch.Tensor) -> torch.Tensor:
        """Robot actions ``[..., A]`` in ``[-1, 1]`` -> the action token ids ``[..., A_raw]`` that
        :meth:`sample` maps back to them: ``config.mapping.inverse`` (raw dimensions the mapping drops
        are taught as raw 0, no motion), the checkpoint's ``normalize`` and the bin encoding training
        uses. Exact up to half a bin where the raw value lies within q01..q99 (beyond, the end bin)."""
        raw = self.config.mapping.inverse(actions.float())
        return self.layout.encode(self.stats.normalize(raw))

    def action_token_log_likelihood(self, observations: PolicyInput, actions: torch.Tensor) -> torch.Tensor:
        """:meth:`token_log_likelihood` of the tokens of robot actions ``[B, A]`` (:meth:`action_tokens`)."""
        return self.token_log_likelihood(observations, self.action_tokens(actions.to(self.device)))

    def token_log_likelihood(self, observations: PolicyInput, token_ids: torch.Tensor) -> torch.Tensor:
        """``log p(t_j | prefix, t_<j)`` ``[B, A_raw]`` of action tokens ``[B, A_raw]`` given each
        observation's image and prompt, under the full vocabulary (the language-model loss OpenVLA
        is trained with), differentiable in the model's weights.

        One teacher-forced forward pass: the left-padded multimodal prefix of :meth:`prefix_embeddings`
        followed by the first ``A_raw - 1`` tokens; positions count from each row's first unpadded
        entry, as in generation, so the logits are those :meth:`generate_action_tokens` samples from
        (before it masks out the non-action tokens)."""
        images = self.images(observations)
        batch = len(images)
        if tuple(token_ids.shape) != (batch, self.raw_action_dim):
            raise ValueError(f"token_ids must be [{batch}, {self.raw_action_dim}] for a batch of {batch}, "
                             f"got {tuple(token_ids.shape)}")
        targets = token_ids.to(self.device, torch.long)
        prefix, prefix_mask = self.prefix_embeddings(self.prompts(observations, batch), images)
        embeddings = torch.cat([prefix, self.model.get_input_embeddings()(targets[:, :-1]).to(prefix.dtype)], dim=1)
        attention_mask = torch.cat([prefix_mask, prefix_mask.new_ones((batch, targets.shape[1] - 1))], dim=1)
        logits = self.model.language_model(inputs_embeds=embeddings, attention_mask=attention_mask,
                                           position_ids=token_positions(attention_mask), use_cache=False).logits
        logits = logits[:, prefix.shape[1] - 1:].float()  # the positions that predict t_0 .. t_{A_raw-1}
        return logits.log_softmax(dim=-1).gather(-1, targets[..., None]).squeeze(-1)

    def supervised_loss(self, observations: PolicyInput, actions: torch.Tensor,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mean token cross-entropy of ``actions`` ``[B, A]`` (:meth:`action_token_log_likelihood`);
        deterministic, so ``generator`` is unused. Train only a few parameters (LoRA adapters,
        ``learner/parl.py``): every weight of the checkpoint receives a gradient otherwise."""
        return -self.action_token_log_likelihood(observations, actions).mean()
