"""The diffusion policy as V-GPS sees it in the benchmarks: its observation history under
``history/<key>`` fields, the current fields left to the critic (benchmarks/vgps.py,
benchmarks/policy_latency.py). Imports no simulator, so it runs where PyBullet is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from policies.base import Policy, PolicyInput, load_policy
from policies.diffusion import DiffusionPolicy

HISTORY_PREFIX = "history/"


class HistoryBase(Policy):
    """The diffusion policy reading its observation history from ``history/<key>`` fields
    (``[B, n_obs, ...]``), with a fixed sampler; the current fields stay free for the critic."""

    kind = "history_base"  # not registered: a benchmark adapter, never saved

    def __init__(self, policy: DiffusionPolicy, sampler: Optional[str] = None,
                 inference_steps: Optional[int] = None) -> None:
        self.policy = policy
        self.sampler = sampler
        self.inference_steps = inference_steps
        self.action_dim = policy.action_dim

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def to(self, device: torch.device | str) -> "HistoryBase":
        self.policy.to(device)
        return self

    def sample(self, observations: PolicyInput, num_samples: int, deterministic: bool = False) -> torch.Tensor:
        history = {key: observations[HISTORY_PREFIX + key] for key in self.policy.observation_keys}
        return self.policy.sample(history, num_samples, deterministic, sampler=self.sampler,
                                  inference_steps=self.inference_steps)

    def save(self, directory: str | Path) -> None:  # pragma: no cover - an adapter
        self.policy.save(directory)

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "HistoryBase":  # pragma: no cover
        return cls(load_policy(directory, device))
