r"""PA-RL: policy-agnostic RL (Sobol Mark et al., 2024, "Policy Agnostic RL: Offline RL and Online RL
Fine-Tuning of Any Class and Backbone").

Any policy class behind :class:`~policies.base.Policy` (a diffusion policy, OpenVLA, ...) is improved
with a critic without ever differentiating through the policy or needing its likelihood: the critic
turns the policy's own samples into better actions, those actions are used for the TD targets and
for acting, and the policy learns them back with its own supervised loss.

Notation: pi_0 the base policy, s a state, a in [-1, 1]^A, Q_1..Q_E the critic ensemble on its
observation encoder, Q(s, a) = reduce_i Q_i(s, a) with ``critic_reduction`` (``mean``, the
authors' default, or ``min``), N = ``num_samples``, k = ``top_k``, T = ``local_steps``, eta =
``local_step_size``.

Action optimisation (:func:`optimize_actions`, batched over B states, one ``pi_0.sample`` call and
one critic call per stage for all of them)::

    a_1, ..., a_N ~ pi_0(. | s)                            global: N base samples
    A^0 = the k of them with the highest Q(s, a_j)          ... keep the top k
    a^{t+1} = clip(a^t + eta grad_a Q(s, a^t), -1, 1)       local: T gradient-ascent steps, each of
                                                            the k actions on its own, t = 0..T-1
    a~ = a^{t*},  t* = argmax_{t in 0..T} Q(s, a^t)         keep the best iterate, so a step size
                                                            that overshoots never loses value
    A~(s) = {a~_1, ..., a~_k}, sorted by Q, best first

Logged: ``critic_gain`` = mean Q over A~(s) minus mean Q over the N base samples (>= 0 by
construction; its split into ``global_gain`` and ``local_gain`` says what each stage bought).

Critic (:class:`PARLAgent`; SAC's networks, optimiser and target update from learner/sac.py, the
entropy terms off: pi_0 has no tractable density)::

    a*(s') = argmax A~(s')                                  optimised with the ``optimize_with`` critic
    y = r + gamma (1 - d) min_{i in I} Q'_i(s', a*(s'))     I: a random ``critic_subset`` of the target
                                                            critics (``SACAgent.td_target``)
    L_Q = sum_i mean_batch (Q_i(s, a) - y)^2

Acting (:class:`PARLActingPolicy`): a*(s) (``deterministic``, or ``action_temperature`` beta = 0),
otherwise a draw from A~(s) with P(a~_j) proportional to exp(Q(s, a~_j) / beta).

Policy improvement by distillation (:class:`Distiller`): the pairs (s, a*(s)) at the states of the
critic's batches go into a buffer, and pi_0 takes ``distill_steps`` steps per iteration on::

    L(theta) = E_{(s, a*) ~ buffer} l_theta(s, a*)

with the class's own supervised loss l (``supervised_loss``, :class:`DistillablePolicy`): for the
diffusion policy its denoising loss on the chunk a* repeated ``horizon`` times (``horizon`` 1 is
PA-RL's setting: the critic scores single actions; see ``DiffusionPolicy.supervised_loss``), for
OpenVLA the cross-entropy of a*'s action tokens (``ActionMapping.inverse``, the checkpoint's
normalisation, the 256 bins) given the image and the prompt, trained through LoRA adapters (peft's
``inject_adapter_in_model``: the checkpoint's weights stay frozen, only the adapters learn).

Facts from the authors' code (github.com/MaxSobolMark/PolicyAgnosticRL,
``jaxrl_m/agents/continuous/action_optimization.py`` and ``parl_calql.py``), taken as defaults: N =
32, k = 10, T = 10, eta = 3e-4, the ensemble mean, the online critic steering the optimisation, the
argmax for the TD target, a draw with logits Q (beta = 1) for acting. LoRA: rank 32, alpha
min(rank, 16), all linear layers, Gaussian init (OpenVLA's ``vla-scripts/finetune.py``).

In ``steerl train`` (``learner.algorithm: parl``) the learner calls :meth:`PARLAgent.update` on
every batch and :meth:`PARLAgent.distill` every ``distill_every_updates`` updates, and publishes
:meth:`PARLAgent.publish_policy` (the steered policy, packed) for the actor.
"""

from __future__ import annotations

import dataclasses
import numbers
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Union, runtime_checkable

import numpy as np
import safetensors
import safetensors.torch
import torch
from gymnasium import spaces
from torch import nn

