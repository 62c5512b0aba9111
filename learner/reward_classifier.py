"""Reward classifier: camera frames -> p(success), trained on labelled frames, saved without pickle.

A real robot has no success flag of its own. As in HIL-SERL, a binary classifier over the camera
images supplies one: the operator labels a few hundred frames (or the simulator does, see
:mod:`actor.labelled_frames`), the classifier is trained here, and the actor runs it every step
(:class:`actor.reward_wrapper.RewardClassifierWrapper`) to produce the sparse reward and end
episodes on success.

Model
=====

For each camera ``c`` (uint8 ``H x W x 3``), with ``x_c`` scaled to [0, 1] and laid out NCHW::

    z_c   = tanh(LayerNorm(W_c · h_c(x_c) + b_c))        # h_c: frozen encoder, W_c: trainable projection
    logit = w_2 · relu(W_1 · [z_1, ..., z_C] + b_1) + b_2  # small MLP head over all cameras
    p(success | x) = sigmoid(logit)

``h_c`` is one of

- ``pretrained``: a frozen TorchScript image backbone loaded from a local file
  (:func:`policies.encoders.load_frozen_backbone`; shared by all cameras, never trained, not stored
  in the classifier file; the file's path and sha256 are); or
- ``small_cnn``: 3x3 convolutions with ReLU (:class:`policies.encoders.SmallCNN`; by default 32
  filters, strides 2 and 2), flattened, not pooled. By default it is **frozen at its random
  initialisation** (``freeze_encoder``), which keeps "frozen encoder + small head" when no
  pretrained backbone is at hand: a wide, shallow random convolution stack followed by a trained
  linear projection is a random-feature model that keeps *where* things are in the image, which is
  what success detection needs (is the gripper at the marker, is the cube above the table). It
  trains faster than back-propagating through the convolutions and cannot overfit a few hundred
  frames through them; its weights are saved with the head, so the file alone reproduces the
  classifier. Measured on the reach cell below (3 seeds): frozen 32 filters / strides (2, 2) 0.93 -
  0.98 held-out accuracy; trained end to end (``freeze_encoder=False``,
  16 filters, strides 2, 2, 1, 1) 0.95 - 1.0 at about 1.5 - 2x
  the training time; frozen but deep and narrow (16 filters, strides 2, 2, 1, 1) only 0.70 - 0.93
  (random features through four narrow layers lose the information), hence the shallow default.
  Train the encoder when the cue is subtle and there are many frames.

Loss and balancing
==================

Success frames are rare (the simulator ends an episode at its first success frame; an operator
marks few), so every minibatch holds ``B/2`` positives and ``B/2`` negatives, drawn uniformly
with replacement from the training positives ``P`` and negatives ``N`` whatever their counts. The
loss is the binary cross-entropy of that batch::

    L = -(1/B) · [ Σ_{i∈P_batch} log σ(f(x_i)) + Σ_{j∈N_batch} log(1 - σ(f(x_j))) ]

whose expectation is ``½ E_P[-log σ(f)] + ½ E_N[-log(1 - σ(f))]``: the class frequencies of the
data drop out. Its minimiser is ``f*(x) = log p(x | success) - log p(x | failure)``, so ``σ(f)`` is
the posterior under a 50/50 prior and the threshold 0.5 is the likelihood-ratio test at 1. Under a
deployment prior ``π`` of success the posterior logit is ``f + log(π / (1 - π))``; raising the
threshold trades recall for precision. For RL a false positive (reward for a non-success, which
the policy learns to exploit) costs more than a false negative, so check the held-out precision and
raise ``threshold`` (stored in the file, overridable in the wrapper) if it is low.

Augmentation: every training image gets a DrQ random shift (replicate-pad by ``augment_pad``
pixels, crop back at a random offset: :func:`policies.encoders.random_shift`), by default 5% of
the smaller image side (2 px at 48 x 48, 4 px at 84 x 84).

Held-out split: whole episodes (``episodes.npy``) go to the held-out set, about
``holdout_fraction`` of the episodes with a success frame and the same fraction of those without
(so both classes are held out), never single frames: consecutive frames of one episode are nearly
identical and would leak. Reported on the held-out frames at the threshold: accuracy, precision
``TP / (TP + FP)``, recall ``TP / (TP + FN)``, the confusion matrix ``[[TN, FP], [FN, TP]]``, and
the majority-class rate (the accuracy of always answering the more frequent class: the number to
beat).

Expected accuracy (sanity note, not a benchmark): on the PyBullet image reach cell
(``sim_panda_reach_images`` with two 32 x 32 cameras) with 80 episodes from ``steerl
record-success-fail --expert-share 0.5 --expert-noise 0.3 --random-action-share 0.7
--near-miss-steps 1 --failures-per-episode 1`` (about 200 frames, 30% success, one near-miss before each success), 300 steps
of the default model reach 0.92 - 0.98 held-out accuracy against a majority-class rate of 0.70;
the errors are near-misses (the gripper one step, ~3 cm, short of the goal). ``pick_cube`` is
harder (the near-miss is the cube held 2 - 3 cm lower than a success, ~2 pixels at 48 x 48, and
there is one success frame per episode): expect to need several hundred episodes, larger images or
a trained encoder. Much lower numbers mean too few success frames or cameras that cannot see the
task.

File format (version 1)
=======================

One safetensors file. Its tensors are the ``state_dict`` of :class:`RewardClassifier` (float32,
including the frozen small CNN's weights; a pretrained backbone is not included). Its safetensors
metadata (the JSON header of the file) holds one entry, ``"steerl.reward_classifier"``, a JSON
string with ``format`` (``"steerl.reward_classifier"``), ``format_version`` (1), ``cameras``
(``{name: {"field": "images/<name>", "shape": [H, W, 3]}}``), ``encoder`` (``kind``, ``frozen``,
``pretrained_path``, ``pretrained_sha256``, ``channels``, ``strides``, ``latent_dim``),
``hidden_dim``, ``augment_pad``, ``threshold`` and ``training`` (options, data counts, held-out
metrics). Read the header with ``safetensors.safe_open(path, "pt").metadata()``. The file is
written to a temporary sibling and renamed into place. :func:`load_reward_classifier` rebuilds the
model from the header, loads the tensors strictly and, given an observation space, checks every
camera's field and shape (:class:`RewardClassifierShapeError` names the camera, the expected and
the actual shape).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as safetensors_to_bytes
from torch import nn

from policies.encoders import (FrozenFeatureProjection, SmallCNN, images_to_float_nchw, load_frozen_backbone,
                               random_shift)

if TYPE_CHECKING:  # the on-disk format lives with its producers on the actor side
    from actor.labelled_frames import LabelledFrames

log = logging.getLogger("steerl.learner.reward_classifier")

FORMAT_NAME = "steerl.reward_classifier"
FORMAT_VERSION = 1
METADATA_KEY = "steerl.reward_classifier"
IMAGE_PREFIX = "images/"
ENCODER_KINDS = ("small_cnn", "pretrained")


class RewardClassifierError(ValueError):
    """A classifier file or its training data is unusable; the message names the file or field."""


class RewardClassifierShapeError(RewardClassifierError):
    """A classifier file does not fit the env's cameras (missing camera or different image shape)."""


