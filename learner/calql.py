r"""Cal-QL: calibrated conservative Q-learning (Nakamoto et al., 2023), offline, on the SAC networks.

Cal-QL trains a critic (and an actor) from a fixed dataset of episodes such that the critic is
*conservative* (it does not overestimate actions the data never tried) and *calibrated* (it does
not push the values of the learned policy below the returns the data actually achieved). The
result serves as the V-GPS critic (policies/vgps.py) and as the initialisation of online RL (its
checkpoints load into :class:`~learner.sac.SACAgent`, the online learner's agent).

Notation as in learner/sac.py (s, a, r, d = ``terminated``, gamma, E critics Q_i on the shared
encoder phi, the tanh-Gaussian actor pi, temperature alpha), plus N = ``num_action_samples``,
alpha_c = ``alpha_cql``, tau_c = ``cql_temperature``, A = the number of continuous action
dimensions, and G(s) = the Monte-Carlo return-to-go of the data at s.

Monte-Carlo returns-to-go, once per episode (s_0, a_0, r_0, ..., s_{T-1}, a_{T-1}, r_{T-1})::

    G_t     = r_t + gamma G_{t+1}                        t < T - 1
    G_{T-1} = r_{T-1} + gamma (1 - d_{T-1}) G_tail
    G_tail  = 0                                          mc_truncation "zero" (Cal-QL's finite horizon)
            = r_{T-1} / (1 - gamma)                      mc_truncation "repeat_last" (Cal-QL's
                                                         ``infinite_horizon``: the last reward forever)

so a terminated episode (d_{T-1} = 1) is the plain discounted sum and only truncated (time-limit)
episodes depend on ``mc_truncation``. Sparse-reward failures (``mc_failure_reward`` = r_fail set):
an episode whose every reward equals r_fail gets G_t = r_fail / (1 - gamma) at every step, as if it
had gone on failing forever (the rule of Cal-QL's ``calc_return_to_go``; with the 0/1 success
reward of steerl's tasks, r_fail = 0 and both rules give 0). Episodes are recovered from a
:class:`~learner.replay.ReplayBuffer`'s rows: per actor stream in add order, an episode goes on
while a row neither terminated nor was truncated and its ``next_obs`` frame is the next row's
``obs`` frame. A stream's last episode that has no end yet (still running, or cut by a lost step)
is treated as truncated and counted in :attr:`MonteCarloReturns.open_episodes`.

Critic: SAC's TD loss (learner/sac.py: the min over a random ``critic_subset`` of the target
critics, the entropy term iff ``backup_entropy``) plus the conservative regulariser::

    L_Q = L_TD + alpha_c sum_i R_i
    R_i = mean_batch [ tau_c logsumexp_j ( x_ij / tau_c ) - Q_i(s, a) ]           j = 1 .. 3N
    x_i = [ Q_i(s, u_k) + A log 2,                       u_k ~ U([-1, 1]^A)     (k = 1 .. N)
            B(Q_i(s, a_k)) - log pi(a_k | s),            a_k ~ pi(. | s)
            B(Q_i(s, a'_k)) - log pi(a'_k | s') ]        a'_k ~ pi(. | s')   (evaluated at s)
    B(q) = max(q, G(s))   (calibrated: Cal-QL)    B(q) = q   (calibrated = false: CQL(H))

The logsumexp is the importance-sampled estimate of log \int exp Q_i(s, a) da of CQL(H): each
sample is divided by its proposal density (uniform: 2^-A; the policy: pi), up to the constant
log 3N, which moves the loss but not its gradient. Minimising R_i pushes Q down on the sampled
actions and up on the data's actions. Calibration (Cal-QL's one change to CQL): once a policy
action's Q is below G(s), the value the behaviour policy reached from s, the bound replaces it by
the constant G(s) and the regulariser stops pushing it down; the learned Q stays a lower bound of
the policy's value but not far below the data's returns, so online fine-tuning does not begin with
an "unlearning" dip. Sampled actions and their log-probabilities carry no gradient: R trains the
critics and the encoder only. Each critic gets its own R_i.

Actor: SAC's loss, plus an optional behaviour-cloning term (``bc_weight`` = lambda)::

    L_pi = mean_batch [ alpha log pi(a~|s) - mean_i Q_i(sg(phi(s)), a~) ] + lambda mean_batch || a~ - a ||^2

with a~ ~ pi(.|s) reparameterised and a the data's action (continuous dimensions). Temperature and
targets as in SAC.

Gripper critic (``sac.gripper_critic``, HIL-SERL's discrete open/stay/close head Q_g): its double-DQN
loss (learner/sac.py) plus the same regulariser over its three classes, so that offline it does not
over-estimate a class the data rarely took (a plain offline DQN head learns to "close" everywhere)::

    L_g = L_DQN + alpha_c mean_batch [ tau_c logsumexp_c ( B(Q_g(s, c)) / tau_c ) - Q_g(s, c_data) ]

with c_data the class the data's executed gripper value amounts to and B the calibration above.

Implementation: :class:`CalQLAgent` subclasses :class:`~learner.sac.SACAgent` and only adds the two
loss terms (through the agent's regulariser hooks); networks, optimisers, updates (``utd_ratio``
included) and the checkpoint format are SAC's, so ``SACAgent.load_checkpoint`` takes a Cal-QL
checkpoint as it is. The returns live beside the buffer (:func:`buffer_returns_to_go`, an array
indexed by transition row) and :class:`ReturnSampler` draws them with each batch.

Facts from the authors' code (github.com/nakamotoo/Cal-QL, ``JaxCQL/conservative_sac.py`` and
``JaxCQL/replay_buffer.py``): 10 action samples, alpha_c = 5, tau_c = 1, the bound applied to the
policy and next-policy samples only (not the uniform ones, not the data's action), and the
returns-to-go rules above. Not reproduced: the Lagrange variant of alpha_c
(``cql_lagrange``), the max-of-N target backup and the clipping of R.

Command line: :func:`main` (``steerl train-calql``) trains from saved buffers and writes a
learner-style checkpoint directory (see :func:`save_offline_checkpoint`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import numbers
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from gymnasium import spaces

from hardware_configs.loader import ConfigError, load_dataclass, load_yaml, to_dict
from hardware_configs.schema import SACConfig
from learner.replay import Batch, ReplayBuffer, concatenate
from learner.sac import SACAgent, TorchBatch

log = logging.getLogger("steerl.learner.calql")

ALGORITHM = "calql"
TRUNCATION_RULES = ("zero", "repeat_last")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class CalQLConfig:
    """Cal-QL hyper-parameters (the math is in the module docstring). Loadable from YAML with
    :func:`load_calql_config`; :meth:`validate` names the offending field."""

    #: The networks and the SAC part of the update (discount, learning rates, critics, ...). Use the
    #: online learner's ``learner.sac`` so that the checkpoint loads into it.
    sac: SACConfig = field(default_factory=SACConfig)
    #: Observation fields the networks see (empty: every field of the data); the online learner's
    #: ``learner.observation_keys``.
    observation_keys: tuple[str, ...] = ()
    #: alpha_c, the weight of the conservative regulariser.
    alpha_cql: float = 5.0
    #: N, actions sampled per state from each proposal (uniform, pi(.|s), pi(.|s')).
    num_action_samples: int = 10
    #: Lower-bound the policy actions' Q-values by the Monte-Carlo return (Cal-QL); false: CQL(H).
    calibrated: bool = True
    #: tau_c, temperature of the logsumexp.
    cql_temperature: float = 1.0
    #: lambda, weight of the behaviour-cloning term of the actor loss (0: none).
    bc_weight: float = 0.0
    #: Gradient steps of offline training (``train_offline``'s default).
    offline_steps: int = 100_000
    #: Metrics are averaged and logged every this many steps.
    log_every: int = 1000
    #: What a truncated episode earns after its last step: "zero" or "repeat_last" (its last reward forever).
    mc_truncation: Literal["zero", "repeat_last"] = "zero"
    #: Per-step reward of a failed sparse-reward episode (Cal-QL's ``reward_neg``); such an episode
    #: gets r_fail / (1 - gamma) at every step. None: no special case.
    mc_failure_reward: Optional[float] = None

    def validate(self) -> None:
        if not isinstance(self.sac, SACConfig):
            raise ValueError(f"sac must be a SACConfig, got {type(self.sac).__name__}")
        self.sac.validate()
        if not isinstance(self.observation_keys, tuple) or not all(isinstance(k, str) for k in self.observation_keys):
            raise ValueError(f"observation_keys must be a list of field names, got {self.observation_keys!r}")
        if not _is_number(self.alpha_cql) or not math.isfinite(self.alpha_cql) or self.alpha_cql < 0:
            raise ValueError(f"alpha_cql must be a finite number >= 0, got {self.alpha_cql!r}")
        if not _is_count(self.num_action_samples) or self.num_action_samples < 1:
            raise ValueError(f"num_action_samples must be an integer >= 1, got {self.num_action_samples!r}")
        if not isinstance(self.calibrated, bool):
            raise ValueError(f"calibrated must be true or false, got {self.calibrated!r}")
        if not _is_number(self.cql_temperature) or not math.isfinite(self.cql_temperature) or self.cql_temperature <= 0:
            raise ValueError(f"cql_temperature must be a finite number > 0, got {self.cql_temperature!r}")
        if not _is_number(self.bc_weight) or not math.isfinite(self.bc_weight) or self.bc_weight < 0:
            raise ValueError(f"bc_weight must be a finite number >= 0, got {self.bc_weight!r}")
        if not _is_count(self.offline_steps) or self.offline_steps < 1:
            raise ValueError(f"offline_steps must be an integer >= 1, got {self.offline_steps!r}")
        if not _is_count(self.log_every) or self.log_every < 1:
            raise ValueError(f"log_every must be an integer >= 1, got {self.log_every!r}")
        if self.mc_truncation not in TRUNCATION_RULES:
            raise ValueError(f"mc_truncation must be one of {', '.join(TRUNCATION_RULES)}, got {self.mc_truncation!r}")
        if self.mc_failure_reward is not None and (
            not _is_number(self.mc_failure_reward) or not math.isfinite(self.mc_failure_reward)
        ):
            raise ValueError(f"mc_failure_reward must be a finite number or null, got {self.mc_failure_reward!r}")

    def extras(self) -> dict[str, Any]:
        """The Cal-QL fields without ``sac`` (JSON-able), e.g. for checkpoint metadata."""
        return {name: value for name, value in to_dict(self).items() if name != "sac"}


def load_calql_config(path: str | Path) -> CalQLConfig:
    """A :class:`CalQLConfig` from a YAML file; errors name the file and the field."""
    return load_yaml(CalQLConfig, path)


# --------------------------------------------------------------------------------------------
# Monte-Carlo returns-to-go
# --------------------------------------------------------------------------------------------


def returns_to_go(
    rewards: Sequence[float] | np.ndarray,
    discount: float,
    terminated: bool,
    *,
    truncation: str = "zero",
    failure_reward: Optional[float] = None,
) -> np.ndarray:
    """The returns-to-go G_t (float32 ``[T]``) of one episode's rewards (module docstring).

    ``terminated``: the episode's last step is a true terminal (no value after it); otherwise it
    was truncated and ``truncation`` ("zero" or "repeat_last") says what follows it.
    ``failure_reward``: an episode whose every reward equals it (to 1e-6) gets
    ``failure_reward / (1 - discount)`` at every step.
    """
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if truncation not in TRUNCATION_RULES:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_RULES)}, got {truncation!r}")
    if not 0.0 < discount < 1.0:
        raise ValueError(f"discount must lie in (0, 1), got {discount}")
    if rewards.size == 0:
        return np.zeros(0, np.float32)
    if failure_reward is not None and np.allclose(rewards, failure_reward, rtol=0.0, atol=1e-6):
        return np.full(rewards.size, failure_reward / (1.0 - discount), np.float32)
    tail = 0.0 if terminated or truncation == "zero" else rewards[-1] / (1.0 - discount)
    returns = np.empty_like(rewards)
    following = tail
    for t in range(rewards.size - 1, -1, -1):
        following = rewards[t] + discount * following
        returns[t] = following
    return returns.astype(np.float32)


@dataclass(frozen=True)
class MonteCarloReturns:
    """Returns-to-go of a buffer's transitions, beside the buffer (see :func:`buffer_returns_to_go`)."""

    #: float32 ``[rows]`` indexed by transition row (``ReplayBuffer.transition_table``); NaN for
    #: rows that are not sampleable.
    values: np.ndarray
    episodes: int
    terminated_episodes: int
    truncated_episodes: int
    #: Episodes without an end in the buffer (a stream's running episode, or one cut by a lost
    #: step); their returns follow the truncation rule.
    open_episodes: int
    #: ``buffer.transitions_added`` when computed: sampling refuses a buffer that changed since.
    transitions_added: int

    def summary(self) -> dict[str, Any]:
        finite = self.values[np.isfinite(self.values)]
        return {
            "episodes": self.episodes,
            "terminated": self.terminated_episodes,
            "truncated": self.truncated_episodes,
            "open": self.open_episodes,
            "transitions": int(finite.size),
            "mean": float(finite.mean()) if finite.size else float("nan"),
            "min": float(finite.min()) if finite.size else float("nan"),
            "max": float(finite.max()) if finite.size else float("nan"),
        }


