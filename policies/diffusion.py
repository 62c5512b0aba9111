r"""A diffusion policy over action chunks, trained by behaviour cloning on recorded demonstrations.

Notation: ``H`` = ``horizon`` (actions per chunk), ``A`` = action dimension, ``n`` = ``n_obs``
(observations of history), ``T`` = ``train_timesteps``. At time ``t`` of an episode the policy
sees the history ``o = (o_{t-n+1}, ..., o_t)`` and models the chunk ``x_0 = (a_t, ..., a_{t+H-1})``
in ``[-1, 1]^{H x A}``. The history is encoded by an :class:`~policies.encoders.ObservationEncoder`
per observation (standardised state fields, a CNN per camera) and flattened: ``c = [phi(o_{t-n+1}),
..., phi(o_t)]``.

Forward (noising) process, DDPM (Ho et al. 2020), with the cosine schedule of Nichol & Dhariwal
(``squaredcos_cap_v2``: ``alpha_bar_t = f(t) / f(0)``, ``f(t) = cos^2((t / T + s) / (1 + s) *
pi / 2)``, ``s = 0.008``, each ``beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}`` capped at 0.999)::

    q(x_t | x_0) = N( sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I ),   t in {0, ..., T-1}
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,           eps ~ N(0, I)

Training (epsilon prediction): a denoiser ``eps_theta(x_t, t, c)`` minimises::

    L(theta) = E_{(o, x_0) ~ demos, t ~ U{0..T-1}, eps ~ N(0, I)} || eps - eps_theta(x_t, t, c) ||^2

The weights used for sampling are an exponential moving average of theta
(``torch.optim.swa_utils.AveragedModel`` with torch's EMA update, its decay warmed up: after ``k``
updates ``theta_ema <- d theta_ema + (1 - d) theta`` with ``d = min(ema_decay, 1 - (1 + k)^-ema_power)``).

Sampling starts from ``x_T ~ N(0, I)`` and walks the chain backwards with the predicted noise; at
every step the implied clean chunk ``x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta) /
sqrt(alpha_bar_t)`` is clipped to ``[-1, 1]`` (``clip_sample``):

- DDPM (ancestral; ``sampler="ddpm"``, all ``T`` steps by default)::

      x_{t-1} ~ N( mu_t(x_t, x0_hat), sigma_t^2 I ),
      mu_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0_hat
             + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t,
      sigma_t^2 = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t

- DDIM with ``eta = 0`` (Song et al. 2021; ``sampler="ddim"``, ``S = inference_steps`` steps
  ``t > t'`` on the strided subsequence ``(S-1) k, ..., k, 0`` of ``{0..T-1}``, ``k = T // S``; the
  step from ``t = 0`` lands on ``x0_hat``), a deterministic map of ``x_T``::

      x_{t'} = sqrt(alpha_bar_{t'}) x0_hat + sqrt(1 - alpha_bar_{t'}) eps_theta(x_t, t, c)

Both schedulers are diffusers' (``DDPMScheduler`` for training and DDPM sampling, a
``DDIMScheduler`` built from the same config). ``deterministic=True`` runs DDIM from ``x_T = 0``,
so all ``K`` samples of an observation are one and the same chunk; stochastic sampling denoises
``B * K`` chunks in one batched loop. Samples are clipped to ``[-1, 1]``.

The denoiser is an MLP-ResNet: the flattened noisy chunk goes through residual blocks
``h <- h + W_2 mish(W_1 FiLM(LayerNorm(h); z))`` where ``z = MLP([c, emb(t)])`` and ``emb`` is the
sinusoidal timestep embedding; ``FiLM(u; z) = u * (1 + gamma(z)) + beta(z)`` (``gamma``, ``beta``
start at zero).

Acting (receding horizon): :class:`DiffusionActor` keeps the last ``n`` observations of the
episode (the first one repeated after a reset), samples a chunk, executes its first
``action_steps`` actions and then re-plans.

Data: :func:`load_demonstrations` reads a demo buffer saved by ``steerl record-demos`` (the replay
format of ``learner/replay.py``) or a list of rollout episodes (``actor.rollout.Episode``) into
:class:`Demonstrations`; training windows ``(o_{t-n+1..t}, a_{t..t+H-1})`` are gathered for a batch
of steps ``t`` at once, the history padded at an episode's start by repeating its first
observation and the chunk padded at its end by repeating its last action.

Files: ``policy.json`` (``kind: diffusion``, the config, the spaces, the observation keys) and
``model.safetensors`` (the EMA weights, state-standardisation statistics included).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import Timesteps
from gymnasium import spaces
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from hardware_configs.loader import ConfigError, load_dataclass, load_yaml, to_dict
from hardware_configs.schema import ImageEncoderConfig
from learner.replay import FORMAT_NAME as REPLAY_FORMAT
from learner.replay import FORMAT_VERSION as REPLAY_FORMAT_VERSION
from learner.replay import ReplayFormatError
from policies.base import (
    POLICY_FILE,
    Policy,
    PolicyInput,
    SeededGenerators,
    load_module_weights,
    observations_to_tensors,
    read_policy_file,
    register_policy,
    save_module_weights,
    write_policy_file,
)
from policies.encoders import ObservationEncoder
from transport.spaces import RobotSpaces

log = logging.getLogger("steerl.diffusion")

SAMPLERS = ("ddim", "ddpm")
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")
LR_SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup"}  # ours -> diffusers' name
_ACTION_LIMIT = 1.0 + 1e-6


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffusionPolicyConfig:
    """Hyper-parameters of the diffusion policy and of its behaviour-cloning training.

    Every value is checked at construction; an invalid one raises ``ValueError`` naming the field
    (``DiffusionPolicyConfig.horizon: ...``). YAML files load with :func:`load_diffusion_config`.
    """

    # -- what the policy sees and predicts
    #: actions per predicted chunk (H).
    horizon: int = 16
    #: observations of history the denoiser is conditioned on (n_obs), the current one included.
    n_obs: int = 2
    #: actions of each chunk executed before re-planning (DiffusionActor); at most ``horizon``.
    action_steps: int = 8
    #: observation fields the policy sees (empty: all fields of the demonstrations).
    observation_keys: tuple[str, ...] = ()
    #: how camera fields are encoded (a small CNN trained with the denoiser, or a frozen backbone).
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    #: standardise the state fields with statistics measured on the demonstrations.
    normalize_state: bool = True
    #: floor of a state feature's standard deviation.
    state_min_std: float = 0.01

    # -- the denoiser (MLP-ResNet with FiLM conditioning)
    hidden_dim: int = 256
    num_blocks: int = 3
    #: width of the sinusoidal timestep embedding.
    timestep_dim: int = 64
    dropout: float = 0.0

    # -- the noise schedule and sampling
    train_timesteps: int = 100
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"
    #: ``ddim`` (``inference_steps`` deterministic steps) or ``ddpm`` (ancestral, all train timesteps).
    sampler: Literal["ddim", "ddpm"] = "ddim"
    #: denoising steps of the DDIM sampler.
    inference_steps: int = 10

    # -- training
    lr: float = 3e-4
    weight_decay: float = 1e-6
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_warmup_steps: int = 100
    batch_size: int = 256
    #: gradients are clipped to this global norm (0: no clipping).
    grad_clip_norm: float = 1.0
    #: upper bound of the EMA decay; the decay warms up as ``1 - (1 + step)^-ema_power``.
    ema_decay: float = 0.9999
    ema_power: float = 0.75

    def __post_init__(self) -> None:
        def need(condition: bool, name: str, rule: str) -> None:
            if not condition:
                raise ValueError(f"{type(self).__name__}.{name}: {rule}, got {getattr(self, name)!r}")

        for name in ("horizon", "n_obs", "action_steps", "hidden_dim", "num_blocks", "train_timesteps",
                     "inference_steps", "batch_size"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(self.action_steps <= self.horizon, "action_steps", f"must not exceed horizon ({self.horizon})")
        need(_is_int(self.timestep_dim) and self.timestep_dim >= 2 and self.timestep_dim % 2 == 0,
             "timestep_dim", "must be an even integer >= 2")
        need(self.inference_steps <= self.train_timesteps, "inference_steps",
             f"must not exceed train_timesteps ({self.train_timesteps})")
        need(self.sampler in SAMPLERS, "sampler", f"must be one of {SAMPLERS}")
        need(self.beta_schedule in BETA_SCHEDULES, "beta_schedule", f"must be one of {BETA_SCHEDULES}")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {tuple(LR_SCHEDULES)}")
        need(0.0 <= self.dropout < 1.0, "dropout", "must lie in [0, 1)")
        need(self.lr > 0.0, "lr", "must be positive")
        need(self.weight_decay >= 0.0, "weight_decay", "must be non-negative")
        need(_is_int(self.lr_warmup_steps) and self.lr_warmup_steps >= 0, "lr_warmup_steps",
             "must be an integer >= 0")
        need(self.grad_clip_norm >= 0.0, "grad_clip_norm", "must be non-negative (0: no clipping)")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "must lie in [0, 1)")
        need(self.ema_power > 0.0, "ema_power", "must be positive")
        need(self.state_min_std > 0.0, "state_min_std", "must be positive")
        need(all(isinstance(key, str) and key for key in self.observation_keys), "observation_keys",
             "must be non-empty field names")
        try:
            self.image_encoder.validate()
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}.image_encoder: {error}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_diffusion_config(path: str | Path) -> DiffusionPolicyConfig:
    """A :class:`DiffusionPolicyConfig` from a YAML file; every error names the file and the field."""
    try:
        return load_yaml(DiffusionPolicyConfig, path)
    except ConfigError:
        raise
    except ValueError as error:  # a range check of __post_init__
        raise ConfigError(f"{path}: {error}") from None


def _config_from_dict(data: Any, source: str) -> DiffusionPolicyConfig:
    try:
        return load_dataclass(DiffusionPolicyConfig, data, source)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None


# --------------------------------------------------------------------------------------------
# Demonstrations and training windows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Demonstrations:
    """Recorded episodes as flat per-step arrays, episodes back to back.

    Row ``i`` is one executed step: the observation the action was chosen on and that action.

    Attributes:
        observations: field -> ``[N, ...]`` (dtypes as recorded; images uint8).
        actions: float32 ``[N, A]`` in ``[-1, 1]``.
        episode_starts: int64 ``[E]``, the first row of each episode (``episode_starts[0] == 0``).
        observation_space: the fields' ``spaces.Dict``.
    """

    observations: dict[str, np.ndarray]
    actions: np.ndarray
    episode_starts: np.ndarray
    observation_space: spaces.Dict

    def __post_init__(self) -> None:
        rows = len(self.actions)
        if self.actions.ndim != 2 or rows == 0:
            raise ValueError(f"demonstrations need a non-empty [N, A] action array, got {self.actions.shape}")
        for key, values in self.observations.items():
            if len(values) != rows:
                raise ValueError(f"observation field {key!r} has {len(values)} rows, the actions {rows}")
        starts = self.episode_starts
        if starts.ndim != 1 or len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= rows:
            raise ValueError("episode_starts must be strictly increasing row numbers starting at 0")
        if not np.all(np.isfinite(self.actions)) or np.abs(self.actions).max() > _ACTION_LIMIT:
            raise ValueError("demonstration actions must be finite and lie in [-1, 1] (the normalised action space)")

    @property
    def num_steps(self) -> int:
        return len(self.actions)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_starts)

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    @cached_property
    def _episode_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the first and the last row of its episode."""
        lengths = np.diff(np.append(self.episode_starts, self.num_steps))
        first = np.repeat(self.episode_starts, lengths)
        last = np.repeat(self.episode_starts + lengths - 1, lengths)
        return first, last

    def window_indices(self, rows: np.ndarray, n_obs: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers of the windows at ``rows``: the history ``[B, n_obs]`` (oldest first, clamped
        to the episode's first row) and the chunk ``[B, horizon]`` (clamped to its last row)."""
        rows = np.asarray(rows, dtype=np.int64)
        first, last = self._episode_bounds
        history = np.maximum(rows[:, None] + np.arange(1 - n_obs, 1), first[rows][:, None])
        chunk = np.minimum(rows[:, None] + np.arange(horizon), last[rows][:, None])
        return history, chunk

    def windows(self, rows: np.ndarray, n_obs: int, horizon: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The training windows at ``rows``: observation histories (field -> ``[B, n_obs, ...]``)
        and action chunks (float32 ``[B, horizon, A]``), gathered without a per-row loop."""
        history, chunk = self.window_indices(rows, n_obs, horizon)
        return {key: values[history] for key, values in self.observations.items()}, self.actions[chunk]


DemoSource = Union[Demonstrations, str, os.PathLike, Sequence[Any]]


def load_demonstrations(
    source: DemoSource,
    observation_keys: Sequence[str] = (),
    observation_space: Optional[spaces.Dict] = None,
) -> Demonstrations:
    """Demonstrations from a saved demo buffer directory (``steerl record-demos``, the format of
    ``learner/replay.py``) or from a list of rollout episodes (``actor.rollout.Episode``, or any
    object with ``steps`` of ``(observation, action, reward, next_observation, terminated,
    truncated)``, or such step lists themselves).

    ``observation_keys`` keeps only those fields (empty: all; from a buffer, only those are read).
    ``observation_space`` describes the episodes' fields; without it, it is inferred from the arrays
    (uint8 ``[0, 255]``, other dtypes their full range). A buffer carries its own space.
    """
    if isinstance(source, Demonstrations):
        demos = source
    elif isinstance(source, (str, os.PathLike)):
        demos = _demonstrations_from_buffer(Path(source), tuple(observation_keys))
    else:
        demos = _demonstrations_from_episodes(source, observation_space)
    keys = tuple(observation_keys)
    if not keys:
        return demos
    missing = [key for key in keys if key not in demos.observations]
    if missing:
        raise KeyError(f"observation fields {missing} are not in the demonstrations "
                       f"(they have: {', '.join(sorted(demos.observations))})")
    return dataclasses.replace(
        demos, observations={key: demos.observations[key] for key in keys},
        observation_space=spaces.Dict({key: demos.observation_space[key] for key in keys}),
    )


def _demonstrations_from_episodes(episodes: Sequence[Any], observation_space: Optional[spaces.Dict]) -> Demonstrations:
    step_lists = [list(getattr(episode, "steps", episode)) for episode in episodes]
    step_lists = [steps for steps in step_lists if steps]
    if not step_lists:
        raise ValueError("no demonstration steps: the episode list is empty")
    steps = [step for episode_steps in step_lists for step in episode_steps]
    keys = tuple(steps[0][0])
    observations = {key: np.stack([np.asarray(step[0][key]) for step in steps]) for key in keys}
    actions = np.stack([np.asarray(step[1], dtype=np.float32) for step in steps])
    starts = np.cumsum([0] + [len(episode_steps) for episode_steps in step_lists[:-1]]).astype(np.int64)
    if observation_space is None:
        observation_space = spaces.Dict({key: _box_of(values[0]) for key, values in observations.items()})
    return Demonstrations(observations, actions, starts, observation_space)


def _box_of(example: np.ndarray) -> spaces.Box:
    """The space of a field known only by an example: uint8 ``[0, 255]``; other types span their
    dtype's finite range (finite bounds keep ``policy.json`` strict JSON)."""
    if example.dtype == np.uint8:
        return spaces.Box(0, 255, example.shape, np.uint8)
    limits = np.finfo(example.dtype) if np.issubdtype(example.dtype, np.floating) else np.iinfo(example.dtype)
    return spaces.Box(limits.min, limits.max, example.shape, example.dtype)


def _demonstrations_from_buffer(directory: Path, keys: tuple[str, ...] = ()) -> Demonstrations:
    """Episodes of a saved replay buffer (see the "On-disk format" of ``learner/replay.py``).

    The valid rows are ordered by actor stream and add order; an episode continues while a row's
    ``next_obs`` slot is the next row's ``obs`` slot of the same stream and the row neither
    terminated nor was truncated (the buffer reuses that slot exactly when the chain continues).
    Only the observation fields ``keys`` are read (all when empty; unknown ones are left for the
    caller to report).
    """
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (not a demo buffer saved by 'steerl record-demos')")
    try:
        meta = json.loads(meta_path.read_text())
        if (meta.get("format"), meta.get("format_version")) != (REPLAY_FORMAT, REPLAY_FORMAT_VERSION):
            raise ReplayFormatError(meta_path, f"format {meta.get('format')!r} version {meta.get('format_version')!r} "
                                               f"is not {REPLAY_FORMAT!r} version {REPLAY_FORMAT_VERSION}")
        fields = {entry["name"]: entry for entry in meta["observation_fields"]
                  if not keys or entry["name"] in keys}
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        if isinstance(error, ReplayFormatError):
            raise
        raise ReplayFormatError(meta_path, f"bad metadata: {error!r}") from None

    def read(name: str) -> np.ndarray:
        path = directory / name
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ReplayFormatError(path, f"unreadable: {error}") from None
        expected = files.get(name, {}).get("crc32")
        if expected is not None and zlib.crc32(np.ascontiguousarray(array).data) != expected:
            raise ReplayFormatError(path, "checksum mismatch (corrupt file)")
        return array

    rows = np.flatnonzero(np.asarray(read("valid.npy"), dtype=bool))
    if rows.size == 0:
        raise ReplayFormatError(directory, "the buffer holds no transitions")
    stream_ids = read("stream_id.npy")
    rows = rows[np.lexsort((read("add_index.npy")[rows], stream_ids[rows]))]  # by stream, then add order
    stream = stream_ids[rows]
    obs_slot, next_slot = read("obs_index.npy")[rows], read("next_obs_index.npy")[rows]
    ended = read("terminated.npy")[rows] | read("truncated.npy")[rows]
    continues = (stream[1:] == stream[:-1]) & ~ended[:-1] & (next_slot[:-1] == obs_slot[1:])
    starts = np.flatnonzero(np.concatenate([[True], ~continues])).astype(np.int64)
    observations = {}
    for key, entry in fields.items():
        frames = read(entry["file"])
        if frames.ndim < 1 or obs_slot.max() >= len(frames):
            raise ReplayFormatError(directory / entry["file"], "fewer frames than the transitions reference")
        observations[key] = np.asarray(frames[obs_slot])
    actions = np.asarray(read("actions.npy")[rows], dtype=np.float32)
    observation_space = spaces.Dict({key: _box_of_field(entry) for key, entry in fields.items()})
    try:
        return Demonstrations(observations, actions, starts, observation_space)
    except ValueError as error:
        raise ReplayFormatError(directory, str(error)) from None


def _box_of_field(entry: Mapping[str, Any]) -> spaces.Box:
    """A field of a buffer's ``observation_fields`` (bounds a number or nested lists) as a Box."""
    shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
    low = np.broadcast_to(np.asarray(entry["low"], dtype), shape).copy()
    high = np.broadcast_to(np.asarray(entry["high"], dtype), shape).copy()
    return spaces.Box(low, high, shape, dtype)


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


class FiLMResidualBlock(nn.Module):
    """``h + W_2 mish(W_1 (LayerNorm(h) * (1 + gamma(z)) + beta(z)))`` (FiLM starts as identity)."""

    def __init__(self, width: int, condition_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = nn.Linear(condition_dim, 2 * width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.Mish(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))

    def forward(self, hidden: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[B * K, width]``, grouped by condition row; ``condition`` ``[B, condition_dim]``."""
        scale, shift = self.film(condition).repeat_interleave(hidden.shape[0] // condition.shape[0], dim=0).chunk(2, -1)
        return hidden + self.mlp(self.norm(hidden) * (1.0 + scale) + shift)


class ConditionalResidualMLP(nn.Module):
    """The denoiser ``eps_theta(x_t, t, c)``: noisy chunks ``[B * K, H, A]``, integer timesteps ``[B]``
    and conditions ``[B, condition_dim]`` -> predicted noise ``[B * K, H, A]``.

    Each (condition, timestep) row serves ``K`` consecutive chunks (K candidates of one observation
    while sampling, K = 1 in training): the conditioning path runs once per row, not per chunk.
    """

    def __init__(self, horizon: int, action_dim: int, condition_dim: int, hidden_dim: int, num_blocks: int,
                 timestep_dim: int, dropout: float) -> None:
        super().__init__()
        self.timestep_embedding = Timesteps(timestep_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.condition = nn.Sequential(nn.Linear(condition_dim + timestep_dim, hidden_dim), nn.Mish(),
                                       nn.Linear(hidden_dim, hidden_dim))
        self.input = nn.Linear(horizon * action_dim, hidden_dim)
        self.blocks = nn.ModuleList(FiLMResidualBlock(hidden_dim, hidden_dim, dropout) for _ in range(num_blocks))
        self.output = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Mish(), nn.Linear(hidden_dim, horizon * action_dim))

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if noisy.shape[0] % condition.shape[0] or timesteps.shape[0] != condition.shape[0]:
            raise ValueError(f"{noisy.shape[0]} chunks, {timesteps.shape[0]} timesteps and {condition.shape[0]} "
                             f"conditions: expected K chunks per (timestep, condition) row")
        embedded = self.timestep_embedding(timesteps).to(condition.dtype)
        z = self.condition(torch.cat([condition, embedded], dim=-1))
        hidden = self.input(noisy.flatten(1))
        for block in self.blocks:
            hidden = block(hidden, z)
        return self.output(hidden).view_as(noisy)


class DiffusionNetwork(nn.Module):
    """Everything with weights: the observation encoder and the denoiser."""

    def __init__(self, config: DiffusionPolicyConfig, observation_space: spaces.Dict, action_dim: int) -> None:
        super().__init__()
        self.n_obs = config.n_obs
        self.encoder = ObservationEncoder(observation_space, config.observation_keys, config.image_encoder)
        self.denoiser = ConditionalResidualMLP(
            config.horizon, action_dim, config.n_obs * self.encoder.output_dim, config.hidden_dim,
            config.num_blocks, config.timestep_dim, config.dropout,
        )

    def condition(
        self, history: Mapping[str, torch.Tensor], augment: bool = False, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Observation histories (field -> ``[B, n_obs, ...]``) -> ``c``, ``[B, n_obs * features]``."""
        batch = next(iter(history.values())).shape[0]
        flat = {key: value.flatten(0, 1) for key, value in history.items()}
        return self.encoder(flat, augment, generator).reshape(batch, -1)


# --------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------


def make_noise_scheduler(config: DiffusionPolicyConfig) -> DDPMScheduler:
    """diffusers' DDPM scheduler of ``config``: epsilon prediction, predicted clean samples clipped to
    ``[-1, 1]``. Training adds noise with it; ``sampler="ddpm"`` samples with it."""
    return DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule=config.beta_schedule,
                         clip_sample=True, clip_sample_range=1.0, prediction_type="epsilon")


def make_ddim_scheduler(noise_scheduler: DDPMScheduler) -> DDIMScheduler:
    """diffusers' DDIM scheduler built from the DDPM scheduler's config (the same noise schedule;
    ``S`` inference steps visit ``t = (S - 1) k, ..., k, 0`` with ``k = T // S``)."""
    return DDIMScheduler.from_config(noise_scheduler.config)


@register_policy("diffusion")
class DiffusionPolicy(Policy):
    """The diffusion policy (see the module docstring).

    Args:
        config: architecture, schedule and sampling settings.
        observation_space: the observation ``spaces.Dict`` (fields beyond ``config.observation_keys``
            are ignored).
        action_space: ``Box(-1, 1, (A,))``.
        seed: seeds the initial weights and the policy's own sampling generator.

    Attributes:
        network: the encoder and the denoiser; after :func:`train_diffusion_policy`, the EMA weights.
        info: JSON-able notes kept in ``policy.json`` (the trainer records what it trained on).
    """

    def __init__(self, config: DiffusionPolicyConfig, observation_space: spaces.Dict, action_space: spaces.Box,
                 seed: int = 0) -> None:
        if len(action_space.shape) != 1 or not (np.all(action_space.low == -1.0) and np.all(action_space.high == 1.0)):
            raise ValueError("DiffusionPolicy needs a flat action Box with bounds [-1, 1]")
        self.config = config
        self.spaces = RobotSpaces.from_gym(observation_space, action_space)
        self.action_dim = int(action_space.shape[0])
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = DiffusionNetwork(config, observation_space, self.action_dim).eval()
        self.observation_keys: tuple[str, ...] = self.network.encoder.keys
        self.noise_scheduler = make_noise_scheduler(config)
        self._samplers = {"ddpm": make_noise_scheduler(config), "ddim": make_ddim_scheduler(self.noise_scheduler)}
        self._generator = SeededGenerators(seed)
        self.info: dict[str, Any] = {}

    @property
    def horizon(self) -> int:
        return self.config.horizon

    @property
    def n_obs(self) -> int:
        return self.config.n_obs

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def to(self, device: torch.device | str) -> "DiffusionPolicy":
        self.network.to(device)
        return self

    # -- sampling -----------------------------------------------------------------------------------

    def sample(
        self,
        observations: PolicyInput,
        num_samples: int,
        deterministic: bool = False,
        *,
        sampler: Optional[str] = None,
        inference_steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """The first action of each sampled chunk, ``[B, K, A]`` (see :meth:`sample_chunks`)."""
        return self.sample_chunks(observations, num_samples, deterministic, sampler=sampler,
                                  inference_steps=inference_steps, generator=generator)[:, :, 0]

    def sample_chunks(
        self,
        observations: PolicyInput,
        num_samples: int,
        deterministic: bool = False,
        *,
        sampler: Optional[str] = None,
        inference_steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """``num_samples`` action chunks per observation history, ``[B, K, H, A]`` in ``[-1, 1]``.

        Each field of ``observations`` is ``[B, n_obs, ...]`` (a history, oldest first) or ``[B,
        ...]`` (one observation, used as a history of ``n_obs`` copies, as right after a reset).

        ``sampler`` (default ``config.sampler``): ``"ddim"`` runs ``inference_steps`` (default
        ``config.inference_steps``) DDIM steps with ``eta = 0``; ``"ddpm"`` runs ancestral sampling
        over ``inference_steps`` (default: all ``train_timesteps``) steps. ``deterministic=True``
        runs DDIM from zero noise (``inference_steps`` steps; DDPM's count for ``sampler="ddpm"``)
        and repeats the chunk ``K`` times. Random draws come from ``generator`` or the policy's
        own seeded generator for its device. No gradient.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        sampler = sampler or self.config.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if inference_steps is None:
            inference_steps = self.config.inference_steps if sampler == "ddim" else self.config.train_timesteps
        if not 1 <= inference_steps <= self.config.train_timesteps:
            raise ValueError(f"inference_steps must lie in [1, {self.config.train_timesteps}], got {inference_steps}")
        device = self.device
        history = self._history_tensors(observations, device)
        with torch.no_grad():
            condition = self.network.condition(history)
            batch = condition.shape[0]
            shape = (self.config.horizon, self.action_dim)
            if deterministic:
                start = torch.zeros((batch, *shape), device=device, dtype=condition.dtype)
                chunks = self._denoise(start, condition, "ddim", inference_steps, None)
                return chunks[:, None].expand(batch, num_samples, *shape)
            generator = generator or self._generator(device)
            start = torch.randn((batch * num_samples, *shape), generator=generator, device=device,
                                dtype=condition.dtype)
            chunks = self._denoise(start, condition, sampler, inference_steps, generator)
            return chunks.reshape(batch, num_samples, *shape)

    def _denoise(self, sample: torch.Tensor, condition: torch.Tensor, sampler: str, steps: int,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
        """Run the reverse chain from ``sample`` (``x_T``, ``[B * K, H, A]``) with the named scheduler."""
        # set_timesteps rebinds the scheduler's step state: a shallow copy per call keeps
        # concurrent sampling (e.g. a policy server's threads) apart; the schedule tensors are shared.
        scheduler = copy.copy(self._samplers[sampler])
        scheduler.set_timesteps(steps)
        timesteps = torch.empty(condition.shape[0], dtype=torch.long, device=sample.device)
        for t in scheduler.timesteps.tolist():
            noise = self.network.denoiser(sample, timesteps.fill_(t), condition)
            sample = scheduler.step(noise, t, sample, generator=generator).prev_sample
        return sample.clamp(-1.0, 1.0)

    def _history_tensors(self, observations: PolicyInput, device: torch.device) -> dict[str, torch.Tensor]:
        tensors = observations_to_tensors(observations, self.observation_keys, device)
        batch_sizes = {value.shape[0] for value in tensors.values()}
        if len(batch_sizes) != 1:
            raise ValueError(f"observation fields have different batch sizes: "
                             f"{ {key: tuple(value.shape) for key, value in tensors.items()} }")
        history = {}
        for key, value in tensors.items():
            event_shape = tuple(self.network.encoder.observation_space[key].shape)
            if tuple(value.shape[1:]) == event_shape:
                value = value.unsqueeze(1).expand(value.shape[0], self.n_obs, *event_shape)
            elif tuple(value.shape[1:]) != (self.n_obs, *event_shape):
                raise ValueError(f"observation field {key!r}: expected [B, {self.n_obs}, *{event_shape}] (a history) "
                                 f"or [B, *{event_shape}], got {tuple(value.shape)}")
            history[key] = value
        return history

    # -- training -----------------------------------------------------------------------------------

    def loss(self, history: Mapping[str, torch.Tensor], chunks: torch.Tensor,
             generator: Optional[torch.Generator] = None, augment: bool = True) -> torch.Tensor:
        """The epsilon-prediction loss of :attr:`network` on a batch of windows: histories (field ->
        ``[B, n_obs, ...]``) and clean chunks ``[B, H, A]``. ``augment``: DrQ shift of camera images."""
        condition = self.network.condition(history, augment, generator)
        noise = torch.randn(chunks.shape, generator=generator, device=chunks.device, dtype=chunks.dtype)
        timesteps = torch.randint(0, self.config.train_timesteps, (chunks.shape[0],), generator=generator,
                                  device=chunks.device)
        noisy = self.noise_scheduler.add_noise(chunks, noise, timesteps)
        return F.mse_loss(self.network.denoiser(noisy, timesteps, condition), noise)

    def supervised_loss(self, observations: PolicyInput, actions: torch.Tensor,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """:meth:`loss` for target actions given observations in :meth:`sample`'s format (the
        interface of ``learner/parl.py``'s distillation): each field ``[B, n_obs, ...]`` or ``[B,
        ...]``; ``actions`` ``[B, A]`` (one action per observation, the chunk's first) or whole chunks
        ``[B, H, A]``. A single action becomes a constant chunk (the action repeated ``H`` times):
        with ``horizon`` 1, the setting of a critic that scores single actions, that is the plain
        denoising loss of that action; with ``H > 1`` it also pulls the chunk's later actions
        towards it, which suits re-planning after every action (``action_steps`` 1)."""
        device = self.device
        history = self._history_tensors(observations, device)
        actions = actions.to(device=device, dtype=torch.float32)
        if actions.dim() == 2 and actions.shape[1] == self.action_dim:
            chunks = actions[:, None].expand(-1, self.horizon, -1)
        elif actions.dim() == 3 and tuple(actions.shape[1:]) == (self.horizon, self.action_dim):
            chunks = actions
        else:
            raise ValueError(f"actions must be [B, {self.action_dim}] or [B, {self.horizon}, {self.action_dim}], "
                             f"got {tuple(actions.shape)}")
        return self.loss(history, chunks.contiguous(), generator)

    # -- files --------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        directory = write_policy_file(
            directory, self.kind, format=1, config=to_dict(self.config), spaces=self.spaces.to_json(),
            observation_keys=list(self.observation_keys), action_dim=self.action_dim, seed=self.seed,
            info=self.info,
        )
        save_module_weights(self.network, directory)

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "DiffusionPolicy":
        content = read_policy_file(directory)
        path = Path(directory) / POLICY_FILE
        if content["kind"] != cls.kind:
            raise ValueError(f"{path}: kind {content['kind']!r} is not {cls.kind!r}")
        try:
            config = _config_from_dict(content["config"], f"{path}: config")
            robot_spaces = RobotSpaces.from_json(content["spaces"])
            action_dim = int(content["action_dim"])
            seed = int(content.get("seed", 0))
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ValueError(f"{path}: malformed diffusion policy description ({error!r})") from None
        if tuple(robot_spaces.action.shape) != (action_dim,):
            raise ValueError(f"{path}: action_dim {action_dim} disagrees with the action space "
                             f"shape {list(robot_spaces.action.shape)}")
        policy = cls(config, robot_spaces.observation_space(), robot_spaces.action_space(), seed=seed)
        load_module_weights(policy.network, directory)
        policy.info = dict(content.get("info", {}))
        return policy.to(device)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def ema_decay_at(update: int, max_decay: float, power: float) -> float:
    """EMA decay after ``update`` averaged updates: ``min(max_decay, 1 - (1 + update)^-power)``.
    Early weights are forgotten quickly, so a short run is not dominated by its initialisation."""
    return min(max_decay, 1.0 - (1.0 + update) ** -power)


def ema_with_warmup(max_decay: float, power: float) -> Callable[..., None]:
    """A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: torch's EMA update
    (``get_ema_multi_avg_fn``) with the decay of :func:`ema_decay_at` for the update count."""

    def average(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor | int) -> None:
        get_ema_multi_avg_fn(ema_decay_at(int(num_averaged), max_decay, power))(averaged, current, num_averaged)

    return average


def train_diffusion_policy(
    config: DiffusionPolicyConfig,
    demonstrations: DemoSource,
    steps: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log_every: int = 100,
    progress: Optional[Callable[[int, float], None]] = None,
) -> DiffusionPolicy:
    """Behaviour cloning: fit a :class:`DiffusionPolicy` to demonstrations by ``steps`` AdamW steps.

    ``demonstrations``: anything :func:`load_demonstrations` takes (a demo buffer directory, a list
    of rollout episodes, or :class:`Demonstrations`), restricted to ``config.observation_keys``.
    Each step draws ``batch_size`` windows uniformly over all recorded steps. Every ``log_every``
    steps (and at the last) the mean loss since the previous report is logged and passed to
    ``progress(step, loss)``. The returned policy holds the EMA weights, in eval mode, on ``device``.
    Seeded: the same inputs give the same policy.
    """
    from diffusers.optimization import get_scheduler

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if log_every < 1:
        raise ValueError(f"log_every must be at least 1, got {log_every}")
    demos = load_demonstrations(demonstrations, config.observation_keys)
    action_space = spaces.Box(-1.0, 1.0, (demos.action_dim,), np.float32)
    policy = DiffusionPolicy(config, demos.observation_space, action_space, seed=seed)
    encoder = policy.network.encoder
    if config.normalize_state and encoder.state_keys:
        encoder.set_state_normalization(encoder.state_vector(demos.observations), config.state_min_std)
    device = torch.device(device)
    network = policy.to(device).network.train()

    parameters = [parameter for parameter in network.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    lr_schedule = get_scheduler(LR_SCHEDULES[config.lr_schedule], optimizer,
                                num_warmup_steps=min(config.lr_warmup_steps, steps), num_training_steps=steps)
    ema = AveragedModel(network, multi_avg_fn=ema_with_warmup(config.ema_decay, config.ema_power), use_buffers=True)
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    log.info("training a diffusion policy on %d steps of %d episodes: %d updates of %d windows (H=%d, n_obs=%d)",
             demos.num_steps, demos.num_episodes, steps, config.batch_size, config.horizon, config.n_obs)

    running, since, started, final_loss = torch.zeros((), device=device), 0, time.perf_counter(), math.nan
    for step in range(1, steps + 1):
        history, chunks = demos.windows(rng.integers(0, demos.num_steps, config.batch_size), config.n_obs,
                                        config.horizon)
        history_tensors = observations_to_tensors(history, tuple(history), device)
        loss = policy.loss(history_tensors, torch.from_numpy(chunks).to(device), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip_norm > 0.0:
            nn.utils.clip_grad_norm_(parameters, config.grad_clip_norm)
        optimizer.step()
        lr_schedule.step()
        ema.update_parameters(network)
        running += loss.detach()
        since += 1
        if step % log_every == 0 or step == steps:
            mean_loss = float(running) / since
            log.info("step %d/%d: loss %.4f (%.1f steps/s)", step, steps, mean_loss,
                     step / (time.perf_counter() - started))
            if progress is not None:
                progress(step, mean_loss)
            running.zero_()
            since = 0
            final_loss = mean_loss

    network.load_state_dict(ema.module.state_dict())
    network.eval()
    policy.info = {"steps": steps, "seed": seed, "demo_steps": demos.num_steps, "demo_episodes": demos.num_episodes,
                   "final_loss": final_loss}
    return policy


# --------------------------------------------------------------------------------------------
# Acting step by step
# --------------------------------------------------------------------------------------------


class ObservationHistory:
    """The last ``n_obs`` observations of an episode, oldest first.

    After :meth:`reset`, the first :meth:`push` fills the whole history with that observation (the
    same padding as the training windows).
    """

    def __init__(self, n_obs: int) -> None:
        if n_obs < 1:
            raise ValueError(f"n_obs must be at least 1, got {n_obs}")
        self.n_obs = n_obs
        self._frames: deque[dict[str, np.ndarray]] = deque(maxlen=n_obs)

    def reset(self) -> None:
        self._frames.clear()

    def push(self, observation: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add the newest observation; returns the history, field -> ``[n_obs, ...]``."""
        frame = {key: np.array(value, copy=True) for key, value in observation.items()}
        if not self._frames:
            self._frames.extend(frame for _ in range(self.n_obs))
        else:
            self._frames.append(frame)
        return {key: np.stack([past[key] for past in self._frames]) for key in frame}


class DiffusionActor:
    """Drives an environment with a :class:`DiffusionPolicy`, one step at a time.

    Keeps the episode's observation history and a queue of planned actions: when the queue is empty
    it samples one chunk for the current history and queues its first ``action_steps`` actions.
    Call :meth:`reset` at the start of every episode.

    Args:
        policy: the trained policy.
        action_steps: actions executed per chunk (default ``policy.config.action_steps``).
        deterministic: plan with deterministic DDIM instead of a random sample.
        sampler, inference_steps: passed to :meth:`DiffusionPolicy.sample_chunks`.
    """

    def __init__(self, policy: DiffusionPolicy, action_steps: Optional[int] = None, deterministic: bool = False,
                 sampler: Optional[str] = None, inference_steps: Optional[int] = None) -> None:
        self.policy = policy
        self.action_steps = policy.config.action_steps if action_steps is None else action_steps
        if not 1 <= self.action_steps <= policy.horizon:
            raise ValueError(f"action_steps must lie in [1, horizon={policy.horizon}], got {self.action_steps}")
        self.deterministic = deterministic
        self.sampler = sampler
        self.inference_steps = inference_steps
        self.history = ObservationHistory(policy.n_obs)
        self._queue: deque[np.ndarray] = deque()
        #: chunks sampled since construction (one per re-planning).
        self.plans = 0

    def reset(self) -> None:
        """Forget the episode: empty history and action queue."""
        self.history.reset()
        self._queue.clear()

    def act(self, observation: Mapping[str, np.ndarray]) -> np.ndarray:
        """The action (float32 ``[A]``) for the newest observation of the episode."""
        history = self.history.push({key: observation[key] for key in self.policy.observation_keys})
        if not self._queue:
            batch = {key: value[None] for key, value in history.items()}
            chunk = self.policy.sample_chunks(batch, 1, self.deterministic, sampler=self.sampler,
                                              inference_steps=self.inference_steps)[0, 0]
            self._queue.extend(chunk[: self.action_steps].float().cpu().numpy())
            self.plans += 1
        return self._queue.popleft()

    __call__ = act
