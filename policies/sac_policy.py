"""The SAC actor (:class:`~policies.gaussian.TanhGaussianPolicy`) behind the :class:`Policy` interface.

``SACPolicy.sample(observations, K)`` draws ``K`` reparameterised tanh-Gaussian actions per
observation; ``deterministic=True`` returns ``tanh(mean)`` in every one of the ``K`` slots (with
the gripper critic, the gripper entry is always the greedy gripper command).

A policy directory (:meth:`SACPolicy.save`) holds::

    policy.json          {"kind": "sac", "config": <SACConfig>, "spaces": <RobotSpaces.to_json()>,
                          "observation_keys": [...], "action_dim": A, "seed": s}
    model.safetensors    the TanhGaussianPolicy's state dict (encoder, Gaussian head, gripper head,
                         and the encoder's state-standardisation buffers)

:meth:`SACPolicy.from_checkpoint` wraps the actor policy of a learner checkpoint (or of a run
directory's newest one) through the very code ``steerl eval`` uses
(:func:`learner.learner.load_policy_from_checkpoint`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from gymnasium import spaces

from hardware_configs.loader import ConfigError, load_dataclass, to_dict
from hardware_configs.schema import SACConfig, SessionConfig
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
from policies.gaussian import GRIPPER_WIDTH_KEY, TanhGaussianPolicy
from transport.spaces import RobotSpaces


@register_policy("sac")
class SACPolicy(Policy):
    """A :class:`TanhGaussianPolicy` as a :class:`Policy`, built the way the actor builds it.

    Args:
        config: the SAC hyper-parameters the network was built with (``hidden_dims``,
            ``image_encoder``, ``gripper_critic``).
        observation_space: the robot's observation ``spaces.Dict``.
        action_space: ``Box(-1, 1, (A,))``.
        observation_keys: fields the network sees (empty: all).
        seed: seed of the sampling generator (one per device, created on first use).
        module: an existing network to wrap (e.g. one loaded from a checkpoint); built from the
            arguments above when None. It is put in eval mode.
    """

    def __init__(
        self,
        config: SACConfig,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        observation_keys: Sequence[str] = (),
        seed: int = 0,
        module: Optional[TanhGaussianPolicy] = None,
    ) -> None:
        self.config = config
        self.spaces = RobotSpaces.from_gym(observation_space, action_space)
        if module is None:
            module = TanhGaussianPolicy(config, observation_space, action_space, tuple(observation_keys), seed=seed)
        self.module = module.eval()
        self.observation_keys: tuple[str, ...] = self.module.encoder.keys
        self.action_dim = self.module.action_dim
        self.seed = seed
        # Fields read by sample(): the encoder's, plus the gripper width for the gripper head.
        self._input_keys = self.observation_keys
        if self.module.gripper_head is not None and GRIPPER_WIDTH_KEY not in self._input_keys:
            self._input_keys += (GRIPPER_WIDTH_KEY,)
        self._generator = SeededGenerators(seed)

    # -- the Policy interface ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.module.device

    def to(self, device: torch.device | str) -> "SACPolicy":
        self.module.to(device)
        return self

    def sample(
        self,
        observations: PolicyInput,
        num_samples: int,
        deterministic: bool = False,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """``[B, K, A]`` actions in ``(-1, 1)`` (no gradient). Stochastic draws come from
        ``generator`` or the policy's own seeded generator for its device."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        device = self.device
        tensors = observations_to_tensors(observations, self._input_keys, device)
        with torch.no_grad():
            if not deterministic:
                return self.module.sample_actions(tensors, num_samples, generator or self._generator(device))
            features = self.module.encoder(tensors)
            actions, _ = self.module.head(features, deterministic=True)
            if self.module.gripper_head is not None:
                gripper = self.module.gripper_commands(features, tensors[GRIPPER_WIDTH_KEY]).to(actions.dtype)
                actions = torch.cat([actions, gripper[:, None]], dim=-1)
            return actions[:, None, :].expand(-1, num_samples, -1)

    # -- files --------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        directory = write_policy_file(
            directory, self.kind, config=to_dict(self.config), spaces=self.spaces.to_json(),
            observation_keys=list(self.observation_keys), action_dim=self.action_dim, seed=self.seed,
        )
        save_module_weights(self.module, directory)

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "SACPolicy":
        content = read_policy_file(directory)
        path = Path(directory) / POLICY_FILE
        if content["kind"] != cls.kind:
            raise ValueError(f"{path}: kind {content['kind']!r} is not {cls.kind!r}")
        try:
            config = load_dataclass(SACConfig, content["config"], source=f"{path}: config")
            robot_spaces = RobotSpaces.from_json(content["spaces"])
            keys = tuple(content["observation_keys"])
            seed = int(content.get("seed", 0))
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ValueError(f"{path}: malformed SAC policy description ({error!r})") from None
        policy = cls(config, robot_spaces.observation_space(), robot_spaces.action_space(), keys, seed=seed)
        if "action_dim" in content and int(content["action_dim"]) != policy.action_dim:
            raise ValueError(f"{path}: action_dim {content['action_dim']} disagrees with its action space "
                             f"({policy.action_dim})")
        load_module_weights(policy.module, directory)
        return policy.to(device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: Optional[SessionConfig] = None,
        device: torch.device | str = "cpu",
    ) -> "SACPolicy":
        """The actor policy of a learner checkpoint directory, or of a run directory's newest one.

        ``config`` is the session config the network is built from; by default the one the learner
        stored in the checkpoint's ``learner.json`` (the config it trained with). Errors are
        :class:`learner.learner.CheckpointError` naming the directory.
        """
        from learner.learner import CheckpointError, latest_checkpoint, load_policy_from_checkpoint

        directory = latest_checkpoint(path)
        meta_path = directory / "learner.json"
        try:
            meta = json.loads(meta_path.read_text())
            robot_spaces = RobotSpaces.from_json(meta["spaces"])
            if config is None:
                config = load_dataclass(SessionConfig, meta["config"], source=f"{meta_path}: config")
        except (OSError, KeyError, TypeError, ValueError) as error:  # JSONDecodeError, ConfigError included
            raise CheckpointError(f"{directory}: cannot read the learner's description: {error}") from None
        module, _ = load_policy_from_checkpoint(config, directory)
        policy = cls(config.learner.sac, robot_spaces.observation_space(), robot_spaces.action_space(),
                     seed=config.seed, module=module)
        return policy.to(device)

