"""Observation encoders: a dict of numpy/torch fields in, one flat feature vector out.

An :class:`ObservationEncoder` concatenates

- the selected float state fields, flattened, in a fixed (sorted-key) order and standardised as
  ``clip((x - mean) / std, -STATE_CLIP, STATE_CLIP)`` (mean 0 and std 1 until
  :meth:`ObservationEncoder.set_state_normalization` is called; the statistics are buffers, so they
  travel with the published weights and the checkpoints); and
- per camera (``images/<name>``, uint8 ``H x W x 3``) a latent vector from either
  a small CNN trained with the critic (``kind: small_cnn``, as in DrQ/SERL), or
  a frozen TorchScript backbone followed by a trainable projection (``kind: pretrained``).

Encoding runs in two stages so that the learner can share work within one update:

1. :meth:`ObservationEncoder.prepare` has no trainable parameters: uint8 images -> DrQ random
   shift (training only) -> float NCHW in [0, 1] -> frozen backbone features (``pretrained``,
   no gradient). The learner calls it once per minibatch and hands the result to the critic, the
   target critic and the actor alike, so a frozen backbone runs once per batch, not three times.
2. :meth:`ObservationEncoder.encode` applies the trainable parts (CNN or projection) and
   concatenates everything.

``forward(observation, augment=False)`` is both stages in a row. The frozen backbone is not part
of ``state_dict()``: both sides load it from ``pretrained_path``, so published policy weights stay
small.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Optional

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from hardware_configs.schema import ImageEncoderConfig

IMAGE_PREFIX = "images/"
# Standardised state features are clipped to +-STATE_CLIP (an out-of-distribution reading cannot
# dominate the first layer).
STATE_CLIP = 10.0


def is_image_field(key: str, box: spaces.Box) -> bool:
    """Camera fields: ``images/<name>`` with a uint8 ``H x W x C`` box."""
    return key.startswith(IMAGE_PREFIX) and box.dtype == np.uint8 and len(box.shape) == 3


def random_shift(images: torch.Tensor, pad: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DrQ augmentation of a batch of ``[B, H, W, C]`` images (any dtype, uint8 included).

    Equivalent to replicate-padding every image by ``pad`` pixels and cropping an ``H x W`` window
    at an independent random integer offset per image. Replicate padding followed by a crop is the
    same as reading the original image at clamped indices, so the whole batch is one gather and
    no padded copy is ever made.
    """
    if pad == 0:
        return images
    batch, height, width = images.shape[:3]
    device = images.device
    offsets = torch.randint(0, 2 * pad + 1, (2, batch, 1), device=device, generator=generator) - pad
    rows = (torch.arange(height, device=device) + offsets[0]).clamp_(0, height - 1)  # [B, H]
    cols = (torch.arange(width, device=device) + offsets[1]).clamp_(0, width - 1)  # [B, W]
    batch_index = torch.arange(batch, device=device)[:, None, None]
    return images[batch_index, rows[:, :, None], cols[:, None, :]]


def images_to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, C]`` -> float32 ``[B, C, H, W]`` in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


class SpatialSoftmax(nn.Module):
    """Feature map ``[B, C, H, W]`` -> ``[B, 2C]`` keypoints: per channel, the softmax over the
    ``H x W`` positions (learned temperature) weights the positions' (x, y) in [-1, 1]."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        ys, xs = torch.meshgrid(torch.linspace(-1.0, 1.0, height), torch.linspace(-1.0, 1.0, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1), persistent=False)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(features.flatten(2) / self.log_temperature.exp(), dim=-1)  # [B, C, HW]
        return (weights @ self.grid).flatten(1)  # [B, C, 2] -> [B, 2C]


class SmallCNN(nn.Module):
    """DrQ/SERL-style camera encoder: 3x3 convs (strides 2, 1, 1, 1 by default) -> pooling
    (flatten or spatial softmax) -> Linear -> LayerNorm -> tanh."""

    def __init__(self, image_shape: tuple[int, int, int], channels: int, latent_dim: int,
                 pooling: str = "flatten", strides: tuple[int, ...] = (2, 1, 1, 1)) -> None:
        super().__init__()
        height, width, in_channels = image_shape
        layers: list[nn.Module] = []
        for index, stride in enumerate(strides):
            layers += [nn.Conv2d(in_channels if index == 0 else channels, channels, 3, stride=stride), nn.ReLU()]
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            feature_map = self.convs(torch.zeros(1, in_channels, height, width))
        if pooling == "spatial_softmax":
            self.pool: nn.Module = SpatialSoftmax(feature_map.shape[2], feature_map.shape[3])
            pooled_dim = 2 * channels
        else:
            self.pool = nn.Flatten(1)
            pooled_dim = feature_map.numel()
        self.projection = nn.Sequential(nn.Linear(pooled_dim, latent_dim), nn.LayerNorm(latent_dim), nn.Tanh())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float ``[B, C, H, W]`` in [0, 1] -> ``[B, latent_dim]``."""
        return self.projection(self.pool(self.convs(images)))


