r"""WSRL: warm-start online RL from an offline checkpoint, without keeping the offline data.

Zhou, Peng, Li, Levine and Kumar, "Efficient Online Reinforcement Learning Fine-Tuning Need Not
Retain Offline Data" (2024, arXiv:2412.07762). Offline-to-online methods usually keep sampling the
offline data during fine-tuning (RLPD's 50/50 batches, Cal-QL's mixed buffers): without it the
pre-trained Q-function, which has only seen the offline distribution, meets the online data with
values that are off, and the first updates *recalibrate* it - a dip in performance (the
"unlearning" that retaining the data was there to prevent). WSRL's observation: the dip comes from
that distribution shift, and a short **warm-up** removes it cheaply. So:

1. **Initialise** every network from the offline checkpoint: actor, critic ensemble, target
   networks, the shared encoder with its frozen state statistics, the temperature and (here, as in
   the authors' code, which restores the whole agent state) the optimiser moments.
2. **Warm up**: the pre-trained policy collects ``warmup_steps`` online transitions with *no*
   updates (WSRL: K = 5000 env steps). They seed the online buffer with data of the distribution
   the fine-tuned policy will visit, so the first updates see "online-like" states.
3. **Fine-tune** with plain online RL on the online buffer only: the offline data is discarded
   (``offline_ratio = 0``; a positive ratio draws that share of every minibatch from
   ``offline_data``, for comparison), with the RL core's critic ensemble and update-to-data ratio
   (learner/sac.py: E LayerNorm critics, a random-subset min target, ``utd_ratio`` critic steps
   per env step). The conservative term of Cal-QL is gone: the online learner is SAC.
   Optionally (``actor_delay_updates``, not in WSRL) the first updates train the critics only, so
   that the pre-trained policy does not follow the gradients of critics still recalibrating.

In steerl (learner/learner.py calls into this module):

- a fresh run with ``learner.warm_start.checkpoint`` set loads the checkpoint into the agent when
  the agent is built (:func:`load_warm_start`; every incompatibility - observation fields, action
  size, network sizes, tensor shapes - is an error naming the checkpoint and the field) and
  publishes its policy at once; the actor acts with it from its first step (no random steps) and
  waits for those weights before acting;
- updates start once ``warmup_steps`` transitions are in, then follow the env steps one update per
  step, counted from the end of the warm-up (``updates <= transitions - warmup_steps``): the
  warm-up data is not replayed in a burst of catch-up updates, as in WSRL's loop;
- each minibatch is :func:`sample_batch`: ``round(batch_size * offline_ratio)`` rows from the
  offline sources (``offline_data``, and the ``--demos`` buffer when given), the rest from the
  online buffer. ``offline_ratio`` replaces ``learner.demo_ratio`` for a warm-started run. The
  operator's interventions are online transitions: they stay in the online buffer and are drawn
  with it (the HIL-SERL intervention share of ``demo_ratio`` does not apply here);
- :class:`QValueLog`: for each of the first ``q_log_updates`` updates, then every
  ``q_log_every``, the mean Q of the online rows' data actions, of the policy's actions at those
  states, and the mean TD target, measured just before the update (update 0 is the pre-trained
  critic on the first online batch), go to TensorBoard (``warm_start/*``), the learner log and
  ``RUN_DIR/warm_start_q.json``: the post-switch recalibration is visible there;
- ``--resume`` of a warm-started run loads the run's own checkpoint (it wins over the offline
  one); the schedule, the batch composition and the Q log carry on.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import safetensors
import safetensors.torch
import torch
from gymnasium import spaces

from hardware_configs.loader import ConfigError, to_dict
from hardware_configs.schema import SACConfig, WarmStartConfig
from learner.replay import Batch, ReplayBuffer, concatenate
from learner.sac import CHECKPOINT_FORMAT, SACAgent
from transport.spaces import RobotSpaces

log = logging.getLogger("steerl.learner.wsrl")

FIELD = "learner.warm_start.checkpoint"
Q_LOG_FILE = "warm_start_q.json"
# SACConfig fields that decide the networks' shapes (the rest, e.g. learning rates, discount,
# critic_subset or utd_ratio, may differ between offline pre-training and online fine-tuning).
NETWORK_FIELDS = ("hidden_dims", "num_critics", "layer_norm", "image_encoder.kind", "image_encoder.channels",
                  "image_encoder.strides", "image_encoder.latent_dim", "image_encoder.pooling",
                  "gripper_critic.enabled")
# At most this many differences are listed in one error message.
MAX_LISTED = 8


class WarmStartError(ConfigError):
    """A warm-start checkpoint or offline data set that cannot be used; the message names the path
    and the field that does not fit."""


# ------------------------------------------------------------------------------------------------
# The checkpoint
# ------------------------------------------------------------------------------------------------


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _plain(value: Any) -> Any:
    """Tuples as lists, so that a config value and its JSON record compare equal."""
    return list(value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class PretrainedCheckpoint:
    """A learner-layout checkpoint read into memory (what learner/learner.py and
    ``save_offline_checkpoint`` of learner/calql.py write): ``learner.json``, ``agent.json`` and the
    tensors of ``agent.safetensors`` (on the CPU)."""

    directory: Path
    meta: dict[str, Any]
    agent_meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "PretrainedCheckpoint":
        """Read a checkpoint directory, or the newest checkpoint of a run directory."""
        path = Path(path)
        if not path.exists():
            raise WarmStartError(f"{FIELD}: {path} does not exist")
        directory = path
        if not (path / "learner.json").exists():
            latest = path / "checkpoints" / "latest"
            if not latest.exists():
                raise WarmStartError(f"{FIELD}: {path} is neither a checkpoint (no learner.json) nor a run "
                                     "directory with checkpoints/latest")
            directory = path / "checkpoints" / latest.read_text().strip()
        try:
            meta = json.loads((directory / "learner.json").read_text())
            agent_meta = json.loads((directory / "agent.json").read_text())
            tensors = safetensors.torch.load_file(str(directory / "agent.safetensors"), device="cpu")
        except (OSError, ValueError, safetensors.SafetensorError) as error:
            raise WarmStartError(f"{FIELD}: {directory}: cannot read the checkpoint: {error}") from None
        if agent_meta.get("format") != CHECKPOINT_FORMAT:
            raise WarmStartError(f"{FIELD}: {directory}: agent.json has format {agent_meta.get('format')!r}, "
                                 f"not {CHECKPOINT_FORMAT!r}")
        if "spaces" not in meta:
            raise WarmStartError(f"{FIELD}: {directory}: learner.json records no spaces")
        return cls(directory, meta, agent_meta, tensors)

    @property
    def algorithm(self) -> str:
        return str(self.meta.get("algorithm", self.agent_meta.get("algorithm", "sac")))

    @property
    def spaces(self) -> RobotSpaces:
        return RobotSpaces.from_json(self.meta["spaces"])

    @property
    def sac_settings(self) -> Optional[dict[str, Any]]:
        """The SAC settings the networks were built with (a Cal-QL checkpoint's ``sac``, a learner
        checkpoint's ``config.learner.sac``), or None when the checkpoint does not record them."""
        if isinstance(self.meta.get("sac"), dict):
            return self.meta["sac"]
        try:
            return self.meta["config"]["learner"]["sac"]
        except (KeyError, TypeError):
            return None

    def network_differences(self, sac: SACConfig) -> list[str]:
        """The :data:`NETWORK_FIELDS` whose values differ from ``sac``, one line per field."""
        recorded = self.sac_settings
        if recorded is None:
            return []
        mine = to_dict(sac)
        lines = []
        for name in NETWORK_FIELDS:
            try:
                theirs = _lookup(recorded, name)
            except (KeyError, TypeError):
                continue  # an older checkpoint without the field: the tensor shapes decide
            ours = _lookup(mine, name)
            if _plain(theirs) != _plain(ours):
                lines.append(f"learner.sac.{name}: the checkpoint has {_plain(theirs)}, this learner {_plain(ours)}")
        return lines


def _fail(checkpoint: PretrainedCheckpoint, problems: Sequence[str]) -> WarmStartError:
    listed = list(problems[:MAX_LISTED]) + ([f"... and {len(problems) - MAX_LISTED} more"]
                                            if len(problems) > MAX_LISTED else [])
    return WarmStartError(f"{FIELD}: {checkpoint.directory} does not fit this learner: " + "; ".join(listed))


def check_warm_start(config: WarmStartConfig, sac: SACConfig) -> Optional[PretrainedCheckpoint]:
    """Open ``config.checkpoint`` and check the settings known before the robot's spaces are (the
    network sizes); None without a warm start. Raises :class:`WarmStartError`."""
    if not config.enabled:
        return None
    checkpoint = PretrainedCheckpoint.open(config.checkpoint)
    problems = checkpoint.network_differences(sac)
    if problems:
        raise _fail(checkpoint, problems)
    return checkpoint


def _space_problems(checkpoint: PretrainedCheckpoint, agent: SACAgent) -> list[str]:
    """Observation keys, field shapes and dtypes, action size and gripper head of the checkpoint
    against the agent's; bounds that differ only get a warning (the networks never read them)."""
    problems = []
    keys = list(agent.observation_keys)
    their_keys = list(checkpoint.agent_meta.get("observation_keys", []))
    if their_keys != keys:
        problems.append(f"learner.observation_keys: the checkpoint's networks read {their_keys}, this learner's {keys}")
    theirs = checkpoint.spaces
    ours = RobotSpaces.from_gym(spaces.Dict({key: agent.observation_space[key] for key in keys}), agent.action_space)
    for key in sorted(set(keys) & set(theirs.observation)):
        mine, their = ours.observation[key], theirs.observation[key]
        if (mine.dtype, tuple(mine.shape)) != (their.dtype, tuple(their.shape)):
            problems.append(f"observation field {key!r}: the checkpoint has {their.dtype}{tuple(their.shape)}, "
                            f"the robot {mine.dtype}{tuple(mine.shape)}")
        elif mine.canonical() != their.canonical():
            log.warning("warm start: observation field %r has other bounds in %s (%s) than on the robot (%s)",
                        key, checkpoint.directory, their.describe(), mine.describe())
    action_dim = int(agent.policy.action_dim)
    their_action = checkpoint.agent_meta.get("action_dim")
    if their_action != action_dim:
        problems.append(f"action: the checkpoint has {their_action} dimensions, the robot {action_dim}")
    their_gripper = checkpoint.agent_meta.get("gripper_critic")
    if their_gripper is not None and bool(their_gripper) != agent.use_gripper_critic:
        problems.append(f"learner.sac.gripper_critic.enabled: the checkpoint has {bool(their_gripper)}, "
                        f"this learner {agent.use_gripper_critic}")
    return problems


def _tensor_problems(checkpoint: PretrainedCheckpoint, expected: dict[str, torch.Tensor]) -> list[str]:
    """Network tensors missing from the checkpoint, unexpected in it, or of another shape (the
    optimiser moments follow their parameters; the random stream is the learner's own)."""
    problems = []
    for name in sorted(set(expected) | set(checkpoint.tensors)):
        if name == "rng_state" or name.startswith("optimizer."):
            continue
        if name not in checkpoint.tensors:
            problems.append(f"tensor {name}: missing from the checkpoint")
        elif name not in expected:
            problems.append(f"tensor {name}: not part of this learner's agent")
        elif tuple(checkpoint.tensors[name].shape) != tuple(expected[name].shape):
            problems.append(f"tensor {name}: the checkpoint has shape {tuple(checkpoint.tensors[name].shape)}, "
                            f"this learner {tuple(expected[name].shape)}")
    return problems


def load_warm_start(agent: SACAgent, config: WarmStartConfig,
                    checkpoint: Optional[PretrainedCheckpoint] = None) -> dict[str, Any]:
    """Initialise ``agent`` from ``config.checkpoint`` (or the already opened ``checkpoint``).

    Loads the encoder (with its state statistics, which stay frozen: the learner does not measure
    them again), the actor, the critic ensemble, the target networks, the gripper head, the
    temperature (``sac.init_temperature`` instead with ``reset_temperature``) and, with
    ``load_optimizers``, the Adam moments. The agent keeps its own random stream, learning rates,
    target entropy and update counter (which counts online updates). Every check runs before
    anything is changed: a :class:`WarmStartError` leaves ``agent`` as it was.

    Returns a JSON-able summary (checkpoint path, algorithm, offline updates, temperature).
    """
    if checkpoint is None:
        checkpoint = PretrainedCheckpoint.open(config.checkpoint)
    expected = agent.checkpoint_tensors()
    problems = (_space_problems(checkpoint, agent) + checkpoint.network_differences(agent.config)
                + _tensor_problems(checkpoint, expected))
    if problems:
        raise _fail(checkpoint, problems)
    backbone = agent.config.image_encoder
    their_backbone = ((checkpoint.sac_settings or {}).get("image_encoder") or {}).get("pretrained_path")
    if backbone.kind == "pretrained" and their_backbone not in (None, backbone.pretrained_path):
        log.warning("warm start: %s was trained on the frozen backbone %s, this learner loads %s (not part of "
                    "the checkpoint: make sure it is the same network)", checkpoint.directory, their_backbone,
                    backbone.pretrained_path)

    own_groups = {name: [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
                  for name, optimizer in _optimizers(agent).items()}
    target_entropy = agent.target_entropy
    tensors = {**checkpoint.tensors, "rng_state": agent.generator.get_state()}
    try:
        agent.load_checkpoint(tensors, checkpoint.agent_meta)
    except (KeyError, ValueError, RuntimeError) as error:  # the checks above should have caught it
        raise WarmStartError(f"{FIELD}: {checkpoint.directory}: cannot load the agent: {error}") from None
    for name, optimizer in _optimizers(agent).items():
        for group, own in zip(optimizer.param_groups, own_groups[name]):
            group.update(own)  # this config's learning rates (and kernel flags), not the offline run's
        if not config.load_optimizers:
            optimizer.state.clear()
    if config.reset_temperature:
        with torch.no_grad():
            agent.log_alpha.fill_(math.log(agent.config.init_temperature))
        agent.temperature_optimizer.state.clear()
    agent.target_entropy = target_entropy
    offline_updates = agent.update_count
    agent.update_count = 0
    # The networks were trained on the checkpoint's statistics (identity ones when it did not
    # standardise): measuring new ones would move every input under them.
    agent.state_normalized = True
    summary = {
        "checkpoint": str(checkpoint.directory),
        "algorithm": checkpoint.algorithm,
        "offline_updates": offline_updates,
        "temperature": agent.temperature,
        "optimizers": "loaded" if config.load_optimizers else "fresh",
    }
    log.info("warm start from %s (%s, %d offline updates): temperature %.3g, optimiser moments %s",
             checkpoint.directory, checkpoint.algorithm, offline_updates, agent.temperature, summary["optimizers"])
    return summary


def _optimizers(agent: SACAgent) -> dict[str, torch.optim.Optimizer]:
    return {"critic": agent.critic_optimizer, "actor": agent.actor_optimizer,
            "temperature": agent.temperature_optimizer}


def load_offline_data(config: WarmStartConfig, observation_space: spaces.Dict) -> list[ReplayBuffer]:
    """The ``offline_data`` buffers with the learner's observation fields (none when
    ``offline_ratio`` is 0: they would never be sampled). Errors name the entry."""
    if not config.offline_ratio:
        if config.offline_data:
            log.info("warm start: offline_data not loaded: offline_ratio is 0 (the offline data is discarded)")
        return []
    from learner.replay import ReplayFormatError

    buffers = []
    for index, path in enumerate(config.offline_data):
        try:
            buffers.append(ReplayBuffer.load(path, observation_space))
        except (ReplayFormatError, OSError, ValueError, KeyError) as error:
            raise WarmStartError(f"learner.warm_start.offline_data[{index}]: {path}: {error}") from None
        log.info("warm start: %d offline transitions from %s", len(buffers[-1]), path)
    return buffers


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


def sample_batch(online: ReplayBuffer, offline: Sequence[ReplayBuffer], batch_size: int, offline_ratio: float,
                 minibatches: int, rng: np.random.Generator) -> tuple[Batch, np.ndarray]:
    """``minibatches`` stacked minibatches of ``batch_size`` rows, each with
    ``round(batch_size * offline_ratio)`` rows (leaving at least one online row) from the non-empty
    ``offline`` buffers, split between them in proportion to their sizes, and the rest from
    ``online``; and a bool mask ``[rows]`` of the rows that came from the offline buffers."""
    sources = [buffer for buffer in offline if len(buffer)]
    offline_rows = min(batch_size - 1, int(round(batch_size * offline_ratio))) if sources else 0
    shares = np.array([len(buffer) for buffer in sources], dtype=np.float64)
    parts: list[Batch] = []
    for _ in range(minibatches):
        if offline_rows:
            counts = rng.multinomial(offline_rows, shares / shares.sum())
            parts += [buffer.sample(int(count)) for buffer, count in zip(sources, counts) if count]
        parts.append(online.sample(batch_size - offline_rows))
    mask = np.tile(np.arange(batch_size) < offline_rows, minibatches)
    return concatenate(parts), mask


def take_rows(batch: Batch, rows: np.ndarray) -> Batch:
    """The rows ``rows`` of ``batch``."""
    return Batch({k: v[rows] for k, v in batch.observations.items()}, batch.actions[rows], batch.rewards[rows],
                 {k: v[rows] for k, v in batch.next_observations.items()}, batch.terminated[rows],
                 batch.intervened[rows])


# ------------------------------------------------------------------------------------------------
# Q-values after the switch
# ------------------------------------------------------------------------------------------------


def q_values(agent: SACAgent, batch: Batch) -> dict[str, float]:
    """The critic on ``batch`` without updating anything: ``q_data``, the mean over the ensemble
    and the rows of Q_i(s, a) for the batch's actions; ``q_policy``, the same for a ~ pi(.|s);
    ``td_target``, the mean of the TD target the next update regresses on (learner/sac.py); and
    ``reward``, the batch's mean reward. No augmentation; the agent's random stream is restored
    afterwards, so measuring does not change the updates that follow."""
    data = agent.batch_to_torch(batch)
    continuous = agent.policy.continuous_dim
    state = agent.generator.get_state()
    try:
        with torch.no_grad():
            features = agent.encoder(data.observations)
            q_data = agent.critic(features, data.actions[:, :continuous])
            policy_actions, _ = agent.policy.head(features, generator=agent.generator)
            q_policy = agent.critic(features, policy_actions)
            next_actions, next_log_prob = agent.policy.head(agent.encoder(data.next_observations),
                                                            generator=agent.generator)
            next_q = agent.target_critic(agent.target_encoder(data.next_observations), next_actions)
            target = agent.td_target(data.rewards, data.terminated, next_q, next_log_prob)
    finally:
        agent.generator.set_state(state)
    return {"q_data": float(q_data.mean()), "q_policy": float(q_policy.mean()), "td_target": float(target.mean()),
            "reward": float(data.rewards.mean())}


class QValueLog:
    """``RUN_DIR/warm_start_q.json``: the warm-start settings and one entry per measured update,
    ``{"updates", "transitions", "q_data", "q_policy", "td_target", "reward"}`` (see :func:`q_values`;
    ``updates`` = updates made before the measurement). Rewritten (atomically) at each entry."""

    def __init__(self, path: str | os.PathLike, config: WarmStartConfig, resume: bool = False) -> None:
        self.path = Path(path)
        self.config = config
        self.entries: list[dict[str, float]] = []
        self.header: dict[str, Any] = {"checkpoint": config.checkpoint, "warmup_steps": config.warmup_steps,
                                       "offline_ratio": config.offline_ratio}
        if resume and self.path.exists():
            try:
                self.entries = list(json.loads(self.path.read_text())["entries"])
            except (OSError, ValueError, KeyError) as error:
                log.warning("warm start: %s is unreadable (%s); starting a new Q log", self.path, error)

    def due(self, updates: int) -> bool:
        """Whether the update after ``updates`` updates is measured."""
        every = self.config.q_log_every
        return updates < self.config.q_log_updates or (every > 0 and updates % every == 0)

    def record(self, agent: SACAgent, batch: Batch, from_offline: np.ndarray, updates: int, transitions: int,
               max_rows: int) -> dict[str, float]:
        """Measure the online rows of ``batch`` (the last ``max_rows`` of them), append the entry,
        rewrite the file and return the entry."""
        rows = np.flatnonzero(~from_offline)[-max_rows:]
        entry = {"updates": int(updates), "transitions": int(transitions), "rows": int(len(rows)),
                 **q_values(agent, take_rows(batch, rows))}
        self.entries.append(entry)
        self.write()
        return entry

    def write(self, extra: Optional[dict[str, Any]] = None) -> None:
        if extra:
            self.header.update(extra)
        staging = self.path.with_name(self.path.name + ".tmp")
        staging.write_text(json.dumps({**self.header, "entries": self.entries}, indent=1))
        os.replace(staging, self.path)
