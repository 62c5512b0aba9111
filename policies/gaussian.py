"""The SAC actor: an observation encoder, an MLP and a tanh-squashed Gaussian.

Sampling (reparameterised, one row per observation)::

    (mu, log_sigma) = MLP(encoder(s))        log_sigma squashed into [LOG_STD_MIN, LOG_STD_MAX]
    u = mu + sigma * eps,  eps ~ N(0, I)     a = tanh(u)  in (-1, 1)^A
    log pi(a|s) = sum_i [ log N(u_i; mu_i, sigma_i) - log(1 - tanh(u_i)^2) ]

with the change-of-variables term in its stable form ``log(1 - tanh(u)^2) = 2 (log 2 - u -
softplus(-2u))`` (no ``eps`` fudge, exact for large ``|u|``). The deterministic action is
``tanh(mu)``.

Module structure (what a published policy holds): ``encoder`` (an :class:`ObservationEncoder`;
in the learner this is the very module the critic trains, so the policy's encoder weights *are*
the critic's), ``head`` (the Gaussian MLP) and, with ``gripper_critic.enabled``, ``gripper_head``
(HIL-SERL's discrete open/stay/close Q-network). The gripper command is that head's greedy choice,
except in stochastic (training) actions with ``gripper_critic.exploration_epsilon`` > 0, where
with that probability a uniformly drawn choice replaces it (epsilon-greedy: without it the online
gripper critic never sees the choices its policy does not take, and nothing bounds their values).
Publishing is ``policy.state_dict()`` as
safetensors bytes (:func:`policy_state_to_bytes`); an actor builds the same module from the
config and the spaces alone and loads them (:func:`load_policy_bytes`). No pickle anywhere.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np
import safetensors.torch
from safetensors.torch import load as safetensors_to_tensors  # bytes -> tensors, no pickle
import torch
from gymnasium import spaces
from torch import nn
from torch.nn import functional as F

from hardware_configs.schema import SACConfig
from policies.base import SeededGenerators
from policies.encoders import ObservationEncoder, observation_to_torch

LOG_STD_MIN = -5.0
LOG_STD_MAX = 2.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)

# The discrete gripper actions of HIL-SERL's gripper critic.
GRIPPER_OPEN, GRIPPER_STAY, GRIPPER_CLOSE = 0, 1, 2
GRIPPER_CHOICES = 3
GRIPPER_WIDTH_KEY = "gripper_width"


def mlp(input_dim: int, hidden_dims: tuple[int, ...], output_dim: int, layer_norm: bool = False) -> nn.Sequential:
    """Linear (-> LayerNorm) -> ReLU per hidden layer, then a final Linear."""
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers.append(nn.Linear(input_dim, width))
        if layer_norm:
            layers.append(nn.LayerNorm(width))
        layers.append(nn.ReLU())
        input_dim = width
    layers.append(nn.Linear(input_dim, output_dim))
    return nn.Sequential(*layers)


def tanh_log_det_jacobian(pre_tanh: torch.Tensor) -> torch.Tensor:
    """``log(1 - tanh(u)^2)`` elementwise, computed stably as ``2 (log 2 - u - softplus(-2u))``."""
    return 2.0 * (_LOG_2 - pre_tanh - F.softplus(-2.0 * pre_tanh))


class GaussianHead(nn.Module):
    """features -> tanh-squashed Gaussian over ``action_dim`` dimensions."""

    def __init__(self, feature_dim: int, hidden_dims: tuple[int, ...], action_dim: int) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.net = mlp(feature_dim, hidden_dims, 2 * action_dim)

    def distribution(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log_std)`` of the pre-tanh Gaussian; ``log_std`` smoothly squashed into
        ``[LOG_STD_MIN, LOG_STD_MAX]`` (a hard clamp would zero its gradient at the bounds)."""
        mean, raw_log_std = self.net(features).chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(raw_log_std) + 1.0)
        return mean, log_std

    def forward(
        self, features: torch.Tensor, deterministic: bool = False, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(action [B, A] in (-1, 1), log_prob [B])``; deterministic: ``tanh(mean)`` and its log-prob."""
        mean, log_std = self.distribution(features)
        if deterministic:
            noise = torch.zeros_like(mean)
            pre_tanh = mean
        else:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            pre_tanh = mean + log_std.exp() * noise
        gaussian_log_prob = (-0.5 * noise.square() - log_std - _HALF_LOG_2PI).sum(-1)
        log_prob = gaussian_log_prob - tanh_log_det_jacobian(pre_tanh).sum(-1)
        return torch.tanh(pre_tanh), log_prob


class GripperQHead(nn.Module):
    """HIL-SERL's discrete gripper critic: features -> Q-values of (open, stay, close)."""

    def __init__(self, feature_dim: int, hidden_dims: tuple[int, ...], layer_norm: bool = True) -> None:
        super().__init__()
        self.net = mlp(feature_dim, hidden_dims, 3, layer_norm=layer_norm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def gripper_closed(gripper_width: torch.Tensor, closed_below: float) -> torch.Tensor:
    """Whether the gripper is closed (bool ``[B]``), from the ``gripper_width`` field ``[B, 1]``."""
    return gripper_width.reshape(gripper_width.shape[0], -1)[:, 0] < closed_below


def gripper_command_from_choice(choice: torch.Tensor, closed: torch.Tensor) -> torch.Tensor:
    """Discrete choice (open/stay/close) -> absolute gripper command in {-1, +1}; stay keeps ``closed``."""
    current = torch.where(closed, 1.0, -1.0)
    return torch.where(choice == GRIPPER_OPEN, -1.0, torch.where(choice == GRIPPER_CLOSE, 1.0, current))


class TanhGaussianPolicy(nn.Module):
    """The SAC actor (see the module docstring).

    Built the same way on the learner and on the actor: from the config, the spaces and the
    observation keys. The learner passes its critic's encoder as ``encoder`` so that both share
    one set of weights.

    Args:
        config: SAC hyper-parameters (``hidden_dims``, ``image_encoder``, ``gripper_critic``).
        observation_space: the robot's observation ``spaces.Dict``.
        action_space: ``Box(-1, 1, (A,))``; with the gripper critic the last entry is the gripper.
        observation_keys: fields the networks see (empty: all).
        encoder: an existing encoder to use (shared with the critic); built from the config if None.
        seed: seed of the sampling generator used by :meth:`act`.
    """

    def __init__(
        self,
        config: SACConfig,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        observation_keys: tuple[str, ...] = (),
        encoder: Optional[ObservationEncoder] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not (np.all(action_space.low == -1.0) and np.all(action_space.high == 1.0)) or len(action_space.shape) != 1:
            raise ValueError("TanhGaussianPolicy needs a flat action Box with bounds [-1, 1]")
        self.action_dim = int(action_space.shape[0])
        self.use_gripper_critic = config.gripper_critic.enabled
        self.continuous_dim = self.action_dim - 1 if self.use_gripper_critic else self.action_dim
        if self.continuous_dim < 1:
            raise ValueError("the gripper critic needs at least one continuous action dimension besides the gripper")
        self.encoder = encoder or ObservationEncoder(observation_space, observation_keys, config.image_encoder)
        self.head = GaussianHead(self.encoder.output_dim, tuple(config.hidden_dims), self.continuous_dim)
        self.gripper_head: Optional[GripperQHead] = None
        self.gripper_closed_below = 0.0
        if self.use_gripper_critic:
            if GRIPPER_WIDTH_KEY not in observation_space.spaces:
                raise ValueError(f"the gripper critic reads the gripper state from {GRIPPER_WIDTH_KEY!r}")
            self.gripper_closed_below = float(np.max(observation_space[GRIPPER_WIDTH_KEY].high)) / 2.0
            self.gripper_head = GripperQHead(self.encoder.output_dim, tuple(config.hidden_dims), config.layer_norm)
        self.gripper_exploration_epsilon = float(config.gripper_critic.exploration_epsilon)
        self._generator = SeededGenerators(seed)

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def forward(
        self,
        observation: Mapping[str, torch.Tensor],
        deterministic: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched ``[B, ...]`` tensors -> ``(action [B, continuous_dim], log_prob [B])``.

        The continuous dimensions only: with the gripper critic the gripper entry is not part of the
        Gaussian (see :meth:`full_actions`)."""
        return self.head(self.encoder(observation), deterministic, generator)

    def gripper_commands(self, features: torch.Tensor, gripper_width: torch.Tensor, epsilon: float = 0.0,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Gripper commands ``[B]`` in {-1, +1} from the gripper head: greedy, or with probability
        ``epsilon`` per row a uniformly drawn choice."""
        assert self.gripper_head is not None
        choice = self.gripper_head(features).argmax(dim=-1)
        if epsilon > 0.0:
            explore = torch.rand(choice.shape, generator=generator, device=choice.device) < epsilon
            drawn = torch.randint(GRIPPER_CHOICES, choice.shape, generator=generator, device=choice.device)
            choice = torch.where(explore, drawn, choice)
        return gripper_command_from_choice(choice, gripper_closed(gripper_width, self.gripper_closed_below))

    def sample_actions(
        self,
        observation: Mapping[str, torch.Tensor],
        num_samples: int,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """``num_samples`` full env actions per observation, ``[B, K, A]`` (the gripper entry, if
        the gripper critic is on, is its greedy command, the same for all K)."""
        features = self.encoder(observation)
        batch = features.shape[0]
        repeated = features.repeat_interleave(num_samples, dim=0)
        actions, _ = self.head(repeated, deterministic=False, generator=generator)
        actions = actions.reshape(batch, num_samples, self.continuous_dim)
        if self.gripper_head is not None:
            gripper = self.gripper_commands(features, observation[GRIPPER_WIDTH_KEY]).to(actions.dtype)
            actions = torch.cat([actions, gripper[:, None, None].expand(batch, num_samples, 1)], dim=-1)
        return actions

    def act(self, observation: Mapping[str, np.ndarray], deterministic: bool = False) -> np.ndarray:
        """One unbatched numpy observation -> one float32 env action ``[A]`` (no gradient)."""
        device = self.device
        keys = self.encoder.keys
        if self.gripper_head is not None and GRIPPER_WIDTH_KEY not in keys:
            keys = keys + (GRIPPER_WIDTH_KEY,)
        with torch.inference_mode():
            tensors = observation_to_torch(observation, keys, device, add_batch_dim=True)
            features = self.encoder(tensors)
            generator = self._generator(device)
            action, _ = self.head(features, deterministic, generator)
            if self.gripper_head is not None:
                epsilon = 0.0 if deterministic else self.gripper_exploration_epsilon
                gripper = self.gripper_commands(features, tensors[GRIPPER_WIDTH_KEY], epsilon, generator).to(action.dtype)
                action = torch.cat([action, gripper[:, None]], dim=-1)
            return action[0].cpu().numpy().astype(np.float32, copy=False)


def policy_state_to_bytes(policy: nn.Module) -> bytes:
    """The policy's ``state_dict`` as safetensors bytes (CPU, contiguous copies)."""
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in policy.state_dict().items()}
    return safetensors.torch.save(state)


def load_policy_bytes(policy: nn.Module, data: bytes) -> None:
    """Load weights published by :func:`policy_state_to_bytes` (strict: names and shapes must match)."""
    policy.load_state_dict(safetensors_to_tensors(data), strict=True)