from hardware_configs.loader import ConfigError, load_dataclass, load_yaml, to_dict
from hardware_configs.schema import PARLConfig, SACConfig
from learner.sac import CriticEnsemble, SACAgent, TorchBatch, json_safe, batch_to_torch
from policies.base import (
    POLICY_FILE,
    Policy,
    PolicyInput,
    SeededGenerators,
    SteeredPolicy,
    load_policy,
    observations_to_tensors,
    policy_to_bytes,
    read_policy_file,
    register_policy,
    write_policy_file,
)
from policies.diffusion import DiffusionPolicy
from policies.encoders import ObservationEncoder
from policies.openvla import OpenVLAPolicy
from policies.vgps import QCritic, load_critic

ALGORITHM = "parl"
REDUCTIONS = ("mean", "min")
NETWORKS = ("online", "target")
LORA_WEIGHTS_FILE = "lora.safetensors"
ACTION_LOW, ACTION_HIGH = -1.0, 1.0


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def load_parl_config(path: str | Path) -> PARLConfig:
    """A :class:`PARLConfig` from a YAML file; every error names the file and the field."""
    try:
        return load_yaml(PARLConfig, path)
    except ConfigError:
        raise
    except ValueError as error:  # a check of __post_init__
        raise ConfigError(f"{path}: {error}") from None


def _config_from_dict(data: Any, source: str) -> PARLConfig:
    try:
        return load_dataclass(PARLConfig, data, source)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None


# --------------------------------------------------------------------------------------------
# Critics that give action gradients
# --------------------------------------------------------------------------------------------