def episode_rows(table: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The sampleable rows of a transition table (``ReplayBuffer.transition_table``) grouped into
    episodes, each in time order (int64 arrays). See the module docstring for the rule."""
    rows = np.flatnonzero(np.asarray(table["valid"], dtype=bool))
    if rows.size == 0:
        return []
    rows = rows[np.lexsort((table["add_index"][rows], table["stream_id"][rows]))]  # by stream, then add order
    stream = table["stream_id"][rows]
    ended = np.asarray(table["terminated"][rows], bool) | np.asarray(table["truncated"][rows], bool)
    chained = table["next_obs_index"][rows[:-1]] == table["obs_index"][rows[1:]]
    continues = (stream[1:] == stream[:-1]) & ~ended[:-1] & chained
    starts = np.flatnonzero(np.concatenate([[True], ~continues]))
    return np.split(rows, starts[1:])


def buffer_returns_to_go(
    buffer: ReplayBuffer,
    discount: float,
    *,
    truncation: str = "zero",
    failure_reward: Optional[float] = None,
) -> MonteCarloReturns:
    """Returns-to-go of every sampleable transition of ``buffer`` (computed per episode with
    :func:`returns_to_go`), as a side array indexed by transition row. Compute them once the
    buffer holds its data: :class:`ReturnSampler` refuses a buffer that changed since."""
    table = buffer.transition_table()
    values = np.full(table["rewards"].shape[0], np.nan, np.float32)
    counts = {"terminated": 0, "truncated": 0, "open": 0}
    episodes = episode_rows(table)
    for rows in episodes:
        last = rows[-1]
        terminated = bool(table["terminated"][last])
        counts["terminated" if terminated else "truncated" if table["truncated"][last] else "open"] += 1
        values[rows] = returns_to_go(table["rewards"][rows], discount, terminated,
                                     truncation=truncation, failure_reward=failure_reward)
    return MonteCarloReturns(values, len(episodes), counts["terminated"], counts["truncated"], counts["open"],
                             buffer.transitions_added)


# --------------------------------------------------------------------------------------------
# Batches with returns
# --------------------------------------------------------------------------------------------


@dataclass
class ReturnBatch(Batch):
    """A replay :class:`~learner.replay.Batch` and the Monte-Carlo return-to-go of each row."""

    mc_returns: np.ndarray  # float32 [B]


@dataclass
class CalQLBatch(TorchBatch):
    """A :class:`~learner.sac.TorchBatch` with the rows' returns-to-go (float32 ``[B]``; ``-inf``
    where none is known, which no bound can raise a value to)."""

    mc_returns: torch.Tensor

    def rows(self, start: int, stop: int) -> "CalQLBatch":
        base = super().rows(start, stop)
        return CalQLBatch(*(getattr(base, f.name) for f in dataclasses.fields(TorchBatch)),
                          mc_returns=self.mc_returns[start:stop])


class ReturnSampler:
    """Uniform batches over the union of several buffers, each row with its return-to-go.

    Each minibatch splits its rows between the buffers in proportion to their sizes (multinomial),
    so every stored transition is equally likely.
    """

    def __init__(self, buffers: Sequence[ReplayBuffer], returns: Sequence[MonteCarloReturns], seed: int = 0) -> None:
        if len(buffers) != len(returns) or not buffers:
            raise ValueError(f"need one MonteCarloReturns per buffer, got {len(buffers)} buffers and {len(returns)}")
        self.buffers = list(buffers)
        self.returns = list(returns)
        self._rng = np.random.default_rng(seed)

    @classmethod
    def from_buffers(cls, buffers: Sequence[ReplayBuffer], discount: float, *, truncation: str = "zero",
                     failure_reward: Optional[float] = None, seed: int = 0) -> "ReturnSampler":
        """Compute every buffer's returns (:func:`buffer_returns_to_go`) and sample from them."""
        returns = [buffer_returns_to_go(b, discount, truncation=truncation, failure_reward=failure_reward)
                   for b in buffers]
        return cls(buffers, returns, seed)

    def sample(self, batch_size: int, minibatches: int = 1) -> ReturnBatch:
        """``minibatches`` stacked minibatches of ``batch_size`` rows (``SACAgent.update`` splits
        them into its ``utd_ratio`` critic steps)."""
        sizes = np.array([len(buffer) for buffer in self.buffers], dtype=np.float64)
        if sizes.sum() == 0:
            raise ValueError("cannot sample: every buffer is empty")
        for index, (buffer, returns) in enumerate(zip(self.buffers, self.returns)):
            if buffer.transitions_added != returns.transitions_added:
                raise ValueError(f"buffer {index} received {buffer.transitions_added - returns.transitions_added} "
                                 "transitions since its returns were computed: compute them again")
        parts: list[Batch] = []
        values: list[np.ndarray] = []
        for _ in range(minibatches):
            counts = self._rng.multinomial(batch_size, sizes / sizes.sum())
            for buffer, returns, count in zip(self.buffers, self.returns, counts):
                if count:
                    batch, rows = buffer.sample_with_rows(int(count))
                    parts.append(batch)
                    values.append(returns.values[rows])
        batch = concatenate(parts)
        mc_returns = np.concatenate(values).astype(np.float32)
        if not np.all(np.isfinite(mc_returns)):
            raise ValueError("a sampled row has no return-to-go (the buffer changed since they were computed)")
        return ReturnBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)}, mc_returns=mc_returns)