class FrozenFeatureProjection(nn.Module):
    """The trainable head on top of frozen backbone features: Linear -> LayerNorm -> tanh."""

    def __init__(self, feature_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(feature_dim, latent_dim), nn.LayerNorm(latent_dim), nn.Tanh())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features.flatten(1))


def load_frozen_backbone(path: str) -> torch.jit.ScriptModule:
    """A TorchScript image backbone (float NCHW in [0, 1] -> features), in eval mode, frozen."""
    with warnings.catch_warnings():
        # torch 2.10+ flags TorchScript as deprecated; it is still the portable frozen-model format here.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
        backbone = torch.jit.load(path, map_location="cpu")
    backbone.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone


class ObservationEncoder(nn.Module):
    """Selected observation fields -> ``[B, output_dim]`` features (see the module docstring).

    Args:
        observation_space: the robot's observation ``spaces.Dict`` of Box fields.
        keys: the fields to encode; empty means every field of the space.
        image_config: how camera fields are encoded.
        frozen_backbones: already-loaded backbones per camera key to share (target encoders reuse
            the online encoder's backbone instead of loading a second copy).
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        keys: tuple[str, ...] = (),
        image_config: ImageEncoderConfig = ImageEncoderConfig(),
        frozen_backbones: Optional[Mapping[str, torch.jit.ScriptModule]] = None,
    ) -> None:
        super().__init__()
        keys = tuple(keys) or tuple(observation_space.spaces)
        missing = [key for key in keys if key not in observation_space.spaces]
        if missing:
            raise KeyError(f"observation keys {missing} are not fields of the observation space")
        self.observation_space = observation_space
        self.image_config = image_config
        self.keys = tuple(sorted(keys))
        self.image_keys = tuple(k for k in self.keys if is_image_field(k, observation_space[k]))
        self.state_keys = tuple(k for k in self.keys if k not in self.image_keys)
        self.state_dim = sum(int(math.prod(observation_space[k].shape)) for k in self.state_keys)

        self.register_buffer("state_mean", torch.zeros(self.state_dim))
        self.register_buffer("state_std", torch.ones(self.state_dim))
        # Kept outside the module tree: not trained, not in state_dict, moved along in _apply.
        self._frozen_backbones: dict[str, torch.jit.ScriptModule] = {}
        self.cameras = nn.ModuleDict()
        for key in self.image_keys:
            image_shape = tuple(observation_space[key].shape)
            if image_config.kind == "small_cnn":
                camera: nn.Module = SmallCNN(image_shape, image_config.channels, image_config.latent_dim,
                                             image_config.pooling, tuple(image_config.strides))
            else:
                if frozen_backbones is not None and key in frozen_backbones:
                    backbone = frozen_backbones[key]
                else:
                    backbone = load_frozen_backbone(image_config.pretrained_path)
                self._frozen_backbones[key] = backbone
                height, width, channels = image_shape
                device = next(iter(backbone.parameters()), torch.zeros(())).device
                with torch.no_grad():
                    feature_dim = backbone(torch.zeros(1, channels, height, width, device=device)).flatten(1).shape[1]
                camera = FrozenFeatureProjection(feature_dim, image_config.latent_dim)
            self.cameras[self._module_name(key)] = camera
        self.output_dim = self.state_dim + len(self.image_keys) * image_config.latent_dim

    @staticmethod
    def _module_name(key: str) -> str:
        return key[len(IMAGE_PREFIX):].replace(".", "_")

    @property
    def frozen_backbones(self) -> dict[str, torch.jit.ScriptModule]:
        """The frozen backbones per camera key (empty for ``small_cnn``)."""
        return dict(self._frozen_backbones)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        for backbone in self._frozen_backbones.values():
            backbone._apply(fn)
        return self

    def state_vector(self, observation: Mapping[str, np.ndarray | torch.Tensor]) -> np.ndarray:
        """The raw (not standardised) state features ``[B, state_dim]`` of batched numpy fields, in
        the encoder's order (what the normalisation statistics are measured on)."""
        return np.concatenate(
            [np.asarray(observation[k], dtype=np.float64).reshape(len(observation[k]), -1) for k in self.state_keys],
            axis=1,
        )

    def set_state_normalization(self, states: np.ndarray, min_std: float) -> None:
        """Measure the state statistics on ``states`` ``[N, state_dim]`` (raw features, see
        :meth:`state_vector`); standard deviations are floored at ``min_std``."""
        states = np.asarray(states, dtype=np.float64)
        if states.ndim != 2 or states.shape[1] != self.state_dim or len(states) == 0:
            raise ValueError(f"state statistics need a non-empty [N, {self.state_dim}] array, got {states.shape}")
        if not np.all(np.isfinite(states)):
            raise ValueError("state statistics: the states contain NaN or inf")
        with torch.no_grad():
            self.state_mean.copy_(torch.from_numpy(states.mean(axis=0)))
            self.state_std.copy_(torch.from_numpy(np.maximum(states.std(axis=0), min_std)))

    def make_target_copy(self) -> "ObservationEncoder":
        """A copy with the same weights and the same (shared, frozen) backbones, for a target network."""
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        target = ObservationEncoder(self.observation_space, self.keys, self.image_config, self._frozen_backbones)
        target.load_state_dict(self.state_dict())
        return target.to(device)

    def prepare(
        self,
        observation: Mapping[str, torch.Tensor],
        augment: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, torch.Tensor]:
        """Stage 1 (no trainable parameters): state fields flattened and concatenated under
        ``"state"``; each camera as float NCHW (DrQ-shifted when ``augment``) or, for a pretrained
        backbone, as its frozen features."""
        prepared: dict[str, torch.Tensor] = {}
        if self.state_keys:
            state = torch.cat(
                [observation[k].reshape(observation[k].shape[0], -1).float() for k in self.state_keys], dim=1
            )
            prepared["state"] = ((state - self.state_mean) / self.state_std).clamp_(-STATE_CLIP, STATE_CLIP)
        for key in self.image_keys:
            images = observation[key]
            if augment and self.image_config.augment_pad > 0:
                images = random_shift(images, self.image_config.augment_pad, generator)
            images = images_to_float_nchw(images)
            backbone = self._frozen_backbones.get(key)
            if backbone is not None:
                with torch.no_grad():
                    images = backbone(images)
            prepared[key] = images
        return prepared

    def encode(self, prepared: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Stage 2: the trainable camera encoders, concatenated after the state vector."""
        parts = [prepared["state"]] if self.state_keys else []
        parts += [self.cameras[self._module_name(key)](prepared[key]) for key in self.image_keys]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(
        self,
        observation: Mapping[str, torch.Tensor],
        augment: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """``[B, ...]`` fields -> ``[B, output_dim]``; DrQ shift only when ``augment`` (training)."""
        return self.encode(self.prepare(observation, augment, generator))


def observation_to_torch(
    observation: Mapping[str, np.ndarray], keys: tuple[str, ...], device: torch.device | str = "cpu",
    add_batch_dim: bool = False,
) -> dict[str, torch.Tensor]:
    """numpy fields -> tensors on ``device`` without changing dtypes (uint8 images stay uint8)."""
    tensors = {}
    for key in keys:
        value = np.ascontiguousarray(observation[key])
        if not value.flags.writeable:  # e.g. a view of a received message's bytes
            value = value.copy()
        array = torch.from_numpy(value)
        if add_batch_dim:
            array = array.unsqueeze(0)
        tensors[key] = array.to(device, non_blocking=True)
    return tensors
