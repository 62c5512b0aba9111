r"""Soft Actor-Critic with the RLPD recipe (LayerNorm critics, ensemble + random-subset min, high UTD).

Notation: observation s, action a in [-1, 1]^A, reward r, ``terminated`` d (1 = no bootstrap;
truncations are 0), discount gamma, temperature alpha = exp(log_alpha), E = ``num_critics``,
M = ``critic_subset``, tau = Polyak rate, phi = the shared observation encoder.

Critic (E Q-networks Q_i(phi(s), a) on one shared encoder, trained together with it)::

    a' ~ pi(. | s')                                   (current policy, no gradient)
    Q'(s', a') = min_{i in I} Q'_i(phi'(s'), a')      I = random M-subset of the E target critics
    y = r + gamma (1 - d) [ Q'(s', a') - alpha log pi(a'|s') ]     (entropy term iff backup_entropy)
    L_Q = sum_i mean_batch (Q_i(phi(s), a) - y)^2

Actor (the encoder features are detached: the actor never moves the critic's encoder)::

    a ~ pi(. | s)  (reparameterised),   L_pi = mean_batch [ alpha log pi(a|s) - mean_i Q_i(sg(phi(s)), a) ]

Temperature (target entropy H* = -A/2 by default)::

    L_alpha = mean_batch [ -log_alpha (log pi(a|s) + H*) ]   (log pi detached)

Targets (encoder + critics, and the gripper head) follow theta' <- (1 - tau) theta' + tau theta
after every critic step. Images get a DrQ random shift, drawn once per minibatch and shared by the
critic, the targets and the actor.

Update-to-data ratio (RLPD / LeRobot): :meth:`SACAgent.update` receives ``utd_ratio`` minibatches
stacked into one batch of ``utd_ratio * batch_size`` rows, performs ``utd_ratio`` critic steps on
consecutive minibatches, then one actor and one temperature step on the last minibatch.

Gripper critic (HIL-SERL, ``gripper_critic.enabled``): the Gaussian covers all action dimensions
but the last; the gripper is chosen by a discrete double-DQN head G(phi(s)) over
{0: open (-1), 1: stay (keep the current state), 2: close (+1)}, the current state being "closed"
when ``gripper_width`` is below half its Box high. A stored transition's label is recovered from the
executed gripper value g and the state: sign(g) agrees with the state -> stay, else open (g <= 0)
or close (g > 0). With the toggle penalty c::

    r_g = r - c [label != stay]
    y_g = r_g + gamma (1 - d) G'(phi'(s'), argmax_b G(phi(s'), b))
    L_G = mean_batch (G(sg(phi(s)), label) - y_g)^2
          + w mean_batch [ logsumexp_b G(sg(phi(s)), b) - G(sg(phi(s)), label) ]   (w: conservative_weight)

Training actions take the greedy choice argmax_b G(phi(s), b) epsilon-greedily
(``gripper_critic.exploration_epsilon``): the labels above come from the executed commands, so a
choice the policy never makes at a state would otherwise never get a target there.

The continuous critics see only the continuous action dimensions.

State standardisation (``normalize_state``): before the first update the learner calls
:meth:`SACAgent.fit_state_normalization` with the demos and the first online observations; the
encoder (online and target) then feeds ``(x - mean) / std`` to every network. The statistics are
frozen afterwards (moving them would shift every network's input under it) and are part of the
published policy and of the checkpoints.

Extensions: an algorithm built on this update (Cal-QL, learner/calql.py) subclasses
:class:`SACAgent` and adds loss terms through :meth:`SACAgent._critic_regularizer` and
:meth:`SACAgent._actor_regularizer`; both add nothing here. It keeps the networks, optimisers and
checkpoint format, so its checkpoints load into a plain :class:`SACAgent`.

Checkpoints hold no pickle: :meth:`SACAgent.checkpoint_tensors` is a flat ``name -> tensor`` dict
(for safetensors) and :meth:`SACAgent.checkpoint_meta` a JSON-able dict; optimiser states are
flattened into both (per-parameter moments as tensors, hyper-parameters as JSON).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch
from gymnasium import spaces
from torch import nn
from torch.nn import functional as F

from hardware_configs.schema import SACConfig
from policies.encoders import ObservationEncoder
from policies.gaussian import (
    GRIPPER_CLOSE,
    GRIPPER_OPEN,
    GRIPPER_STAY,
    GRIPPER_WIDTH_KEY,
    TanhGaussianPolicy,
    gripper_closed,
    policy_state_to_bytes,
)

CHECKPOINT_FORMAT = "steerl.sac/1"


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class TorchBatch:
    """A replay batch as tensors on the learner's device (images still uint8)."""

    observations: dict[str, torch.Tensor]
    actions: torch.Tensor
    rewards: torch.Tensor
    next_observations: dict[str, torch.Tensor]
    terminated: torch.Tensor
    intervened: torch.Tensor

    def rows(self, start: int, stop: int) -> "TorchBatch":
        """Rows ``start:stop`` as views (no copy)."""
        return TorchBatch(
            {k: v[start:stop] for k, v in self.observations.items()},
            self.actions[start:stop],
            self.rewards[start:stop],
            {k: v[start:stop] for k, v in self.next_observations.items()},
            self.terminated[start:stop],
            self.intervened[start:stop],
        )