class ActionGradientCritic(Protocol):
    """What the action optimisation needs from a critic.

    ``encode`` runs once per state (no gradient); ``values`` then scores any number of actions per
    state and must be differentiable with respect to ``actions`` (and need not be with respect to
    its own weights, which the optimisation never moves).
    """

    #: Observation fields ``encode`` reads.
    observation_keys: tuple[str, ...]
    #: Size of the action space scored.
    action_dim: int

    @property
    def device(self) -> torch.device: ...

    def to(self, device: torch.device | str) -> Any: ...

    def encode(self, observations: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[B, ...]`` tensors of ``observation_keys`` -> per-state features ``[B, F]``."""
        ...

    def values(self, features: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Features ``[B, F]`` and actions ``[B, K, A]`` -> ``[E, B, K]`` (E members) or ``[B, K]``."""
        ...


class EnsembleCritic:
    """A SAC / Cal-QL critic (observation encoder + :class:`~learner.sac.CriticEnsemble`) as an
    :class:`ActionGradientCritic`. The modules are shared, not copied: a view of an agent's critic
    follows its updates. Gradients reach the actions only (``detach_params``)."""

    def __init__(self, encoder: ObservationEncoder, ensemble: CriticEnsemble, action_dim: int) -> None:
        self.encoder = encoder
        self.ensemble = ensemble
        self.observation_keys: tuple[str, ...] = encoder.keys
        self.action_dim = int(action_dim)

    @classmethod
    def from_q_critic(cls, critic: QCritic) -> "EnsembleCritic":
        """The view of a :class:`~policies.vgps.QCritic` (e.g. a Cal-QL checkpoint's critic)."""
        if critic.continuous_dim != critic.action_dim:
            raise ValueError("the critic was trained with the discrete gripper head; PA-RL needs a critic of "
                             "every action dimension")
        return cls(critic.encoder, critic.critic, critic.action_dim)

    @classmethod
    def from_agent(cls, agent: SACAgent, network: str = "online") -> "EnsembleCritic":
        """The view of an agent's ``online`` or ``target`` encoder and critics."""
        if network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {network!r}")
        if agent.use_gripper_critic:
            raise ValueError("the agent uses the discrete gripper head; PA-RL needs a critic of every action dimension")
        if network == "online":
            return cls(agent.encoder, agent.critic, agent.policy.action_dim)
        return cls(agent.target_encoder, agent.target_critic, agent.policy.action_dim)

    @property
    def device(self) -> torch.device:
        return next(self.ensemble.parameters()).device

    def to(self, device: torch.device | str) -> "EnsembleCritic":
        self.encoder.to(device)
        self.ensemble.to(device)
        return self

    def encode(self, observations: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder(observations)

    def values(self, features: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        batch, samples = actions.shape[:2]
        flat = actions.reshape(batch * samples, -1).to(features.dtype)
        values = self.ensemble(features.repeat_interleave(samples, dim=0), flat, detach_params=True)
        return values.reshape(-1, batch, samples)


def as_gradient_critic(critic: Any) -> ActionGradientCritic:
    """An :class:`ActionGradientCritic` for a :class:`~policies.vgps.QCritic`, a
    :class:`~learner.sac.SACAgent` (its online critic) or anything that already is one."""
    if isinstance(critic, QCritic):
        return EnsembleCritic.from_q_critic(critic)
    if isinstance(critic, SACAgent):
        return EnsembleCritic.from_agent(critic, "online")
    if all(callable(getattr(critic, name, None)) for name in ("encode", "values")):
        return critic
    raise TypeError(f"{type(critic).__name__} is not a critic PA-RL can optimise actions with "
                    "(a QCritic, a SACAgent or an ActionGradientCritic: encode() and values())")


def reduce_ensemble(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """``[E, B, K]`` -> ``[B, K]`` by ``mean`` or ``min`` over the members; ``[B, K]`` passes."""
    if values.dim() == 2:
        return values
    if values.dim() != 3:
        raise ValueError(f"critic values must be [E, B, K] or [B, K], got {tuple(values.shape)}")
    return values.min(dim=0).values if reduction == "min" else values.mean(dim=0)


# --------------------------------------------------------------------------------------------
# Action optimisation
# --------------------------------------------------------------------------------------------


def optimize_actions(
    policy: Policy,
    critic: Union[ActionGradientCritic, QCritic, SACAgent],
    observations: PolicyInput,
    config: PARLConfig = PARLConfig(),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Global then local optimisation of the base policy's actions (module docstring).

    ``observations`` is one batch in :meth:`Policy.sample`'s format holding the policy's fields and
    the critic's. Returns the optimised actions ``[B, k, A]`` and their values ``[B, k]`` (reduced
    over the ensemble), both sorted best first and on the critic's device, and ``info``:
    ``critic_gain`` (mean Q of the optimised actions minus mean Q of the N base samples), its parts
    ``global_gain`` and ``local_gain``, the means ``q_base``, ``q_top_k`` and ``q_optimized``,
    ``local_shift`` (mean distance moved by the local steps), ``best_step`` (mean index of the kept
    iterate, 0 = the base sample) and ``gradient_norm`` (of the last step). Works inside
    ``torch.inference_mode`` and ``torch.no_grad`` (a policy server's); no weight receives a gradient.
    """
    critic = as_gradient_critic(critic)
    if critic.action_dim != policy.action_dim:
        raise ValueError(f"the base policy acts in {policy.action_dim} dimensions and the critic scores "
                         f"{critic.action_dim}")
    num_samples, top_k, reduction = config.num_samples, config.top_k, config.critic_reduction
    device = critic.device
    with torch.inference_mode(False):  # the local steps need autograd, even under a caller's inference mode
        with torch.no_grad():
            features = critic.encode(observations_to_tensors(observations, critic.observation_keys, device)).clone()
            candidates = policy.sample(observations, num_samples).to(device, torch.float32).clone()
            batch = features.shape[0]
            if tuple(candidates.shape) != (batch, num_samples, critic.action_dim):
                raise ValueError(f"the base policy returned {tuple(candidates.shape)}, expected "
                                 f"[{batch}, {num_samples}, {critic.action_dim}]")
            base_values = reduce_ensemble(critic.values(features, candidates), reduction)
            start_values, chosen = base_values.topk(top_k, dim=1)
            start = candidates.gather(1, chosen[..., None].expand(-1, -1, candidates.shape[2]))
        actions, values, best_step, gradient_norm = _local_ascent(critic, features, start, start_values, config)
        shift = (actions - start).norm(dim=-1).mean()
        values, order = values.sort(dim=1, descending=True)
        actions = actions.gather(1, order[..., None].expand(-1, -1, actions.shape[2]))
        q_base, q_top_k, q_optimized = base_values.mean(), start_values.mean(), values.mean()
        summary = torch.stack([q_optimized - q_base, q_top_k - q_base, q_optimized - q_top_k, q_base, q_top_k,
                                q_optimized, shift, best_step.float().mean(), gradient_norm]).tolist()
    names = ("critic_gain", "global_gain", "local_gain", "q_base", "q_top_k", "q_optimized", "local_shift",
             "best_step", "gradient_norm")
    return actions, values, dict(zip(names, summary))


def _local_ascent(
    critic: ActionGradientCritic, features: torch.Tensor, start: torch.Tensor, start_values: torch.Tensor,
    config: PARLConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """T clipped gradient-ascent steps on every action ``[B, k, A]``; returns the best iterate of
    each action, its value, the step it came from (0 = ``start``) and the last mean gradient norm."""
    best, best_values = start.clone(), start_values.clone()
    best_step = torch.zeros(start_values.shape, dtype=torch.long, device=start.device)
    gradient_norm = torch.zeros((), device=start.device)
    if config.local_steps == 0:
        return best, best_values, best_step, gradient_norm

    def keep_better(actions: torch.Tensor, values: torch.Tensor, step: int) -> None:
        nonlocal best, best_values, best_step
        better = values > best_values  # ties keep the earlier iterate
        best = torch.where(better[..., None], actions, best)
        best_values = torch.where(better, values, best_values)
        best_step = torch.where(better, step, best_step)

    actions = start
    for step in range(config.local_steps):
        with torch.enable_grad():
            actions = actions.detach().requires_grad_(True)
            values = reduce_ensemble(critic.values(features, actions), config.critic_reduction)
            (gradient,) = torch.autograd.grad(values.sum(), actions)
        keep_better(actions.detach(), values.detach(), step)  # the value of iterate `step`, from the same pass
        gradient_norm = gradient.norm(dim=-1).mean()
        actions = (actions.detach() + config.local_step_size * gradient).clamp_(ACTION_LOW, ACTION_HIGH)
    with torch.no_grad():
        keep_better(actions, reduce_ensemble(critic.values(features, actions), config.critic_reduction),
                    config.local_steps)
    return best, best_values, best_step, gradient_norm


# --------------------------------------------------------------------------------------------
# LoRA adapters (OpenVLA)
# --------------------------------------------------------------------------------------------


def has_lora(module: nn.Module) -> bool:
    """Whether peft's LoRA layers are in ``module``."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(child, LoraLayer) for child in module.modules())


def attach_lora(policy: OpenVLAPolicy, config: PARLConfig = PARLConfig()) -> list[nn.Parameter]:
    """Put LoRA adapters (``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``)
    into the policy's model in place (peft's ``inject_adapter_in_model``: the model object, its
    attributes and the adapter's sampling code stay as they are) and freeze every other weight.
    Idempotent. Returns the trainable (adapter) parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    model = policy.model
    if not has_lora(model):
        targets = config.lora_target_modules
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules="all-linear" if targets == ("all-linear",) else list(targets),
                          init_lora_weights="gaussian")
        inject_adapter_in_model(lora, model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not parameters:
        raise ValueError(f"no LoRA adapter was placed: PARLConfig.lora_target_modules {config.lora_target_modules} "
                         "matches no module of the checkpoint")
    return parameters


def save_lora(policy: OpenVLAPolicy, directory: str | Path) -> Path:
    """Write the adapters' weights (peft's state dict) to ``directory/lora.safetensors``."""
    from peft import get_peft_model_state_dict

    path = Path(directory) / LORA_WEIGHTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(policy.model)
    safetensors.torch.save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()},
                                str(path))
    return path


def load_lora(policy: OpenVLAPolicy, directory: str | Path, config: PARLConfig) -> None:
    """Attach adapters shaped by ``config`` and load ``directory/lora.safetensors`` into them; an
    adapter missing from the file, or a tensor that fits none, is an error naming the file."""
    from peft import set_peft_model_state_dict

    path = Path(directory) / LORA_WEIGHTS_FILE
    try:
        tensors = safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    attach_lora(policy, config)
    try:
        result = set_peft_model_state_dict(policy.model, tensors)
    except RuntimeError as error:  # shape mismatch
        raise ValueError(f"{path}: the adapters do not fit the checkpoint: {error}") from None
    missing = [name for name in result.missing_keys if "lora_" in name]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: the adapters do not fit the checkpoint (missing: {missing[:3]}, "
                         f"unexpected: {list(result.unexpected_keys)[:3]})")


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------


@runtime_checkable
class DistillablePolicy(Protocol):
    """A policy that can be trained on (observation, action) pairs with its own supervised loss."""

    action_dim: int

    def supervised_loss(self, observations: PolicyInput, actions: torch.Tensor,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A scalar loss whose minimisation makes ``actions`` ``[B, A]`` likely given ``observations``
        (a batch in :meth:`Policy.sample`'s format), differentiable in the trained weights."""
        ...


def distillation_module(policy: Policy, config: PARLConfig = PARLConfig()) -> nn.Module:
    """The module whose trainable weights distillation moves: a diffusion policy's network (encoder
    and denoiser), an OpenVLA model's LoRA adapters (attached here when missing)."""
    if isinstance(policy, DiffusionPolicy):
        return policy.network
    if isinstance(policy, OpenVLAPolicy):
        attach_lora(policy, config)
        return policy.model
    raise TypeError(f"no distillation rule for {type(policy).__name__}: pass Distiller(module=...) with the "
                    "module to train")


def take_rows(observations: PolicyInput, rows: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """The observations ``rows`` of a batch (tensors, arrays or lists of strings)."""
    index = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
    taken: dict[str, Any] = {}
    for key, value in observations.items():
        if isinstance(value, torch.Tensor):
            taken[key] = value[torch.as_tensor(index, device=value.device)]
        elif isinstance(value, np.ndarray):
            taken[key] = value[index]
        else:
            taken[key] = [value[int(row)] for row in index]
    return taken


def _batch_size(observations: PolicyInput) -> int:
    sizes = {len(value) for value in observations.values()}
    if len(sizes) != 1:
        raise ValueError(f"observation fields have different batch sizes: {sorted(sizes)}")
    return sizes.pop()


class Distiller:
    """Trains a base policy on (observation, optimised action) pairs with its supervised loss.

    Holds the AdamW optimiser (its moments carry over from one PA-RL iteration to the next) over the
    trainable parameters of ``module`` (default :func:`distillation_module`). Each step runs the
    module in train mode and restores its mode afterwards. Seeded by ``config.seed``.
    """

    def __init__(self, policy: Policy, config: PARLConfig = PARLConfig(), module: Optional[nn.Module] = None) -> None:
        if not isinstance(policy, DistillablePolicy):
            raise TypeError(f"{type(policy).__name__} has no supervised_loss(observations, actions): it cannot be "
                            "distilled into")
        self.policy = policy
        self.config = config
        self.module = module if module is not None else distillation_module(policy, config)
        self.parameters = [parameter for parameter in self.module.parameters() if parameter.requires_grad]
        if not self.parameters:
            raise ValueError(f"{type(policy).__name__}: the distilled module has no trainable parameter")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.distill_lr, weight_decay=0.0)
        self.rng = np.random.default_rng(config.seed)
        self._generator = SeededGenerators(config.seed)
        #: Distillation steps taken.
        self.steps = 0

    def step(self, observations: PolicyInput, actions: torch.Tensor) -> torch.Tensor:
        """One optimiser step on the whole given batch; returns the (detached) loss before it."""
        was_training = self.module.training
        self.module.train()
        try:
            loss = self.policy.supervised_loss(observations, actions, self._generator(self.policy.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.distill_grad_clip_norm > 0:
                nn.utils.clip_grad_norm_(self.parameters, self.config.distill_grad_clip_norm)
            self.optimizer.step()
        finally:
            self.module.train(was_training)
        self.steps += 1
        return loss.detach()

    def distill(self, observations: PolicyInput, actions: torch.Tensor, steps: int,
                batch_size: Optional[int] = None) -> dict[str, float]:
        """``steps`` steps, each on ``batch_size`` (default ``distill_batch``) pairs drawn without
        replacement from the given ones (all of them when fewer). Returns the mean, first and last
        loss."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        rows = _batch_size(observations)
        if len(actions) != rows:
            raise ValueError(f"{len(actions)} actions for {rows} observations")
        size = min(batch_size or self.config.distill_batch, rows)
        losses = []
        for _ in range(steps):
            if size == rows:
                losses.append(self.step(observations, actions))
            else:
                chosen = self.rng.choice(rows, size, replace=False)
                losses.append(self.step(take_rows(observations, chosen), actions[torch.as_tensor(chosen)]))
        values = torch.stack(losses).tolist()
        return {"distill_loss": float(np.mean(values)), "distill_loss_first": values[0],
                "distill_loss_last": values[-1]}


def distill(policy: Policy, observations: PolicyInput, optimized_actions: torch.Tensor, steps: int,
            config: PARLConfig = PARLConfig()) -> dict[str, float]:
    """Distil optimised actions ``[B, A]`` (e.g. ``optimize_actions(...)[0][:, 0]``, each state's
    best) into ``policy`` by ``steps`` supervised steps; a :class:`Distiller` made for this call
    (keep one to carry the optimiser's moments across calls)."""
    return Distiller(policy, config).distill(observations, optimized_actions, steps)


class DistillationBuffer:
    """A ring buffer of the newest ``capacity`` (observation, optimised action) pairs, on the CPU.

    Observation fields are tensors (a replay batch's); the buffer is laid out on the first
    :meth:`add` and later batches must carry the same fields, shapes and dtypes.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.observations: dict[str, torch.Tensor] = {}
        self.actions: Optional[torch.Tensor] = None
        self.rng = np.random.default_rng(seed)
        self._next = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, observations: Mapping[str, torch.Tensor], actions: torch.Tensor) -> None:
        rows = actions.shape[0]
        if self.actions is None:
            self.observations = {key: torch.empty((self.capacity, *value.shape[1:]), dtype=value.dtype)
                                 for key, value in observations.items()}
            self.actions = torch.empty((self.capacity, *actions.shape[1:]), dtype=torch.float32)
        if set(observations) != set(self.observations):
            raise ValueError(f"observation fields {sorted(observations)} differ from the buffer's "
                             f"{sorted(self.observations)}")
        slots = (self._next + torch.arange(rows)) % self.capacity
        for key, value in observations.items():
            self.observations[key][slots] = value.detach().to("cpu", self.observations[key].dtype)
        self.actions[slots] = actions.detach().to("cpu", torch.float32)
        self._next = (self._next + rows) % self.capacity
        self._size = min(self._size + rows, self.capacity)

    def contents(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The stored pairs (views, oldest slot first once the buffer has wrapped)."""
        assert self.actions is not None or not self._size
        if self.actions is None:
            return {}, torch.empty(0)
        return ({key: value[: self._size] for key, value in self.observations.items()}, self.actions[: self._size])

    def sample(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor],
                                                                                    torch.Tensor]:
        """``batch_size`` pairs drawn uniformly (with replacement), moved to ``device``."""
        if not self._size:
            raise ValueError("the distillation buffer is empty")
        rows = torch.from_numpy(self.rng.integers(0, self._size, batch_size))
        assert self.actions is not None
        return ({key: value[rows].to(device) for key, value in self.observations.items()},
                self.actions[rows].to(device))


# --------------------------------------------------------------------------------------------
# Acting
# --------------------------------------------------------------------------------------------


@register_policy("parl")
class PARLActingPolicy(SteeredPolicy):
    """The base policy's optimised actions (module docstring, "Acting").

    ``sample`` runs :func:`optimize_actions` and returns the best optimised action in every slot
    (``deterministic``, or ``action_temperature`` 0) or ``num_samples`` independent draws among the
    k with probabilities softmax(Q / beta). :attr:`last_info` holds the last optimisation's info.

    A directory written by :meth:`save`::

        policy.json          {"kind": "parl", "config": <PARLConfig>, "base": "base", "critic": "critic",
                              "lora": "lora" or null}
        base/                the base policy's directory (its Policy.save)
        critic/              the critic (QCritic.save)
        lora/lora.safetensors   an OpenVLA base's LoRA adapters, when it has them

    ``load_policy`` finds the kind once this module is imported.
    """

    def __init__(self, base: Policy, critic: Union[QCritic, ActionGradientCritic],
                 config: PARLConfig = PARLConfig()) -> None:
        self.base = base
        self.critic = critic
        self.config = config
        self._steering = as_gradient_critic(critic)
        if self._steering.action_dim != base.action_dim:
            raise ValueError(f"the base policy acts in {base.action_dim} dimensions and the critic scores "
                             f"{self._steering.action_dim}")
        self.action_dim = base.action_dim
        self.last_info: dict[str, float] = {}
        self._generator = SeededGenerators(config.seed)

    def sample(self, observations: PolicyInput, num_samples: int, deterministic: bool = False) -> torch.Tensor:
        if not isinstance(num_samples, numbers.Integral) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        actions, values, self.last_info = optimize_actions(self.base, self._steering, observations, self.config)
        beta = self.config.action_temperature
        if deterministic or beta == 0:
            chosen = actions[:, :1].expand(-1, num_samples, -1)
        else:
            generator = self._generator(values.device)
            draws = torch.multinomial(torch.softmax(values / beta, dim=1), num_samples, replacement=True,
                                      generator=generator)
            chosen = actions.gather(1, draws[..., None].expand(-1, -1, actions.shape[2]))
        return chosen.to(self.device)

    def save(self, directory: str | Path) -> None:
        save_critic = getattr(self.critic, "save", None)
        if not callable(save_critic):
            raise TypeError(f"the critic ({type(self.critic).__name__}) has no save(); use a QCritic")
        directory = Path(directory)
        self.base.save(directory / "base")
        save_critic(directory / "critic")
        lora = None
        if isinstance(self.base, OpenVLAPolicy) and has_lora(self.base.model):
            save_lora(self.base, directory / "lora")
            lora = "lora"
        write_policy_file(directory, self.kind, config=to_dict(self.config), base="base", critic="critic", lora=lora)

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "PARLActingPolicy":
        directory = Path(directory)
        content = read_policy_file(directory)
        source = str(directory / POLICY_FILE)
        if content["kind"] != cls.kind:
            raise ValueError(f"{source}: kind {content['kind']!r} is not {cls.kind!r}")
        for name in ("config", "base", "critic"):
            if name not in content:
                raise ValueError(f"{source}: needs a field {name!r}")
        config = _config_from_dict(content["config"], f"{source}: config")

        def resolve(name: str) -> Path:
            value = content[name]
            if not isinstance(value, str) or not value:
                raise ValueError(f"{source}: {name} must be a directory path, got {value!r}")
            path = Path(value).expanduser()
            return path if path.is_absolute() else directory / path

        base = load_policy(resolve("base"), device)
        if content.get("lora"):
            if not isinstance(base, OpenVLAPolicy):
                raise ValueError(f"{source}: LoRA adapters are saved for an OpenVLA base, the base is "
                                 f"{type(base).__name__}")
            load_lora(base, resolve("lora"), config)
        critic = load_critic(resolve("critic"), device, content.get("critic_network", "target"))
        return cls(base, critic, config)


# --------------------------------------------------------------------------------------------
# The learner
# --------------------------------------------------------------------------------------------


class PARLAgent(SACAgent):
    """PA-RL's learner state: SAC's critic machinery, the base policy and its distillation.

    One PA-RL iteration is :meth:`update` (``utd_ratio`` critic steps with optimised next actions,
    then the optimised actions at the last minibatch's states stored for distillation) followed by
    :meth:`distill` (``distill_steps`` supervised steps of the base policy on stored pairs).

    The Gaussian actor and the temperature :class:`~learner.sac.SACAgent` builds are never updated
    (the base policy acts); the checkpoint format is SAC's, so a Cal-QL or SAC checkpoint's critic
    warm-starts this agent (``load_checkpoint``). The base policy is saved by its own ``save``.

    Args:
        config: PA-RL settings.
        base_policy: the policy to improve (any :class:`DistillablePolicy`).
        observation_space, action_space, device, seed: as for ``SACAgent``.
        sac, observation_keys: the critic's networks and update (discount, learning rate, ensemble,
            subset, UTD; ``backup_entropy`` is ignored: no entropy terms) and the fields it sees,
            as ``SACAgent`` takes them (a session passes ``learner.sac`` and ``learner.observation_keys``).
        distill_module: the module distillation trains, for a policy class
            :func:`distillation_module` does not know.
    """

    def __init__(
        self,
        config: PARLConfig,
        base_policy: Policy,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        sac: SACConfig = SACConfig(),
        observation_keys: tuple[str, ...] = (),
        device: torch.device | str = "cpu",
        seed: int = 0,
        distill_module: Optional[nn.Module] = None,
    ) -> None:
        config.validate()
        if sac.gripper_critic.enabled:
            raise ValueError("sac.gripper_critic.enabled: PA-RL optimises every action dimension with the continuous "
                             "critic; the discrete gripper head is not supported")
        super().__init__(dataclasses.replace(sac, backup_entropy=False), observation_space, action_space,
                         observation_keys, device, seed)
        if base_policy.action_dim != self.policy.action_dim:
            raise ValueError(f"the base policy acts in {base_policy.action_dim} dimensions, the action space has "
                             f"{self.policy.action_dim}")
        self.parl_config = config
        self.base_policy = base_policy
        self.distiller = Distiller(base_policy, config, distill_module)
        self.pairs = DistillationBuffer(config.distill_buffer_size, seed)
        self.critics = {network: EnsembleCritic.from_agent(self, network) for network in NETWORKS}

    @property
    def steering_critic(self) -> EnsembleCritic:
        """The critic view that steers the action optimisation (``optimize_with``)."""
        return self.critics[self.parl_config.optimize_with]

    def batch_to_torch(self, batch: Any) -> TorchBatch:
        """Every observation field: the base policy reads its own (e.g. an image the critic ignores)."""
        return batch_to_torch(batch, self.device)

    def optimize(self, observations: PolicyInput) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """:func:`optimize_actions` of the base policy with the steering critic."""
        return optimize_actions(self.base_policy, self.steering_critic, observations, self.parl_config)

    def optimized_td_target(self, batch: TorchBatch, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     dict[str, float]]:
        """``y = r + gamma (1 - d) min_{i in I} Q'_i(s', a*(s'))`` (``SACAgent.td_target``, no entropy
        term) with a*(s') the best optimised action at each next state. Returns ``y`` ``[B]``, a*
        ``[B, A]`` and the optimisation's info. ``augment``: DrQ shift of the target critic's images."""
        next_actions, _, info = self.optimize(batch.next_observations)
        best = next_actions[:, 0]
        with torch.no_grad():
            prepared = self.target_encoder.prepare(batch.next_observations, augment=augment, generator=self.generator)
            next_q = self.target_critic(self.target_encoder.encode(prepared), best)
            target = self.td_target(batch.rewards, batch.terminated, next_q, torch.zeros_like(batch.rewards))
        return target, best, info

    def update(self, batch: Any) -> dict[str, float]:
        """``utd_ratio`` critic steps on consecutive minibatches, then the optimised actions at the
        first ``distill_batch`` states of the last minibatch go to :attr:`pairs`. Returns float metrics: the critic's
        (``critic_loss``, ``q_mean``, ``td_target_mean``), ``next_critic_gain`` (the TD target
        optimisation's) and ``critic_gain``, ``q_base``, ``q_optimized`` (the stored actions')."""
        data = batch if isinstance(batch, TorchBatch) else self.batch_to_torch(batch)
        utd = self.config.utd_ratio
        rows = data.rewards.shape[0]
        if rows % utd:
            raise ValueError(f"a batch of {rows} rows does not split into utd_ratio={utd} minibatches")
        size = rows // utd
        critic_metrics: list[torch.Tensor] = []
        next_gains: list[float] = []
        for index in range(utd):
            minibatch = data.rows(index * size, (index + 1) * size)
            metrics, next_info = self._critic_step_with_optimized_targets(minibatch)
            critic_metrics.append(metrics)
            next_gains.append(next_info["critic_gain"])
        # Distillation draws distill_batch pairs per step: optimising more states than that here
        # would cost base-policy samples the buffer's turnover does not need.
        kept = minibatch.rows(0, min(size, self.parl_config.distill_batch))
        actions, _, info = self.optimize(kept.observations)
        self.pairs.add(kept.observations, actions[:, 0])
        self.update_count += 1
        critic_loss, q_mean, target_mean = torch.stack(critic_metrics).mean(dim=0).tolist()
        return {"critic_loss": critic_loss, "q_mean": q_mean, "td_target_mean": target_mean,
                "next_critic_gain": float(np.mean(next_gains)), "critic_gain": info["critic_gain"],
                "q_base": info["q_base"], "q_optimized": info["q_optimized"], "distill_pairs": float(len(self.pairs)),
                "update_count": float(self.update_count)}

    def _critic_step_with_optimized_targets(self, batch: TorchBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """SAC's critic regression towards :meth:`optimized_td_target`, then the Polyak update.
        Returns ``[critic_loss, q_mean, td_target_mean]`` and the next-action optimisation's info."""
        target, _, info = self.optimized_td_target(batch)
        with torch.no_grad():
            observation = self.encoder.prepare(batch.observations, augment=True, generator=self.generator)
        q_values = self.critic(self.encoder.encode(observation), batch.actions)
        loss = (q_values - target).square().mean(dim=1).sum()
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self._polyak_target, self._polyak_online, self.config.tau)
        return torch.stack([loss.detach(), q_values.detach().mean(), target.mean()]), info

    def distill(self, steps: Optional[int] = None) -> dict[str, float]:
        """``steps`` (default ``distill_steps``) supervised steps of the base policy, each on
        ``distill_batch`` pairs drawn from :attr:`pairs`; returns the mean loss (empty before the
        first :meth:`update`)."""
        steps = self.parl_config.distill_steps if steps is None else steps
        if not len(self.pairs):
            return {}
        losses = []
        for _ in range(steps):
            observations, actions = self.pairs.sample(self.parl_config.distill_batch, self.base_policy.device)
            losses.append(self.distiller.step(observations, actions))
        return {"distill_loss": float(torch.stack(losses).mean()), "distill_steps": float(self.distiller.steps)}

    def acting_policy(self) -> PARLActingPolicy:
        """A snapshot for acting: the base policy (shared) steered by a copy of the steering critic."""
        return PARLActingPolicy(self.base_policy, QCritic.from_agent(self, self.parl_config.optimize_with),
                                self.parl_config)

    def publish_policy(self) -> bytes:
        """What the actor runs: :meth:`acting_policy` packed by :func:`policies.base.policy_to_bytes`
        (the base policy's directory and the steering critic's)."""
        return policy_to_bytes(self.acting_policy())

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """SAC's tensors plus the distillation optimiser's moments (``distill_optimizer.<i>.<field>``);
        the base policy's own weights are saved by its ``save`` (the learner's checkpoint does it)."""
        tensors = super().checkpoint_tensors()
        for index, fields in self.distiller.optimizer.state_dict()["state"].items():
            for name, value in fields.items():
                tensors[f"distill_optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous().clone()
        return tensors

    def checkpoint_meta(self) -> dict[str, Any]:
        """SAC's metadata (the same format) plus the PA-RL settings and the distillation's state."""
        meta = super().checkpoint_meta()
        meta["algorithm"] = ALGORITHM
        meta["parl"] = self.parl_config.to_json()
        meta["distill_steps"] = self.distiller.steps
        meta["distill_param_groups"] = json_safe(self.distiller.optimizer.state_dict()["param_groups"])
        return meta

    def load_checkpoint(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`checkpoint_tensors` / :meth:`checkpoint_meta` (the base policy's weights
        are loaded with the policy, before)."""
        prefix = "distill_optimizer."
        super().load_checkpoint({k: v for k, v in tensors.items() if not k.startswith(prefix)}, meta)
        if "distill_param_groups" in meta:
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith(prefix):
                    index, field_name = key[len(prefix):].split(".", 1)
                    state.setdefault(int(index), {})[field_name] = value
            self.distiller.optimizer.load_state_dict({"state": state, "param_groups": meta["distill_param_groups"]})
            self.distiller.steps = int(meta.get("distill_steps", 0))


__all__ = [
    "ActionGradientCritic",
    "DistillablePolicy",
    "DistillationBuffer",
    "Distiller",
    "EnsembleCritic",
    "PARLActingPolicy",
    "PARLAgent",
    "PARLConfig",
    "as_gradient_critic",
    "attach_lora",
    "distill",
    "distillation_module",
    "has_lora",
    "load_lora",
    "load_parl_config",
    "optimize_actions",
    "reduce_ensemble",
    "save_lora",
    "take_rows",
]
