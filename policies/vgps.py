r"""V-GPS: value-guided policy steering (Nakamoto et al., 2024, "Steering Your Generalists").

A frozen base policy pi_0 (any :class:`~policies.base.Policy`: OpenVLA, a diffusion policy, a SAC
actor) proposes K actions; a critic Q trained offline (Cal-QL, learner/calql.py, or SAC) re-ranks
them; the robot executes the chosen one. Per observation s::

    a_1, ..., a_K ~ pi_0(. | s)                 one batched ``base.sample`` call for all B observations
    c_k = m(a_k)                                the action in the critic's action space (``mapping``)
    q_k = reduce_i Q_i(s_c, c_k)                ``critic_reduction``: min (default) or mean over the
                                                ensemble; one critic call for all B * K pairs
    beta = 0:  k* = argmax_k q_k
    beta > 0:  P(k* = k) = exp(q_k / beta) / sum_j exp(q_j / beta)
    return a_{k*}

``beta`` is ``VGPSConfig.temperature``: a temperature that *divides* Q, the convention of the paper
(its beta) and of the authors' evaluation code, where ``action_temp > 0`` samples
``categorical(q / action_temp)`` and ``action_temp = 0`` takes the argmax. Small beta steers hard,
large beta approaches the base policy. beta is in units of Q: with a 0/1 success reward the
candidates' values may differ by far less than 1, and a smaller beta (or 0) is needed to steer.

The returned action is the base's own (in the robot's normalised action space, what every policy
returns); the mapping m only feeds the critic. m is an :class:`~policies.openvla.ActionMapping`
(``out[i] = clip((a[source_dims[i]] - offsets[i]) / scales[i], -1, 1)``: per-dimension affine map
plus dimension selection, ``raw_dim`` = the base's action size, ``dim`` = the critic's), e.g. when
the critic was trained on actions normalised with other statistics than the base's; None is the
identity (the base already acts in the critic's space).

Observations: the base receives the whole batch (it reads its own fields, e.g. an image and an
instruction); the critic receives only ``critic.observation_keys`` (e.g. the state), so the batch
must carry the union of both.

``sample(observations, num_samples)`` returns ``num_samples`` independent choices among the same K
candidates (``[B, num_samples, A]``); ``deterministic=True`` takes the argmax whatever beta (the
candidates are still sampled: identical candidates would leave nothing to choose).
``random_control=True`` is the control arm of a V-GPS benchmark: the same K candidates, one picked
uniformly at random, the critic never evaluated (``deterministic``: the first candidate, itself a
uniform pick since the candidates are i.i.d.).

Critics: anything with ``observation_keys``, ``action_dim``, ``device``, ``to(device)`` and
``q_values(observations, actions [B, K, A]) -> [E, B, K]`` (or ``[B, K]``) (:class:`ActionValueCritic`).
:class:`QCritic` is the SAC/Cal-QL ensemble on its observation encoder, built from an agent or read
from a learner or Cal-QL checkpoint; by default from the *target* networks, as the authors'
``get_q_values`` does (min over the target ensemble). With the gripper critic the continuous
critics score the continuous dimensions only (the gripper entry is not scored).

A V-GPS policy directory (:meth:`VGPSPolicy.save`)::

    policy.json      {"kind": "vgps", "config": <VGPSConfig>, "base": "base", "critic": "critic"}
    base/            the base policy's own directory (its Policy.save)
    critic/          critic.json + model.safetensors (QCritic.save)

``base`` and ``critic`` are paths, relative to the directory or absolute, so a hand-written
``policy.json`` may point at an existing base policy directory and at a learner or Cal-QL
checkpoint (or run) directory instead; its optional ``critic_network`` ("target", the default, or
"online") then says which of the checkpoint's critics scores. In code::

    policy = VGPSPolicy(load_policy("policies/openvla"), load_critic("runs/calql"), VGPSConfig(num_samples=10))
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Protocol, Sequence

import safetensors
import safetensors.torch
import torch
from gymnasium import spaces
from torch import nn

from hardware_configs.loader import ConfigError, load_dataclass, to_dict
from hardware_configs.schema import SACConfig
from learner.sac import CriticEnsemble, SACAgent
from policies.base import (
    POLICY_FILE,
    WEIGHTS_FILE,
    Policy,
    PolicyInput,
    SeededGenerators,
    SteeredPolicy,
    load_policy,
    observations_to_tensors,
    read_policy_file,
    register_policy,
    write_policy_file,
)
from policies.encoders import ObservationEncoder
from policies.openvla import ActionMapping
from transport.spaces import RobotSpaces

CRITIC_FILE = "critic.json"
CRITIC_FORMAT = "steerl.q_critic/1"
REDUCTIONS = ("min", "mean")
NETWORKS = ("target", "online")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class VGPSConfig:
    """V-GPS settings (module docstring); validated on construction, errors name the field.

    Defaults follow the authors' evaluation script (10 samples, beta = 1, min over the ensemble).
    """

    #: K, candidate actions drawn from the base policy per observation.
    num_samples: int = 10
    #: beta: P(k) proportional to exp(Q_k / beta); 0 takes the argmax.
    temperature: float = 1.0
    #: How the ensemble's values combine into one score: "min" or "mean".
    critic_reduction: Literal["min", "mean"] = "min"
    #: Pick uniformly among the K candidates instead (the benchmark's control arm).
    random_control: bool = False
    #: Base action -> critic action; None: identity.
    mapping: Optional[ActionMapping] = None
    #: Seed of the selection's random generator (one per device).
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.mapping, Mapping):
            object.__setattr__(self, "mapping", ActionMapping.from_dict(self.mapping, "VGPSConfig.mapping"))
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.num_samples, numbers.Integral) or isinstance(self.num_samples, bool) \
                or self.num_samples < 1:
            raise ValueError(f"VGPSConfig.num_samples must be an integer >= 1, got {self.num_samples!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"VGPSConfig.temperature must be a finite number >= 0 (0: argmax), "
                             f"got {self.temperature!r}")
        if self.critic_reduction not in REDUCTIONS:
            raise ValueError(f"VGPSConfig.critic_reduction must be one of {', '.join(REDUCTIONS)}, "
                             f"got {self.critic_reduction!r}")
        if not isinstance(self.random_control, bool):
            raise ValueError(f"VGPSConfig.random_control must be true or false, got {self.random_control!r}")
        if self.mapping is not None and not isinstance(self.mapping, ActionMapping):
            raise ValueError(f"VGPSConfig.mapping must be an ActionMapping or null, got {type(self.mapping).__name__}")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise ValueError(f"VGPSConfig.seed must be an integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"num_samples": int(self.num_samples), "temperature": float(self.temperature),
                "critic_reduction": self.critic_reduction, "random_control": self.random_control,
                "mapping": self.mapping.to_dict() if self.mapping is not None else None, "seed": int(self.seed)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "VGPSConfig") -> "VGPSConfig":
        """From a mapping (e.g. ``policy.json``'s ``config``); errors are prefixed with ``source``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: must be a mapping, got {type(data).__name__}")
        known = ("num_samples", "temperature", "critic_reduction", "random_control", "mapping", "seed")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown VGPSConfig field(s) {', '.join(unknown)} (known: {', '.join(known)})")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None


# --------------------------------------------------------------------------------------------
# Critics
# --------------------------------------------------------------------------------------------


class ActionValueCritic(Protocol):
    """What V-GPS needs from a critic."""

    #: Observation fields ``q_values`` reads.
    observation_keys: tuple[str, ...]
    #: Size of the critic's action space.
    action_dim: int

    @property
    def device(self) -> torch.device: ...

    def to(self, device: torch.device | str) -> Any: ...

    def q_values(self, observations: Mapping[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        """``observations``: ``[B, ...]`` tensors of ``observation_keys``; ``actions``: ``[B, K, A]``.
        Returns ``[E, B, K]`` (E ensemble members) or ``[B, K]``."""
        ...


class QCritic(nn.Module):
    """A SAC / Cal-QL critic ensemble on its observation encoder, for scoring actions.

    ``q_values`` encodes each observation once and evaluates the ensemble on all ``B * K``
    (features, action) pairs in one call. Built like :class:`~learner.sac.SACAgent` builds its
    critic: from the SAC config, the spaces and the observation keys.
    """

    def __init__(
        self,
        config: SACConfig,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        observation_keys: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if len(action_space.shape) != 1:
            raise ValueError(f"QCritic needs a flat action Box, got shape {action_space.shape}")
        self.config = config
        self.encoder = ObservationEncoder(observation_space, tuple(observation_keys), config.image_encoder)
        self.observation_keys: tuple[str, ...] = self.encoder.keys
        self.spaces = RobotSpaces.from_gym(spaces.Dict({k: observation_space[k] for k in self.observation_keys}),
                                           action_space)
        self.action_dim = int(action_space.shape[0])
        self.continuous_dim = self.action_dim - 1 if config.gripper_critic.enabled else self.action_dim
        self.critic = CriticEnsemble(self.encoder.output_dim + self.continuous_dim, tuple(config.hidden_dims),
                                     config.num_critics, config.layer_norm)
        #: Where the weights came from (written to critic.json).
        self.source: dict[str, Any] = {}
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.critic.parameters()).device

    def q_values(self, observations: Mapping[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        """``[E, B, K]`` values of ``actions`` ``[B, K, A]`` (no gradient, no augmentation)."""
        batch, samples = actions.shape[:2]
        with torch.no_grad():
            features = self.encoder(observations)
            flat = actions.reshape(batch * samples, -1)[:, : self.continuous_dim].to(features.dtype)
            return self.critic(features.repeat_interleave(samples, dim=0), flat).reshape(-1, batch, samples)

    # -- construction from a learner ---------------------------------------------------------

    @classmethod
    def from_agent(cls, agent: SACAgent, network: str = "target") -> "QCritic":
        """A copy of an agent's ``target`` (default) or ``online`` encoder and critics."""
        _check_network(network)
        critic = cls(agent.config, agent.observation_space, agent.action_space, agent.observation_keys)
        encoder, ensemble = (agent.target_encoder, agent.target_critic) if network == "target" \
            else (agent.encoder, agent.critic)
        critic.encoder.load_state_dict(encoder.state_dict())
        critic.critic.load_state_dict(ensemble.state_dict())
        critic.source = {"network": network, "update_count": agent.update_count}
        return critic.to(agent.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, network: str = "target",
                        device: torch.device | str = "cpu") -> "QCritic":
        """The critic of a learner or Cal-QL checkpoint directory, or of a run directory's newest
        one (``learner.json`` + ``agent.safetensors``; see learner/learner.py, learner/calql.py)."""
        from learner.learner import latest_checkpoint

        _check_network(network)
        directory = latest_checkpoint(path)
        meta_path = directory / "learner.json"
        try:
            meta = json.loads(meta_path.read_text())
            robot_spaces = RobotSpaces.from_json(meta["spaces"])
            if "sac" in meta:  # written by learner/calql.py
                config = load_dataclass(SACConfig, meta["sac"], f"{meta_path}: sac")
            else:  # written by the online learner: the session config
                from hardware_configs.schema import SessionConfig

                config = load_dataclass(SessionConfig, meta["config"], f"{meta_path}: config").learner.sac
            keys = tuple(meta.get("observation_keys", ()))
        except (OSError, KeyError, TypeError, ValueError) as error:  # JSONDecodeError, ConfigError included
            raise ValueError(f"{directory}: cannot read the learner's description: {error}") from None
        critic = cls(config, robot_spaces.observation_space(), robot_spaces.action_space(), keys)
        weights = directory / "agent.safetensors"
        try:
            tensors = safetensors.torch.load_file(str(weights))
        except (OSError, safetensors.SafetensorError) as error:
            raise ValueError(f"{weights}: not a readable safetensors file ({error})") from None
        prefix = "target_" if network == "target" else ""
        for module, name in ((critic.encoder, f"{prefix}encoder."), (critic.critic, f"{prefix}critic.")):
            state = {key[len(name):]: value for key, value in tensors.items() if key.startswith(name)}
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as error:
                raise ValueError(f"{weights}: the {name[:-1]} weights do not fit the described critic: "
                                 f"{error}") from None
        critic.source = {"checkpoint": str(directory), "network": network, "updates": meta.get("updates")}
        return critic.to(device)

    # -- files -------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """``critic.json`` (format, SAC config, spaces, keys, provenance) and ``model.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        description = {"format": CRITIC_FORMAT, "sac": to_dict(self.config), "spaces": self.spaces.to_json(),
                       "observation_keys": list(self.observation_keys), "source": self.source}
        (directory / CRITIC_FILE).write_text(json.dumps(description, indent=2, sort_keys=True))
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in self.state_dict().items()}
        safetensors.torch.save_file(state, str(directory / WEIGHTS_FILE))

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> "QCritic":
        """Rebuild a critic that :meth:`save` wrote (strict: names and shapes must match)."""
        directory = Path(directory)
        path = directory / CRITIC_FILE
        try:
            description = json.loads(path.read_text())
            if description.get("format") != CRITIC_FORMAT:
                raise ValueError(f"format {description.get('format')!r} is not {CRITIC_FORMAT!r}")
            config = load_dataclass(SACConfig, description["sac"], f"{path}: sac")
            robot_spaces = RobotSpaces.from_json(description["spaces"])
            keys = tuple(description["observation_keys"])
        except (OSError, KeyError, TypeError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ValueError(f"{path}: not a critic description written by QCritic.save ({error})") from None
        critic = cls(config, robot_spaces.observation_space(), robot_spaces.action_space(), keys)
        weights = directory / WEIGHTS_FILE
        try:
            critic.load_state_dict(safetensors.torch.load_file(str(weights)), strict=True)
        except (OSError, RuntimeError, safetensors.SafetensorError) as error:
            raise ValueError(f"{weights}: the weights do not fit {path}: {error}") from None
        critic.source = dict(description.get("source", {}))
        return critic.to(device)


def _check_network(network: str) -> None:
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {network!r}")


def load_critic(path: str | Path, device: torch.device | str = "cpu", network: str = "target") -> QCritic:
    """A :class:`QCritic` from a directory written by :meth:`QCritic.save`, or from a learner /
    Cal-QL checkpoint or run directory (its ``network`` critic)."""
    path = Path(path)
    if (path / CRITIC_FILE).is_file():
        return QCritic.load(path, device)
    return QCritic.from_checkpoint(path, network, device)


# --------------------------------------------------------------------------------------------
# The steering policy
# --------------------------------------------------------------------------------------------


@dataclass
class VGPSSample:
    """One steering step for a batch: what was proposed, how it scored, what was chosen."""

    actions: torch.Tensor  # [B, M, A]: the chosen base actions
    candidates: torch.Tensor  # [B, K, A]: the base's proposals
    scores: Optional[torch.Tensor]  # [B, K]: reduced Q-values (None under random control)
    indices: torch.Tensor  # [B, M] int64: which candidate each output is


@register_policy("vgps")
class VGPSPolicy(SteeredPolicy):
    """A base policy steered by a critic (module docstring).

    Args:
        base: the policy that proposes actions.
        critic: scores (observation, action) pairs; an :class:`ActionValueCritic`.
        config: K, beta, the reduction, the mapping, random control.
    """

    def __init__(self, base: Policy, critic: ActionValueCritic, config: VGPSConfig = VGPSConfig()) -> None:
        mapping = config.mapping
        if mapping is None:
            if critic.action_dim != base.action_dim:
                raise ValueError(f"the base policy acts in {base.action_dim} dimensions and the critic scores "
                                 f"{critic.action_dim}: give VGPSConfig.mapping")
        else:
            if mapping.raw_dim != base.action_dim:
                raise ValueError(f"VGPSConfig.mapping.raw_dim is {mapping.raw_dim} but the base policy acts in "
                                 f"{base.action_dim} dimensions")
            if mapping.dim != critic.action_dim:
                raise ValueError(f"VGPSConfig.mapping gives {mapping.dim} dimensions but the critic scores "
                                 f"{critic.action_dim}")
        self.base = base
        self.critic = critic
        self.config = config
        self.action_dim = base.action_dim
        self._generator = SeededGenerators(config.seed)

    # -- the Policy interface ---------------------------------------------------------------------

    def sample(self, observations: PolicyInput, num_samples: int, deterministic: bool = False) -> torch.Tensor:
        """``[B, num_samples, A]``: independent choices among one set of K candidates."""
        return self.steer(observations, num_samples, deterministic).actions

    # -- steering ---------------------------------------------------------------------------------

    def critic_actions(self, candidates: torch.Tensor) -> torch.Tensor:
        """Base actions ``[..., A_base]`` in the critic's action space ``[..., A_critic]``."""
        mapping = self.config.mapping
        return mapping(candidates) if mapping is not None else candidates.float()

    def score(self, observations: PolicyInput, candidates: torch.Tensor) -> torch.Tensor:
        """Reduced critic values ``[B, K]`` (on the candidates' device) of candidates ``[B, K, A]``:
        one critic call for all of them."""
        device = self.critic.device
        tensors = observations_to_tensors(observations, self.critic.observation_keys, device)
        values = self.critic.q_values(tensors, self.critic_actions(candidates).to(device))
        if values.dim() == 3:
            values = values.min(dim=0).values if self.config.critic_reduction == "min" else values.mean(dim=0)
        if values.shape != candidates.shape[:2]:
            raise ValueError(f"the critic returned values of shape {tuple(values.shape)} for candidates "
                             f"{tuple(candidates.shape)} (expected [E, B, K] or [B, K])")
        if not torch.all(torch.isfinite(values)):
            raise ValueError("the critic returned NaN or infinite values")
        return values.to(candidates.device, torch.float32)

    def steer(self, observations: PolicyInput, num_samples: int = 1, deterministic: bool = False) -> VGPSSample:
        """Propose K candidates (one base call), score them (one critic call; none under random
        control) and choose ``num_samples`` of them per observation."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        config = self.config
        with torch.no_grad():
            candidates = self.base.sample(observations, config.num_samples, deterministic=False)
            if candidates.dim() != 3 or candidates.shape[1] != config.num_samples:
                raise ValueError(f"the base policy returned {tuple(candidates.shape)}, expected "
                                 f"[B, {config.num_samples}, {self.action_dim}]")
            batch, device = candidates.shape[0], candidates.device
            scores: Optional[torch.Tensor] = None
            if config.random_control:
                if deterministic:
                    indices = torch.zeros(batch, num_samples, dtype=torch.long, device=device)
                else:
                    indices = torch.randint(0, config.num_samples, (batch, num_samples), device=device,
                                            generator=self._generator(device))
            else:
                scores = self.score(observations, candidates)
                indices = self.select(scores, num_samples, deterministic)
            actions = candidates.gather(1, indices[:, :, None].expand(-1, -1, candidates.shape[2]))
        return VGPSSample(actions, candidates, scores, indices)

    def select(self, scores: torch.Tensor, num_samples: int, deterministic: bool = False) -> torch.Tensor:
        """Indices ``[B, num_samples]`` into the K candidates: the argmax when ``deterministic`` or
        beta = 0, else draws (with replacement) from softmax(scores / beta)."""
        beta = self.config.temperature
        if deterministic or beta == 0:
            return scores.argmax(dim=1, keepdim=True).expand(-1, num_samples)
        probabilities = torch.softmax(scores / beta, dim=1)
        return torch.multinomial(probabilities, num_samples, replacement=True,
                                 generator=self._generator(scores.device))

    # -- files --------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """``policy.json`` plus the base policy (``base/``) and the critic (``critic/``)."""
        save_critic = getattr(self.critic, "save", None)
        if not callable(save_critic):
            raise TypeError(f"the critic ({type(self.critic).__name__}) has no save(); use a QCritic")
        directory = Path(directory)
        self.base.save(directory / "base")
        save_critic(directory / "critic")
        write_policy_file(directory, self.kind, config=self.config.to_dict(), base="base", critic="critic")

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "VGPSPolicy":
        """Rebuild the base (:func:`~policies.base.load_policy`) and the critic (:func:`load_critic`)
        that ``policy.json`` points at (paths relative to ``directory`` or absolute)."""
        directory = Path(directory)
        content = read_policy_file(directory)
        source = str(directory / POLICY_FILE)
        if content["kind"] != cls.kind:
            raise ValueError(f"{source}: kind {content['kind']!r} is not {cls.kind!r}")
        for name in ("config", "base", "critic"):
            if name not in content:
                raise ValueError(f"{source}: needs a field {name!r}")
        config = VGPSConfig.from_dict(content["config"], f"{source}: config")

        def resolve(name: str) -> Path:
            value = content[name]
            if not isinstance(value, str) or not value:
                raise ValueError(f"{source}: {name} must be a directory path, got {value!r}")
            path = Path(value).expanduser()
            return path if path.is_absolute() else directory / path

        base = load_policy(resolve("base"), device)
        critic = load_critic(resolve("critic"), device, content.get("critic_network", "target"))
        return cls(base, critic, config)


__all__ = ["ActionValueCritic", "QCritic", "VGPSConfig", "VGPSPolicy", "VGPSSample", "load_critic"]