def _to_device(array: np.ndarray | torch.Tensor, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    return tensor.to(device=device, dtype=dtype, non_blocking=True)


def batch_to_torch(batch: Any, device: torch.device | str = "cpu", keys: Optional[tuple[str, ...]] = None) -> TorchBatch:
    """A replay ``Batch`` (numpy fields, see learner/replay.py) -> :class:`TorchBatch` on ``device``.

    Observation dtypes are kept (uint8 images travel as uint8 and are converted in the encoder);
    actions, rewards and ``terminated`` become float32, ``intervened`` bool. ``keys`` limits the
    observation fields converted (default: all of them).
    """
    device = torch.device(device)

    def observations(fields: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        selected = keys if keys is not None else tuple(fields)
        return {key: _to_device(fields[key], device) for key in selected}

    return TorchBatch(
        observations=observations(batch.observations),
        actions=_to_device(batch.actions, device, torch.float32),
        rewards=_to_device(batch.rewards, device, torch.float32).reshape(-1),
        next_observations=observations(batch.next_observations),
        terminated=_to_device(batch.terminated, device, torch.float32).reshape(-1),
        intervened=_to_device(batch.intervened, device, torch.bool).reshape(-1),
    )


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


class CriticEnsemble(nn.Module):
    """E Q-networks as one batched MLP: stacked weights ``[E, in, out]`` and ``baddbmm`` per layer.

    Each member: Linear -> (LayerNorm) -> ReLU per hidden layer -> Linear to a scalar. All members
    see the same input ``[features, action]``.
    """

    def __init__(self, input_dim: int, hidden_dims: tuple[int, ...], num_critics: int, layer_norm: bool) -> None:
        super().__init__()
        self.num_critics = num_critics
        self.layer_norm = layer_norm
        dims = (input_dim, *hidden_dims, 1)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norm_scales = nn.ParameterList()
        self.norm_shifts = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, per member
            self.weights.append(nn.Parameter(torch.empty(num_critics, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_critics, 1, fan_out).uniform_(-bound, bound)))
        if layer_norm:
            for width in hidden_dims:
                self.norm_scales.append(nn.Parameter(torch.ones(num_critics, 1, width)))
                self.norm_shifts.append(nn.Parameter(torch.zeros(num_critics, 1, width)))
        # F.layer_norm takes a per-feature (not per-member) affine; without one it runs a ~3x slower
        # CPU kernel, so it gets an identity affine and the per-member one follows as one addcmul.
        widest = max(hidden_dims, default=1)
        self.register_buffer("_identity_scale", torch.ones(widest), persistent=False)
        self.register_buffer("_identity_shift", torch.zeros(widest), persistent=False)

    def forward(self, features: torch.Tensor, actions: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """Q-values ``[E, B]``. ``detach_params``: gradients flow to the inputs only (actor loss)."""

        def param(p: torch.Tensor) -> torch.Tensor:
            return p.detach() if detach_params else p

        inputs = torch.cat([features, actions], dim=-1)
        hidden = inputs.unsqueeze(0).expand(self.num_critics, *inputs.shape)
        last = len(self.weights) - 1
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            hidden = torch.baddbmm(param(bias), hidden, param(weight))
            if index == last:
                break
            if self.layer_norm:
                width = hidden.shape[-1]
                hidden = F.layer_norm(hidden, (width,), self._identity_scale[:width], self._identity_shift[:width])
                hidden = torch.addcmul(param(self.norm_shifts[index]), hidden, param(self.norm_scales[index]))
            hidden = hidden.relu_()  # in place: neither baddbmm nor addcmul keeps its output for backward
        return hidden.squeeze(-1)


def gripper_labels(executed_gripper: torch.Tensor, closed: torch.Tensor) -> torch.Tensor:
    """Discrete label (open/stay/close, int64 ``[B]``) of stored transitions: an executed value whose
    sign agrees with the current state is "stay", otherwise the command it amounts to."""
    commands_close = executed_gripper > 0
    return torch.where(
        commands_close == closed,
        torch.full_like(closed, GRIPPER_STAY, dtype=torch.long),
        torch.where(commands_close, GRIPPER_CLOSE, GRIPPER_OPEN),
    )


def _frozen_copy(module: nn.Module) -> nn.Module:
    target = copy.deepcopy(module)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    return target


def _adam(parameters: list[nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    # The fused kernel is one launch for all parameters (CPU and CUDA); ~3x faster than foreach here.
    return torch.optim.Adam(parameters, lr=lr, fused=device.type in ("cpu", "cuda"))


# --------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------


class SACAgent:
    """SAC/RLPD learner state and updates (see the module docstring for the math).

    Args:
        config: SAC hyper-parameters.
        observation_space: the robot's observation ``spaces.Dict``.
        action_space: ``Box(-1, 1, (A,))``.
        observation_keys: fields the networks see (empty: all).
        device: where the networks live and the updates run.
        seed: seeds the initial weights and every random draw of the updates (one generator).
    """

    def __init__(
        self,
        config: SACConfig,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        observation_keys: tuple[str, ...] = (),
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        config.validate()
        config.image_encoder.validate()
        self.config = config
        self.device = torch.device(device)
        self.observation_space = observation_space
        self.action_space = action_space

        # Seed the initial weights without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = ObservationEncoder(observation_space, observation_keys, config.image_encoder)
            self.policy = TanhGaussianPolicy(
                config, observation_space, action_space, observation_keys, encoder=self.encoder, seed=seed
            ).to(self.device)
            self.critic = CriticEnsemble(
                self.encoder.output_dim + self.policy.continuous_dim,
                tuple(config.hidden_dims), config.num_critics, config.layer_norm,
            ).to(self.device)
            self.target_encoder = self.encoder.make_target_copy()
        for parameter in self.target_encoder.parameters():
            parameter.requires_grad_(False)
        self.observation_keys = self.encoder.keys
        self.use_gripper_critic = self.policy.gripper_head is not None
        self.target_critic = _frozen_copy(self.critic)
        self.target_gripper_head = _frozen_copy(self.policy.gripper_head) if self.use_gripper_critic else None

        self.log_alpha = torch.tensor(math.log(config.init_temperature), device=self.device, requires_grad=True)
        self.target_entropy = (
            float(config.target_entropy) if config.target_entropy is not None else -self.policy.continuous_dim / 2.0
        )
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

        critic_parameters = list(self.encoder.parameters()) + list(self.critic.parameters())
        if self.use_gripper_critic:
            critic_parameters += list(self.policy.gripper_head.parameters())
        self.critic_optimizer = _adam(critic_parameters, config.critic_lr, self.device)
        self.actor_optimizer = _adam(list(self.policy.head.parameters()), config.actor_lr, self.device)
        self.temperature_optimizer = _adam([self.log_alpha], config.temperature_lr, self.device)

        online, target = [self.encoder, self.critic], [self.target_encoder, self.target_critic]
        if self.use_gripper_critic:
            online.append(self.policy.gripper_head)
            target.append(self.target_gripper_head)
        self._polyak_online = [p for module in online for p in module.parameters()]
        self._polyak_target = [p for module in target for p in module.parameters()]
        self._batch_keys = self.observation_keys + (
            (GRIPPER_WIDTH_KEY,) if self.use_gripper_critic and GRIPPER_WIDTH_KEY not in self.observation_keys else ()
        )
        self.update_count = 0
        self.state_normalized = False

    def fit_state_normalization(self, observations: list[Mapping[str, np.ndarray]]) -> None:
        """Measure the state statistics on batched observation dicts (e.g. the demo buffer's and the
        online buffer's) and freeze them in the encoder and its target (see the module docstring)."""
        if not self.encoder.state_keys or not self.config.normalize_state:
            self.state_normalized = True  # nothing to measure: the encoder keeps mean 0, std 1
            return
        states = np.concatenate([self.encoder.state_vector(fields) for fields in observations], axis=0)
        for encoder in (self.encoder, self.target_encoder):
            encoder.set_state_normalization(states, self.config.state_min_std)
        self.state_normalized = True

    # ----------------------------------------------------------------------------------------
    # Acting and publishing
    # ----------------------------------------------------------------------------------------

    def act(self, observation: Mapping[str, np.ndarray], deterministic: bool = False) -> np.ndarray:
        """One unbatched observation -> one env action (float32 ``[A]``)."""
        return self.policy.act(observation, deterministic)

    def publish_policy(self) -> bytes:
        """The policy (encoder = the critic's encoder, Gaussian head, gripper head) as safetensors bytes."""
        return policy_state_to_bytes(self.policy)

    @property
    def temperature(self) -> float:
        return float(self.log_alpha.detach().exp())

    # ----------------------------------------------------------------------------------------
    # Updates
    # ----------------------------------------------------------------------------------------

    def batch_to_torch(self, batch: Any) -> TorchBatch:
        """The fields this agent reads, as tensors on its device."""
        return batch_to_torch(batch, self.device, self._batch_keys)

    def update(self, batch: Any, update_actor: bool = True) -> dict[str, float]:
        """``utd_ratio`` critic steps on consecutive minibatches, then one actor + temperature step
        on the last one (none with ``update_actor=False``: critics only). ``batch``: a replay Batch
        (numpy) or a :class:`TorchBatch` whose row count is a multiple of ``utd_ratio``. Returns
        float metrics (one device sync)."""
        data = batch if isinstance(batch, TorchBatch) else self.batch_to_torch(batch)
        utd = self.config.utd_ratio
        rows = data.rewards.shape[0]
        if rows % utd:
            raise ValueError(f"a batch of {rows} rows does not split into utd_ratio={utd} minibatches")
        size = rows // utd
        critic_metrics: list[dict[str, torch.Tensor]] = []
        for index in range(utd):
            minibatch = data.rows(index * size, (index + 1) * size)
            prepared_observation, metrics = self._critic_step(minibatch)
            critic_metrics.append(metrics)
        actor_metrics = self._actor_and_temperature_step(prepared_observation, minibatch) if update_actor else {}
        self.update_count += 1

        names = list(critic_metrics[0])
        averaged = [torch.stack([m[name] for m in critic_metrics]).mean() for name in names]
        names += list(actor_metrics) + ["intervention_rate"]
        values = torch.stack(averaged + list(actor_metrics.values()) + [data.intervened.float().mean()]).tolist()
        result = dict(zip(names, values))
        result["update_count"] = float(self.update_count)
        return result

    def _continuous(self, actions: torch.Tensor) -> torch.Tensor:
        return actions[:, :-1] if self.use_gripper_critic else actions

    def td_target(
        self,
        rewards: torch.Tensor,
        terminated: torch.Tensor,
        next_target_q: torch.Tensor,
        next_log_prob: torch.Tensor,
    ) -> torch.Tensor:
        """``y = r + gamma (1 - d) (min over a random critic_subset of Q'(s', a') - alpha log pi(a'|s'))``.

        ``next_target_q``: ``[E, B]`` target-critic values of the sampled next actions.
        """
        subset = self.config.critic_subset
        if subset < next_target_q.shape[0]:
            chosen = torch.randperm(next_target_q.shape[0], generator=self.generator, device=self.device)[:subset]
            next_target_q = next_target_q[chosen]
        next_value = next_target_q.min(dim=0).values
        if self.config.backup_entropy:
            next_value = next_value - self.log_alpha.detach().exp() * next_log_prob
        return rewards + self.config.discount * (1.0 - terminated) * next_value

    def _critic_step(self, batch: TorchBatch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        with torch.no_grad():
            observation = self.encoder.prepare(batch.observations, augment=True, generator=self.generator)
            next_observation = self.encoder.prepare(batch.next_observations, augment=True, generator=self.generator)
            next_features = self.encoder.encode(next_observation)
            next_actions, next_log_prob = self.policy.head(next_features, generator=self.generator)
            target_features = self.target_encoder.encode(next_observation)
            target = self.td_target(
                batch.rewards, batch.terminated, self.target_critic(target_features, next_actions), next_log_prob
            )

        features = self.encoder.encode(observation)
        q_values = self.critic(features, self._continuous(batch.actions))
        critic_loss = (q_values - target).square().mean(dim=1).sum()
        metrics = {
            "critic_loss": critic_loss.detach(),
            "q_mean": q_values.detach().mean(),
            "td_target_mean": target.mean(),
        }
        loss = critic_loss
        regularizer = self._critic_regularizer(batch, features, next_features, q_values)
        if regularizer is not None:
            regularizer_loss, regularizer_metrics = regularizer
            loss = loss + regularizer_loss
            metrics.update(regularizer_metrics)
        if self.use_gripper_critic:
            gripper_loss, gripper_q = self._gripper_loss(batch, features.detach(), next_features, target_features)
            loss = loss + gripper_loss
            metrics["gripper_loss"] = gripper_loss.detach()
            metrics["gripper_q_mean"] = gripper_q

        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self._polyak_target, self._polyak_online, self.config.tau)
        return observation, metrics

    def _critic_regularizer(
        self, batch: TorchBatch, features: torch.Tensor, next_features: torch.Tensor, q_data: torch.Tensor
    ) -> Optional[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """An extra term of the critic loss and its metrics, for algorithms built on this update
        (Cal-QL's conservative regulariser, learner/calql.py); plain SAC adds none.

        ``features``: phi(s) with gradient (the term may train the encoder and the critics);
        ``next_features``: phi(s') without gradient; ``q_data``: ``[E, B]`` Q_i(s, a) of the batch's
        (continuous) actions, the tensor the TD loss uses.
        """
        return None

    def _actor_regularizer(
        self, batch: TorchBatch, actions: torch.Tensor, log_prob: torch.Tensor
    ) -> Optional[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """An extra term of the actor loss and its metrics (e.g. a behaviour-cloning term); plain SAC
        adds none. ``actions``: the reparameterised policy actions ``[B, continuous_dim]`` at the
        batch's observations, ``log_prob`` their log-densities ``[B]``."""
        return None

    def _gripper_loss(
        self, batch: TorchBatch, features: torch.Tensor, next_features: torch.Tensor, target_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Double-DQN loss of the gripper head (features already detached)."""
        head, target_head = self.policy.gripper_head, self.target_gripper_head
        closed_below = self.policy.gripper_closed_below
        with torch.no_grad():
            labels = gripper_labels(batch.actions[:, -1], gripper_closed(batch.observations[GRIPPER_WIDTH_KEY], closed_below))
            rewards = batch.rewards - self.config.gripper_critic.toggle_penalty * (labels != GRIPPER_STAY).float()
            next_choice = head(next_features).argmax(dim=-1, keepdim=True)
            next_q = target_head(target_features).gather(1, next_choice).squeeze(1)
            target = rewards + self.config.discount * (1.0 - batch.terminated) * next_q
        q_classes = head(features)
        q_taken = q_classes.gather(1, labels[:, None]).squeeze(1)
        loss = F.mse_loss(q_taken, target)
        conservative = self._gripper_conservative_term(batch, q_classes, q_taken)
        if conservative is not None:
            loss = loss + conservative
        return loss, q_taken.detach().mean()

    def _gripper_conservative_term(
        self, batch: TorchBatch, q_classes: torch.Tensor, q_taken: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """The gripper head's conservative term ``w mean[logsumexp_b G(s, b) - G(s, label)]``
        (``gripper_critic.conservative_weight``; none at 0). Cal-QL replaces it with its calibrated one."""
        weight = self.config.gripper_critic.conservative_weight
        if weight == 0.0:
            return None
        return weight * (torch.logsumexp(q_classes, dim=1) - q_taken).mean()

    def _actor_and_temperature_step(
        self, observation: dict[str, torch.Tensor], batch: Optional[TorchBatch] = None
    ) -> dict[str, torch.Tensor]:
        """One actor and one temperature step on prepared observations (``batch``: the minibatch
        they came from, for :meth:`_actor_regularizer`)."""
        with torch.no_grad():  # the actor uses the critic's encoder but never trains it
            features = self.encoder.encode(observation)
        actions, log_prob = self.policy.head(features, generator=self.generator)
        q_values = self.critic(features, actions, detach_params=True)
        alpha = self.log_alpha.detach().exp()
        actor_loss = (alpha * log_prob - q_values.mean(dim=0)).mean()
        extra_metrics: dict[str, torch.Tensor] = {}
        regularizer = self._actor_regularizer(batch, actions, log_prob) if batch is not None else None
        if regularizer is not None:
            regularizer_loss, extra_metrics = regularizer
            actor_loss = actor_loss + regularizer_loss
        temperature_loss = (-self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()

        self.actor_optimizer.zero_grad(set_to_none=True)
        self.temperature_optimizer.zero_grad(set_to_none=True)
        # The two losses share no gradient path (each detaches the other's input): one backward.
        (actor_loss + temperature_loss).backward()
        self.actor_optimizer.step()
        self.temperature_optimizer.step()
        return {
            "actor_loss": actor_loss.detach(),
            "temperature_loss": temperature_loss.detach(),
            "temperature": self.log_alpha.detach().exp(),
            "entropy": -log_prob.detach().mean(),
            **extra_metrics,
        }

    # ----------------------------------------------------------------------------------------
    # Checkpoints (tensors for safetensors + a JSON-able dict; no pickle)
    # ----------------------------------------------------------------------------------------

    def _modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {
            "encoder": self.encoder,
            "critic": self.critic,
            "actor": self.policy.head,
            "target_encoder": self.target_encoder,
            "target_critic": self.target_critic,
        }
        if self.use_gripper_critic:
            modules["gripper"] = self.policy.gripper_head
            modules["target_gripper"] = self.target_gripper_head
        return modules

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"critic": self.critic_optimizer, "actor": self.actor_optimizer, "temperature": self.temperature_optimizer}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the learner state, flat and named (CPU, contiguous): network weights as
        ``<module>.<param>``, ``log_alpha``, ``rng_state`` and optimiser moments as
        ``optimizer.<name>.<param index>.<field>``."""
        tensors: dict[str, torch.Tensor] = {}
        for module_name, module in self._modules().items():
            for name, tensor in module.state_dict().items():
                tensors[f"{module_name}.{name}"] = tensor
        tensors["log_alpha"] = self.log_alpha.detach()
        tensors["rng_state"] = self.generator.get_state()
        for optimizer_name, optimizer in self._optimizers().items():
            for index, fields in optimizer.state_dict()["state"].items():
                for field_name, value in fields.items():
                    tensors[f"optimizer.{optimizer_name}.{index}.{field_name}"] = torch.as_tensor(value)
        return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}

    def checkpoint_meta(self) -> dict[str, Any]:
        """The JSON-able rest: format, update counter, optimiser hyper-parameters, shapes."""
        return {
            "format": CHECKPOINT_FORMAT,
            "update_count": self.update_count,
            "observation_keys": list(self.observation_keys),
            "action_dim": int(self.policy.action_dim),
            "gripper_critic": self.use_gripper_critic,
            "target_entropy": self.target_entropy,
            "state_normalized": self.state_normalized,
            "optimizers": {
                name: {"param_groups": json_safe(optimizer.state_dict()["param_groups"])}
                for name, optimizer in self._optimizers().items()
            },
        }

    def load_checkpoint(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`checkpoint_tensors` / :meth:`checkpoint_meta` saved (strict)."""
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {meta.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
        if list(meta["observation_keys"]) != list(self.observation_keys) or meta["action_dim"] != self.policy.action_dim:
            raise ValueError("checkpoint was written for other observation keys or another action size")
        for module_name, module in self._modules().items():
            prefix = f"{module_name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
        with torch.no_grad():
            self.log_alpha.copy_(tensors["log_alpha"])
        self.generator.set_state(tensors["rng_state"].to("cpu", torch.uint8))
        for optimizer_name, optimizer in self._optimizers().items():
            prefix = f"optimizer.{optimizer_name}."
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith(prefix):
                    index, field_name = key[len(prefix):].split(".", 1)
                    state.setdefault(int(index), {})[field_name] = value
            optimizer.load_state_dict({"state": state, "param_groups": meta["optimizers"][optimizer_name]["param_groups"]})
        self.update_count = int(meta["update_count"])
        self.target_entropy = float(meta["target_entropy"])
        self.state_normalized = bool(meta.get("state_normalized", False))

    def state_dict(self) -> dict[str, Any]:
        """``{"tensors": checkpoint_tensors(), "meta": checkpoint_meta()}``."""
        return {"tensors": self.checkpoint_tensors(), "meta": self.checkpoint_meta()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.load_checkpoint(state["tensors"], state["meta"])


def json_safe(value: Any) -> Any:
    """Tuples -> lists, tensors/numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value