@dataclass(frozen=True)
class EncoderSpec:
    """The per-camera encoder (see the module docstring)."""

    kind: str = "small_cnn"
    # small_cnn only: keep the random initial convolutions (True) or train them with the head.
    frozen: bool = True
    pretrained_path: str = ""
    pretrained_sha256: str = ""
    channels: int = 32
    strides: tuple[int, ...] = (2, 2)
    latent_dim: int = 64

    def validate(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise RewardClassifierError(f"encoder kind {self.kind!r} is not one of {ENCODER_KINDS}")
        if self.kind == "pretrained" and not self.pretrained_path:
            raise RewardClassifierError("encoder kind 'pretrained' needs a pretrained_path (a TorchScript file)")
        if self.channels < 1 or self.latent_dim < 1 or not self.strides:
            raise RewardClassifierError("encoder channels, latent_dim and strides must be positive / non-empty")


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything needed to rebuild a :class:`RewardClassifier` (the file's JSON header)."""

    image_shapes: Mapping[str, tuple[int, int, int]]
    encoder: EncoderSpec = EncoderSpec()
    hidden_dim: int = 128
    augment_pad: int = 2
    threshold: float = 0.5

    @property
    def cameras(self) -> tuple[str, ...]:
        return tuple(sorted(self.image_shapes))

    def header(self, training: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The JSON header of the classifier file."""
        encoder = asdict(self.encoder)
        encoder["strides"] = list(self.encoder.strides)
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "cameras": {name: {"field": IMAGE_PREFIX + name, "shape": list(self.image_shapes[name])}
                        for name in self.cameras},
            "encoder": encoder,
            "hidden_dim": self.hidden_dim,
            "augment_pad": self.augment_pad,
            "threshold": self.threshold,
            "training": dict(training or {}),
        }

    @classmethod
    def from_header(cls, header: Mapping[str, Any], source: str) -> "ClassifierSpec":
        """Parse a header written by :meth:`header`; errors name ``source``."""
        if header.get("format") != FORMAT_NAME:
            raise RewardClassifierError(f"{source}: not a {FORMAT_NAME} file (format {header.get('format')!r})")
        if header.get("format_version") != FORMAT_VERSION:
            raise RewardClassifierError(f"{source}: format version {header.get('format_version')} is not "
                                        f"{FORMAT_VERSION}")
        try:
            shapes = {name: tuple(int(n) for n in entry["shape"]) for name, entry in header["cameras"].items()}
            encoder = dict(header["encoder"])
            encoder["strides"] = tuple(int(s) for s in encoder["strides"])
            spec = cls(shapes, EncoderSpec(**encoder), int(header["hidden_dim"]), int(header["augment_pad"]),
                       float(header["threshold"]))
        except (KeyError, TypeError, ValueError) as error:
            raise RewardClassifierError(f"{source}: malformed classifier header: {error!r}") from None
        spec.encoder.validate()
        return spec


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class RewardClassifier(nn.Module):
    """Camera images -> success logit (see the module docstring for the model).

    Args:
        spec: cameras, encoder, head size and threshold.
        backbone: an already-loaded frozen backbone for ``kind: pretrained`` (None: load it from
            ``spec.encoder.pretrained_path``).
    """

    def __init__(self, spec: ClassifierSpec, backbone: Optional[torch.jit.ScriptModule] = None) -> None:
        super().__init__()
        spec.encoder.validate()
        self.spec = spec
        self.cameras = spec.cameras
        encoder = spec.encoder
        # Kept in a plain dict, outside the module tree: not trained, not in state_dict, never saved.
        self._frozen: dict[str, torch.jit.ScriptModule] = {}
        self.encoders = nn.ModuleDict()
        if encoder.kind == "pretrained":
            self._frozen["backbone"] = backbone if backbone is not None else load_frozen_backbone(
                encoder.pretrained_path)
        for camera in self.cameras:
            height, width, channels = spec.image_shapes[camera]
            if encoder.kind == "small_cnn":
                cnn = SmallCNN((height, width, channels), encoder.channels, encoder.latent_dim, "flatten",
                               tuple(encoder.strides))
                if encoder.frozen:
                    cnn.convs.requires_grad_(False)
                self.encoders[camera] = cnn
            else:
                with torch.no_grad():
                    features = self._frozen["backbone"](torch.zeros(1, channels, height, width))
                self.encoders[camera] = FrozenFeatureProjection(features.flatten(1).shape[1], encoder.latent_dim)
        self.head = nn.Sequential(nn.Linear(len(self.cameras) * encoder.latent_dim, spec.hidden_dim), nn.ReLU(),
                                  nn.Linear(spec.hidden_dim, 1))

    @property
    def threshold(self) -> float:
        return self.spec.threshold

    @property
    def backbone(self) -> Optional[torch.jit.ScriptModule]:
        """The frozen TorchScript backbone (``pretrained``), else None."""
        return self._frozen.get("backbone")

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        for module in self._frozen.values():  # .to(device) moves the frozen backbone too
            module._apply(fn)
        return self

    def forward(self, images: Mapping[str, torch.Tensor], augment: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` per camera (keyed by camera name) -> logits ``[B]``; DrQ shift
        only when ``augment`` (training)."""
        latents = []
        for camera in self.cameras:
            frames = images[camera]
            if augment and self.spec.augment_pad > 0:
                frames = random_shift(frames, self.spec.augment_pad, generator)
            frames = images_to_float_nchw(frames)
            if self.backbone is not None:
                with torch.no_grad():
                    frames = self.backbone(frames)
            latents.append(self.encoders[camera](frames))
        return self.head(torch.cat(latents, dim=1)).squeeze(1)

    def probabilities(self, images: Mapping[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
        """p(success) ``[N]`` for uint8 ``[N, H, W, 3]`` numpy frames per camera name (no augmentation)."""
        count = len(next(iter(images.values())))
        out = np.empty(count, dtype=np.float32)
        was_training = self.training
        self.eval()
        with torch.inference_mode():
            for start in range(0, count, batch_size):
                batch = {camera: torch.from_numpy(np.ascontiguousarray(images[camera][start:start + batch_size]))
                         for camera in self.cameras}
                out[start:start + batch_size] = torch.sigmoid(self(batch)).numpy()
        self.train(was_training)
        return out

    def probability(self, observation: Mapping[str, np.ndarray]) -> float:
        """p(success) of one env observation (its ``images/<camera>`` fields)."""
        with torch.inference_mode():
            batch = {}
            for camera in self.cameras:
                frame = np.asarray(observation[IMAGE_PREFIX + camera])
                if not frame.flags.writeable:  # a view of received bytes: torch wants writeable memory
                    frame = frame.copy()
                batch[camera] = torch.from_numpy(np.ascontiguousarray(frame)).unsqueeze(0)
            return float(torch.sigmoid(self(batch))[0])

    def check_observation_space(self, observation_space, source: str = "reward classifier") -> None:
        """Raise :class:`RewardClassifierShapeError` unless every camera of the classifier is a uint8
        ``images/<camera>`` field of ``observation_space`` with the trained shape."""
        fields = getattr(observation_space, "spaces", {})
        for camera in self.cameras:
            key = IMAGE_PREFIX + camera
            expected = tuple(self.spec.image_shapes[camera])
            if key not in fields:
                cameras = sorted(k for k in fields if k.startswith(IMAGE_PREFIX))
                raise RewardClassifierShapeError(
                    f"{source}: camera {camera!r} (field {key!r}) is not in the env's observation; "
                    f"the env's cameras: {cameras}")
            actual = tuple(fields[key].shape)
            if actual != expected or fields[key].dtype != np.uint8:
                raise RewardClassifierShapeError(
                    f"{source}: camera {camera!r} was trained on images of shape {expected} (uint8), but the "
                    f"env's field {key!r} has shape {actual} ({fields[key].dtype}); retrain the classifier for "
                    f"this camera setup or fix robot.cameras")


# -------------------------------------------------------------------------------------- file


def save_reward_classifier(classifier: RewardClassifier, path: str | os.PathLike,
                           training: Mapping[str, Any] | None = None) -> Path:
    """Write ``classifier`` as a safetensors file with its JSON header (format in the module docstring)."""
    path = Path(path)
    header = classifier.spec.header(training)
    tensors = {name: tensor.detach().to("cpu", torch.float32).contiguous()
               for name, tensor in classifier.state_dict().items()}
    blob = safetensors_to_bytes(tensors, metadata={METADATA_KEY: json.dumps(header)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_classifier_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a classifier file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for a bad file
        raise RewardClassifierError(f"{path}: not a readable safetensors file: {error}") from None
    if METADATA_KEY not in metadata:
        raise RewardClassifierError(f"{path}: has no {METADATA_KEY!r} header; not a steerl reward classifier")
    try:
        return json.loads(metadata[METADATA_KEY])
    except ValueError as error:
        raise RewardClassifierError(f"{path}: header is not JSON: {error}") from None


def load_reward_classifier(path: str | os.PathLike, observation_space=None,
                           pretrained_path: str | None = None) -> RewardClassifier:
    """Rebuild a classifier from its file (in eval mode). With ``observation_space``, check that the
    env has every camera at the trained shape. ``pretrained_path`` overrides the backbone path of
    the header (a moved file); its sha256 must match the one recorded at training."""
    header = read_classifier_header(path)
    spec = ClassifierSpec.from_header(header, str(path))
    if spec.encoder.kind == "pretrained":
        backbone_path = pretrained_path or spec.encoder.pretrained_path
        if not Path(backbone_path).is_file():
            raise RewardClassifierError(f"{path}: its frozen backbone {backbone_path!r} does not exist "
                                        "(pass pretrained_path= to point at the moved file)")
        digest = file_sha256(backbone_path)
        if spec.encoder.pretrained_sha256 and digest != spec.encoder.pretrained_sha256:
            raise RewardClassifierError(f"{path}: backbone {backbone_path!r} has sha256 {digest[:12]}..., the classifier "
                                        f"was trained with {spec.encoder.pretrained_sha256[:12]}...")
        spec = replace(spec, encoder=replace(spec.encoder, pretrained_path=str(backbone_path)))
    classifier = RewardClassifier(spec)
    tensors = load_safetensors_file(str(path))
    expected = classifier.state_dict()
    problems = [f"{name}: missing" for name in expected if name not in tensors]
    problems += [f"{name}: unexpected" for name in tensors if name not in expected]
    problems += [f"{name}: shape {tuple(tensors[name].shape)}, the header implies {tuple(value.shape)}"
                 for name, value in expected.items() if name in tensors and tensors[name].shape != value.shape]
    if problems:
        raise RewardClassifierError(f"{path}: tensors do not match the header: {'; '.join(problems[:5])}")
    classifier.load_state_dict(tensors, strict=True)
    classifier.eval()
    if observation_space is not None:
        classifier.check_observation_space(observation_space, source=str(path))
    return classifier


# ---------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainingOptions:
    """How :func:`train_reward_classifier` trains (see the module docstring)."""

    steps: int = 500
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    holdout_fraction: float = 0.2
    seed: int = 0
    encoder: str = "small_cnn"
    pretrained_path: str = ""
    # small_cnn only: keep the convolutions at their random initialisation (pretrained: always frozen).
    freeze_encoder: bool = True
    channels: int = 32
    strides: tuple[int, ...] = (2, 2)
    latent_dim: int = 64
    hidden_dim: int = 128
    # DrQ shift in pixels; None: 5% of the smaller image side (at least 1).
    augment_pad: Optional[int] = None
    threshold: float = 0.5
    log_every: int = 100

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.batch_size % 2:
            raise RewardClassifierError("steps must be positive and batch_size a positive even number")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise RewardClassifierError(f"holdout_fraction must lie in [0, 1), got {self.holdout_fraction}")
        if not 0.0 <= self.threshold <= 1.0:
            raise RewardClassifierError(f"threshold must lie in [0, 1], got {self.threshold}")


@dataclass
class TrainingResult:
    """A trained classifier and what was measured on it."""

    classifier: RewardClassifier
    heldout: Optional[dict[str, Any]]
    train: dict[str, Any]
    train_frames: int
    heldout_frames: int
    heldout_episodes: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable numbers for the classifier file's header."""
        return {"heldout": self.heldout, "train": self.train, "train_frames": self.train_frames,
                "heldout_frames": self.heldout_frames, "heldout_episodes": self.heldout_episodes,
                "seconds": round(self.seconds, 2)}


def split_by_episode(labels: np.ndarray, episodes: np.ndarray, holdout_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices ``(train, heldout)``: about ``holdout_fraction`` of the episodes with a success
    frame and of those without go to the held-out set, whole."""
    if holdout_fraction <= 0:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    unique = np.unique(episodes)
    with_success = set(np.unique(episodes[labels]).tolist())
    held: list[int] = []
    for stratum in ([e for e in unique if e in with_success], [e for e in unique if e not in with_success]):
        if len(stratum) < 2:
            continue
        count = min(len(stratum) - 1, max(1, int(round(holdout_fraction * len(stratum)))))
        held += rng.choice(stratum, size=count, replace=False).tolist()
    mask = np.isin(episodes, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, Any]:
    """Accuracy, precision, recall (None when undefined), the confusion matrix ``[[TN, FP], [FN, TP]]``
    and the majority-class rate of ``labels`` at ``threshold``."""
    labels = np.asarray(labels, dtype=bool)
    predicted = np.asarray(probabilities) >= threshold
    tp = int(np.sum(predicted & labels))
    fp = int(np.sum(predicted & ~labels))
    fn = int(np.sum(~predicted & labels))
    tn = int(np.sum(~predicted & ~labels))
    total = max(len(labels), 1)
    positives = int(labels.sum())
    return {
        "frames": len(labels),
        "accuracy": (tp + tn) / total,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "confusion": [[tn, fp], [fn, tp]],
        "majority_rate": max(positives, len(labels) - positives) / total,
        "threshold": threshold,
    }


def format_confusion(metrics: Mapping[str, Any]) -> str:
    """The confusion matrix of :func:`classification_metrics` as a small text table."""
    (tn, fp), (fn, tp) = metrics["confusion"]
    return ("                 predicted failure  predicted success\n"
            f"actual failure   {tn:>17d}  {fp:>17d}\n"
            f"actual success   {fn:>17d}  {tp:>17d}")


def train_reward_classifier(data: "LabelledFrames", options: TrainingOptions = TrainingOptions(),
                            log_line: Callable[[str], None] | None = None) -> TrainingResult:
    """Train a classifier on ``data`` (balanced batches, DrQ shift, held-out split by episode; see the
    module docstring). ``log_line`` receives progress lines."""
    options.validate()
    say = log_line or log.info
    started = time.perf_counter()
    labels = np.asarray(data.labels, dtype=bool)
    train_index, heldout_index = split_by_episode(labels, data.episodes, options.holdout_fraction, options.seed)
    train_positive = train_index[labels[train_index]]
    train_negative = train_index[~labels[train_index]]
    if len(train_positive) == 0 or len(train_negative) == 0:
        raise RewardClassifierError(
            f"the training split holds {len(train_positive)} success and {len(train_negative)} failure frames; "
            "both classes are needed (record more episodes)")
    if options.holdout_fraction > 0 and (len(heldout_index) == 0 or labels[heldout_index].all()
                                         or not labels[heldout_index].any()):
        raise RewardClassifierError(
            f"the held-out split ({len(heldout_index)} frames) lacks a class: record more episodes, "
            "or pass holdout_fraction 0 to train on everything without an evaluation")

    shapes = data.image_shapes
    pad = options.augment_pad
    if pad is None:
        pad = max(1, int(round(0.05 * min(min(shape[:2]) for shape in shapes.values()))))
    encoder = EncoderSpec(
        kind=options.encoder, frozen=True if options.encoder == "pretrained" else options.freeze_encoder,
        pretrained_path=str(options.pretrained_path),
        pretrained_sha256=file_sha256(options.pretrained_path) if options.encoder == "pretrained" else "",
        channels=options.channels, strides=tuple(options.strides), latent_dim=options.latent_dim)
    spec = ClassifierSpec(shapes, encoder, options.hidden_dim, pad, options.threshold)
    torch.manual_seed(options.seed)
    classifier = RewardClassifier(spec)
    classifier.train()
    trainable = [p for p in classifier.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=options.learning_rate, weight_decay=options.weight_decay)
    generator = torch.Generator().manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    half = options.batch_size // 2
    target = torch.cat([torch.ones(half), torch.zeros(half)])
    say(f"training on {len(train_index)} frames ({len(train_positive)} success, {len(train_negative)} failure), "
        f"held out {len(heldout_index)} frames of {len(np.unique(data.episodes[heldout_index]))} episodes; "
        f"encoder {encoder.kind}{' (frozen)' if encoder.frozen else ''}, {sum(p.numel() for p in trainable)} "
        f"trainable parameters")
    running_loss, running_correct = 0.0, 0.0
    for step in range(1, options.steps + 1):
        rows = np.concatenate([rng.choice(train_positive, half), rng.choice(train_negative, half)])
        batch = {camera: torch.from_numpy(data.images[camera][rows]) for camera in spec.cameras}
        logits = classifier(batch, augment=True, generator=generator)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        running_loss += float(loss.detach())
        running_correct += float(((logits > 0).float() == target).float().mean())
        if step % options.log_every == 0 or step == options.steps:
            window = options.log_every if step % options.log_every == 0 else step % options.log_every
            say(f"step {step}/{options.steps}: balanced loss {running_loss / window:.4f}, "
                f"batch accuracy {running_correct / window:.3f}")
            running_loss, running_correct = 0.0, 0.0
    classifier.eval()

    def evaluate(index: np.ndarray) -> dict[str, Any]:
        probabilities = classifier.probabilities({camera: data.images[camera][index] for camera in spec.cameras})
        return classification_metrics(labels[index], probabilities, options.threshold)

    train_metrics = evaluate(train_index)
    heldout = evaluate(heldout_index) if len(heldout_index) else None
    return TrainingResult(classifier, heldout, train_metrics, len(train_index), len(heldout_index),
                          sorted(int(e) for e in np.unique(data.episodes[heldout_index])),
                          time.perf_counter() - started)


def describe_metrics(metrics: Mapping[str, Any]) -> str:
    """One line of held-out numbers plus the confusion matrix."""
    def number(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    return (f"accuracy {metrics['accuracy']:.3f} (majority-class rate {metrics['majority_rate']:.3f}), "
            f"precision {number(metrics['precision'])}, recall {number(metrics['recall'])} at threshold "
            f"{metrics['threshold']:g} over {metrics['frames']} frames\n{format_confusion(metrics)}")