# --------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------


@dataclass
class ConservativeTerms:
    """The pieces of the regulariser for one minibatch (tensors; ``[E, B, N]`` unless noted)."""

    q_random: torch.Tensor  # Q_i(s, u_k)
    q_policy: torch.Tensor  # B(Q_i(s, a_k)): bounded when calibrated
    q_next_policy: torch.Tensor  # B(Q_i(s, a'_k))
    q_policy_raw: torch.Tensor  # Q_i(s, a_k) before the bound
    q_next_policy_raw: torch.Tensor  # Q_i(s, a'_k) before the bound
    ood_value: torch.Tensor  # [E, B]: tau_c logsumexp(x / tau_c)
    regularizer: torch.Tensor  # [E]: R_i
    bound_rate: torch.Tensor  # []: share of policy-action values below G(s)


class CalQLAgent(SACAgent):
    """SAC with Cal-QL's conservative, calibrated critic loss (module docstring).

    Args:
        config: Cal-QL hyper-parameters; ``config.sac`` builds the networks as ``SACAgent`` does.
        observation_space: the data's observation ``spaces.Dict``.
        action_space: ``Box(-1, 1, (A,))``.
        device: where the networks live and the updates run.
        seed: seeds the initial weights and every random draw of the updates.

    ``update`` takes a :class:`ReturnBatch` (from :class:`ReturnSampler`) or a :class:`CalQLBatch`.
    """

    def __init__(
        self,
        config: CalQLConfig,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        config.validate()
        super().__init__(config.sac, observation_space, action_space, config.observation_keys, device, seed)
        self.calql_config = config
        # log of the uniform density on [-1, 1]^A
        self._log_uniform_density = -self.policy.continuous_dim * math.log(2.0)

    # -- batches ---------------------------------------------------------------------------------

    def batch_to_torch(self, batch: Any) -> CalQLBatch:
        """The fields this agent reads, and ``mc_returns`` (required when ``calibrated``)."""
        data = super().batch_to_torch(batch)
        mc_returns = getattr(batch, "mc_returns", None)
        if mc_returns is None:
            if self.calql_config.calibrated:
                raise ValueError("Cal-QL (calibrated: true) needs batches with mc_returns "
                                 "(sample them with ReturnSampler)")
            values = torch.full_like(data.rewards, -math.inf)
        else:
            values = torch.as_tensor(np.asarray(mc_returns), dtype=torch.float32).to(self.device).reshape(-1)
        return CalQLBatch(*(getattr(data, f.name) for f in dataclasses.fields(TorchBatch)), mc_returns=values)

    # -- the conservative regulariser ------------------------------------------------------------

    def _conservative_terms(
        self, features: torch.Tensor, next_features: torch.Tensor, q_data: torch.Tensor, mc_returns: torch.Tensor
    ) -> ConservativeTerms:
        config = self.calql_config
        batch, samples = features.shape[0], config.num_action_samples
        action_dim = self.policy.continuous_dim
        with torch.no_grad():  # proposals: no gradient into the actor
            random_actions = torch.rand(
                (batch * samples, action_dim), generator=self.generator, device=self.device
            ).mul_(2.0).sub_(1.0)
            policy_actions, policy_log_prob = self.policy.head(
                features.detach().repeat_interleave(samples, dim=0), generator=self.generator
            )
            next_actions, next_log_prob = self.policy.head(
                next_features.repeat_interleave(samples, dim=0), generator=self.generator
            )
        # One critic call for the 3N proposals of every state, all evaluated at s.
        repeated = features.repeat_interleave(samples, dim=0).repeat(3, 1)
        q_values = self.critic(repeated, torch.cat([random_actions, policy_actions, next_actions]))
        q_random, q_policy_raw, q_next_raw = q_values.reshape(-1, 3, batch, samples).unbind(1)
        bound = mc_returns.reshape(1, batch, 1)
        with torch.no_grad():
            below = torch.cat([q_policy_raw < bound, q_next_raw < bound], dim=-1)
            bound_rate = below.float().mean()
        if config.calibrated:
            q_policy, q_next = torch.maximum(q_policy_raw, bound), torch.maximum(q_next_raw, bound)
        else:
            q_policy, q_next = q_policy_raw, q_next_raw
        scores = torch.cat([
            q_random - self._log_uniform_density,
            q_policy - policy_log_prob.reshape(1, batch, samples),
            q_next - next_log_prob.reshape(1, batch, samples),
        ], dim=-1)
        temperature = config.cql_temperature
        ood_value = temperature * torch.logsumexp(scores / temperature, dim=-1)
        regularizer = (ood_value - q_data).mean(dim=1)
        return ConservativeTerms(q_random, q_policy, q_next, q_policy_raw, q_next_raw, ood_value, regularizer,
                                 bound_rate)

    def conservative_terms(self, batch: Any) -> ConservativeTerms:
        """The regulariser's pieces on ``batch`` (no augmentation, no update), for inspection. The
        proposals are drawn from the agent's generator, so a call moves the random stream of the
        updates that follow."""
        data = batch if isinstance(batch, CalQLBatch) else self.batch_to_torch(batch)
        with torch.no_grad():
            features = self.encoder(data.observations)
            next_features = self.encoder(data.next_observations)
            q_data = self.critic(features, self._continuous(data.actions))
            return self._conservative_terms(features, next_features, q_data, data.mc_returns)

    def _critic_regularizer(
        self, batch: TorchBatch, features: torch.Tensor, next_features: torch.Tensor, q_data: torch.Tensor
    ) -> Optional[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        if not isinstance(batch, CalQLBatch):
            raise TypeError("CalQLAgent trains on CalQLBatch / ReturnBatch batches (they carry mc_returns)")
        terms = self._conservative_terms(features, next_features, q_data, batch.mc_returns)
        loss = self.calql_config.alpha_cql * terms.regularizer.sum()
        finite = torch.isfinite(batch.mc_returns)
        metrics = {
            "cql_loss": loss.detach(),
            "cql_regularizer": terms.regularizer.detach().mean(),
            "cql_ood_value": terms.ood_value.detach().mean(),
            "cql_q_random": terms.q_random.detach().mean(),
            "cql_q_policy": terms.q_policy_raw.detach().mean(),
            "calql_bound_rate": terms.bound_rate,
            "mc_return_mean": torch.where(finite, batch.mc_returns, 0.0).sum() / finite.sum().clamp(min=1),
        }
        return loss, metrics

    def _gripper_conservative_term(
        self, batch: TorchBatch, q_classes: torch.Tensor, q_taken: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """The calibrated conservative term over the three classes (module docstring), in place of
        SAC's uncalibrated online one."""
        if not isinstance(batch, CalQLBatch):
            raise TypeError("CalQLAgent trains on CalQLBatch / ReturnBatch batches (they carry mc_returns)")
        config = self.calql_config
        if config.calibrated:
            q_classes = torch.maximum(q_classes, batch.mc_returns[:, None])
        ood_value = config.cql_temperature * torch.logsumexp(q_classes / config.cql_temperature, dim=1)
        return config.alpha_cql * (ood_value - q_taken).mean()

    def _actor_regularizer(
        self, batch: TorchBatch, actions: torch.Tensor, log_prob: torch.Tensor
    ) -> Optional[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        weight = self.calql_config.bc_weight
        if weight == 0:
            return None
        bc_loss = (actions - self._continuous(batch.actions)).square().sum(dim=-1).mean()
        return weight * bc_loss, {"bc_loss": bc_loss.detach()}

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint_meta(self) -> dict[str, Any]:
        """SAC's metadata (the same format: it loads into ``SACAgent``) plus the Cal-QL settings."""
        meta = super().checkpoint_meta()
        meta["algorithm"] = ALGORITHM
        meta["calql"] = self.calql_config.extras()
        return meta


# --------------------------------------------------------------------------------------------
# Offline training
# --------------------------------------------------------------------------------------------


def _check_compatible(buffers: Sequence[ReplayBuffer]) -> None:
    first = buffers[0]
    for index, buffer in enumerate(buffers[1:], start=1):
        if buffer.action_dim != first.action_dim:
            raise ValueError(f"buffer {index} has actions of size {buffer.action_dim}, buffer 0 of {first.action_dim}")
        mine = {k: (v.shape, v.dtype) for k, v in first.observation_space.spaces.items()}
        theirs = {k: (v.shape, v.dtype) for k, v in buffer.observation_space.spaces.items()}
        if mine != theirs:
            raise ValueError(f"buffer {index} has observation fields {theirs}, buffer 0 has {mine}")


def train_offline(
    config: CalQLConfig,
    buffers: Union[ReplayBuffer, Sequence[ReplayBuffer]],
    steps: Optional[int] = None,
    seed: int = 0,
    log_every: Optional[int] = None,
    *,
    device: torch.device | str = "cpu",
    progress: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> CalQLAgent:
    """Train a :class:`CalQLAgent` offline on ``buffers`` (demos and/or offline episodes).

    Computes every buffer's returns-to-go, measures the state statistics on all the data
    (``sac.normalize_state``), then runs ``steps`` (default ``config.offline_steps``) updates of
    ``sac.utd_ratio`` minibatches of ``sac.batch_size`` rows drawn uniformly over all transitions.
    Every ``log_every`` (default ``config.log_every``) updates and at the last, the metrics averaged
    since the previous report are logged and passed to ``progress(step, metrics)``. Seeded: the same
    inputs give the same agent.
    """
    config.validate()
    buffers = [buffers] if isinstance(buffers, ReplayBuffer) else list(buffers)
    if not buffers or not any(len(buffer) for buffer in buffers):
        raise ValueError("train_offline needs at least one non-empty replay buffer")
    _check_compatible(buffers)
    steps = config.offline_steps if steps is None else steps
    log_every = config.log_every if log_every is None else log_every
    if not _is_count(steps) or steps < 1 or not _is_count(log_every) or log_every < 1:
        raise ValueError(f"steps and log_every must be integers >= 1, got {steps!r} and {log_every!r}")

    action_space = spaces.Box(-1.0, 1.0, (buffers[0].action_dim,), np.float32)
    agent = CalQLAgent(config, buffers[0].observation_space, action_space, device=device, seed=seed)
    sampler = ReturnSampler.from_buffers(buffers, config.sac.discount, truncation=config.mc_truncation,
                                         failure_reward=config.mc_failure_reward, seed=seed)
    for index, returns in enumerate(sampler.returns):
        log.info("buffer %d: returns-to-go %s", index, returns.summary())
        if returns.open_episodes:
            log.warning("buffer %d: %d episode(s) have no end (no terminated/truncated step); their returns "
                        "follow mc_truncation=%s", index, returns.open_episodes, config.mc_truncation)
    agent.fit_state_normalization([buffer.observations(agent.observation_keys) for buffer in buffers if len(buffer)])

    sums: dict[str, float] = {}
    since = 0
    for step in range(1, steps + 1):
        metrics = agent.update(sampler.sample(config.sac.batch_size, config.sac.utd_ratio))
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value
        since += 1
        if step % log_every == 0 or step == steps:
            means = {name: total / since for name, total in sums.items()}
            means["update_count"] = float(agent.update_count)
            log.info("step %d/%d: %s", step, steps,
                     ", ".join(f"{name} {value:.4g}" for name, value in sorted(means.items())))
            if progress is not None:
                progress(step, means)
            sums, since = {}, 0
    return agent


def save_offline_checkpoint(
    agent: CalQLAgent,
    run_dir: str | Path,
    *,
    session_config: Any = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``run_dir/checkpoints/ckpt-<updates>/`` like the learner does (learner/learner.py) and
    point ``run_dir/checkpoints/latest`` at it::

        agent.safetensors, agent.json   the agent (SACAgent.load_checkpoint / learner.learner.load_agent)
        policy.safetensors              the actor policy alone (steerl eval, SACPolicy.from_checkpoint)
        learner.json                    spaces, observation keys, the SAC and Cal-QL settings,
                                        the session config when given, ``extra``

    The directory is written as ``<name>.tmp`` and renamed. Returns the checkpoint directory.
    """
    from learner.learner import save_agent
    from transport.spaces import RobotSpaces

    checkpoints = Path(run_dir) / "checkpoints"
    name = f"ckpt-{agent.update_count:09d}"
    final, staging = checkpoints / name, checkpoints / f"{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_agent(agent, staging)
    (staging / "policy.safetensors").write_bytes(agent.publish_policy())
    keys = agent.observation_keys
    robot_spaces = RobotSpaces.from_gym(spaces.Dict({k: agent.observation_space[k] for k in keys}), agent.action_space)
    meta: dict[str, Any] = {
        "format": 1,
        "algorithm": ALGORITHM,
        "updates": agent.update_count,
        "spaces": robot_spaces.to_json(),
        "observation_keys": list(agent.calql_config.observation_keys),
        "sac": to_dict(agent.calql_config.sac),
        "calql": agent.calql_config.extras(),
        **({"config": to_dict(session_config)} if session_config is not None else {}),
        **dict(extra or {}),
    }
    (staging / "learner.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    latest_tmp = checkpoints / "latest.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, checkpoints / "latest")
    return final


# --------------------------------------------------------------------------------------------
# Command line: steerl train-calql
# --------------------------------------------------------------------------------------------


def build_parser(prog: str = "steerl train-calql") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Cal-QL offline training of a critic and an actor from saved replay buffers (demos, "
                    "offline episodes). Writes a learner-style checkpoint under OUT/checkpoints/ that "
                    "SACAgent (the online learner), steerl eval and the V-GPS critic loader read.",
    )
    parser.add_argument("--data", action="append", required=True, metavar="DIR",
                        help="a saved replay buffer (steerl record-demos, a checkpoint's demos/ or online/); "
                             "repeatable")
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory to write checkpoints/ into")
    parser.add_argument("--config", metavar="FILE", help="Cal-QL config YAML (CalQLConfig fields; default: defaults)")
    parser.add_argument("--session", metavar="CONFIG",
                        help="a session config (name or YAML) whose learner.sac and learner.observation_keys "
                             "replace the Cal-QL config's, so that the checkpoint fits its online learner")
    parser.add_argument("--steps", type=int, help="gradient steps (default: the config's offline_steps)")
    parser.add_argument("--seed", type=int, help="seed (default: the session's seed, else 0)")
    parser.add_argument("--log-every", type=int, help="steps between progress lines (default: the config's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser


def _config_with_session(config: CalQLConfig, fields_set: Mapping[str, Any], session: Any) -> CalQLConfig:
    """``config`` with the session's ``learner.sac`` and ``learner.observation_keys``; a Cal-QL file
    that sets them too is refused (one source for the networks)."""
    doubled = [name for name in ("sac", "observation_keys") if name in fields_set]
    if doubled:
        raise ConfigError(f"{', '.join(doubled)}: set by both --config and --session (keep one)")
    return dataclasses.replace(config, sac=session.learner.sac,
                               observation_keys=tuple(session.learner.observation_keys))


def _read_config(path: Optional[str]) -> tuple[CalQLConfig, dict[str, Any]]:
    """The Cal-QL config of ``--config`` (defaults without one) and the fields the file sets."""
    if not path:
        return load_dataclass(CalQLConfig, {}), {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    return load_dataclass(CalQLConfig, data, path), dict(data) if isinstance(data, dict) else {}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``steerl train-calql --data DIR [--data DIR] --out DIR [--config FILE] [--session CONFIG]
    [--steps N]``; returns the exit status (2 for a bad config or unreadable data)."""
    from learner.replay import ReplayFormatError

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        config, fields_set = _read_config(args.config)
        session = None
        if args.session:
            from hardware_configs.schema import load_config

            session = load_config(args.session)
            config = _config_with_session(config, fields_set, session)
            config.validate()
        buffers = [ReplayBuffer.load(path) for path in args.data]
        seed = args.seed if args.seed is not None else (session.seed if session is not None else 0)
        steps = args.steps if args.steps is not None else config.offline_steps

        def report(step: int, metrics: dict[str, float]) -> None:
            shown = ("critic_loss", "cql_regularizer", "calql_bound_rate", "q_mean", "mc_return_mean", "actor_loss")
            print(f"step {step}/{steps}  " + "  ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics),
                  flush=True)

        agent = train_offline(config, buffers, steps, seed=seed, log_every=args.log_every, device=device,
                              progress=report)
    except (ConfigError, ReplayFormatError, OSError, ValueError, KeyError) as error:
        print(f"steerl train-calql: {error}", file=sys.stderr)
        return 2
    directory = save_offline_checkpoint(agent, args.out, session_config=session,
                                        extra={"data": [str(Path(p)) for p in args.data], "seed": seed})
    print(f"saved the Cal-QL agent ({agent.update_count} updates) to {directory}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
