"""The learner process: replay buffers, SAC/RLPD updates, weight publishing and checkpoints.

Loop (single-threaded, so the order of events is reproducible):

1. serve the actors (:class:`~learner.service.LearnerService`): transitions in — logged durably,
   then added to the online buffer — and weights out;
2. once the online buffer holds ``learning_starts`` transitions, run one ``agent.update`` per
   environment step received (each update does ``utd_ratio`` critic steps), on batches that mix
   demonstrations and the online buffer ``demo_ratio : 1 - demo_ratio`` (RLPD). A transition in
   which the operator overrode the policy (``intervened``) goes to the online buffer *and* to the
   intervention buffer (HIL-SERL); the demonstration share of a batch is split between the
   recorded demos and the interventions in proportion to their sizes. An episode the operator
   discards (``EpisodeSummary.discarded``, a re-record) is taken out of both buffers: the learner
   remembers which rows each of the newest ``EPISODE_ROWS_MEMORY`` episodes per actor stream went
   to (kept in the checkpoint) and makes them unsampleable (:meth:`ReplayBuffer.discard`; rows
   already overwritten are skipped); its late or resent transitions are dropped by the service;
3. every ``publish_every_updates`` updates publish the policy's weights; every
   ``checkpoint_every_updates`` write a checkpoint.

Warm start (``learner.warm_start``, WSRL, learner/wsrl.py): a fresh run loads the networks of an
offline (e.g. Cal-QL) checkpoint when the agent is built and publishes that policy at once; the
first update waits for ``warm_start.warmup_steps`` online transitions (instead of
``learning_starts``) and updates then follow the env steps counted from there; each batch draws
``warm_start.offline_ratio`` (instead of ``demo_ratio``) from the offline data and the rest from
the online buffer; the Q-values of the first online batches are logged.

Run directory layout::

    RUN_DIR/
      transition_log/           write-ahead log of received transitions (learner/transition_log.py)
      checkpoints/latest        name of the newest complete checkpoint
      checkpoints/ckpt-<updates>/
        agent.safetensors       networks, target networks, optimiser states, temperature
        agent.json              the agent's counters and optimiser hyper-parameters
        policy.safetensors      the actor-side policy alone (what `steerl eval` and deployment load)
        learner.json            spaces, observation keys, counters, each actor's acknowledged point
        online/                 the online replay buffer (learner/replay.py format)
        demos/                  the demo buffer, when there is one
        interventions/          operator-corrected transitions, when there are any
      best_policy/              the policy of the best periodic evaluation (`steerl train` writes
                                it at the end): policy.safetensors, and learner.json with the spaces
                                and a "best_eval" entry; `steerl eval --checkpoint` loads it too
      tensorboard/              scalars for TensorBoard
      warm_start_q.json         with a warm start: Q-values of the online batches after the switch

A checkpoint is written to ``ckpt-<n>.tmp`` and renamed into place, then ``latest`` is replaced
atomically: a crash leaves the previous checkpoint intact. On ``resume`` the newest readable
checkpoint is loaded (a corrupt one is reported with its path and skipped) and the transition log
written since is replayed, so the learner holds every transition it ever acknowledged. Without
``resume``, the checkpoints and transition log of an earlier run in the same directory are moved
into ``earlier_runs/<time>/`` (kept, never mixed into the new run).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from hardware_configs.loader import ConfigError, to_dict
from hardware_configs.schema import SessionConfig, is_loopback
from learner.durable import write_directory_atomically, write_durably
from learner.replay import Batch, ReplayBuffer, ReplayFormatError, sample_mixed
from learner.sac import SACAgent
from learner.service import LearnerService
from learner.transition_log import TransitionLog
from learner.wsrl import (
    Q_LOG_FILE,
    PretrainedCheckpoint,
    QValueLog,
    WarmStartError,
    check_warm_start,
    load_offline_data,
    load_warm_start,
    sample_batch,
)
from transport import steerl_pb2 as pb
from transport.codec import ProtocolError
from transport.spaces import RobotSpaces

log = logging.getLogger("steerl.learner")

KEEP_CHECKPOINTS = 2
# PA-RL checkpoints: the base policy's directory (its own save) as distilled so far.
BASE_POLICY_DIR = "base_policy"
LOG_EVERY_S = 10.0
# Per actor stream, the episodes whose replay rows are remembered so that they can be discarded.
EPISODE_ROWS_MEMORY = 8


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be read; the message names the path."""


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def save_agent(agent: SACAgent, directory: Path) -> None:
    safetensors.torch.save_file(agent.checkpoint_tensors(), str(directory / "agent.safetensors"))
    (directory / "agent.json").write_text(json.dumps(agent.checkpoint_meta(), indent=1))


def load_agent(agent: SACAgent, directory: Path) -> None:
    try:
        tensors = safetensors.torch.load_file(str(directory / "agent.safetensors"), device=str(agent.device))
        meta = json.loads((directory / "agent.json").read_text())
        agent.load_checkpoint(tensors, meta)
    except (OSError, ValueError, KeyError, RuntimeError, safetensors.SafetensorError) as error:
        raise CheckpointError(f"{directory}: cannot load the agent: {error}") from None


def latest_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else the newest checkpoint of the run dir ``path``."""
    path = Path(path)
    if (path / "learner.json").exists():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.exists():
        return path / "checkpoints" / latest.read_text().strip()
    raise CheckpointError(f"{path}: neither a checkpoint nor a run directory with checkpoints/latest")


def load_policy_from_checkpoint(config: SessionConfig, path: str | Path):
    """The deterministic-capable actor policy of a checkpoint (or ``best_policy``), and the
    observation keys it reads: the SAC policy, or PA-RL's steered base policy."""
    from policies.gaussian import TanhGaussianPolicy, load_policy_bytes

    directory = latest_checkpoint(path)
    try:
        meta = json.loads((directory / "learner.json").read_text())
        spaces = RobotSpaces.from_json(meta["spaces"])
        blob = (directory / "policy.safetensors").read_bytes()
        if meta.get("algorithm", "sac") == "parl":
            from policies.base import policy_from_bytes

            return policy_from_bytes(blob), tuple(spaces.observation)
        policy = TanhGaussianPolicy(config.learner.sac, spaces.observation_space(), spaces.action_space(),
                                    seed=config.seed)
        load_policy_bytes(policy, blob)
    except (OSError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{directory}: cannot load the policy: {error}") from None
    policy.eval()
    return policy, tuple(spaces.observation)


def write_best_policy(run_dir: str | Path, weights: bytes, best_eval: dict) -> Path:
    """Write ``RUN_DIR/best_policy`` (see the module docstring), taking the spaces from the run's
    newest checkpoint; returns its path."""
    source = latest_checkpoint(run_dir)
    try:
        meta = json.loads((source / "learner.json").read_text())
        spaces, algorithm = meta["spaces"], meta.get("algorithm", "sac")
    except (OSError, KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{source}: cannot read the spaces for the best policy: {error}") from None

    def write(staging: Path) -> None:
        write_durably(staging / "policy.safetensors", weights)
        write_durably(staging / "learner.json", json.dumps({"spaces": spaces, "algorithm": algorithm,
                                                            "best_eval": best_eval}, indent=1).encode())

    return write_directory_atomically(Path(run_dir) / "best_policy", write)


def archive_earlier_run(run_dir: Path) -> Path | None:
    """Move an earlier run's checkpoints and transition log out of ``run_dir`` into
    ``run_dir/earlier_runs/<time>/`` so that a fresh run starts empty; returns where, or None."""
    state = [run_dir / "checkpoints", run_dir / "transition_log"]
    held = [path for path in state if path.is_dir() and any(path.iterdir())]
    if not held:
        return None
    archive = run_dir / "earlier_runs" / time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while archive.exists():
        suffix += 1
        archive = archive.with_name(f"{archive.name.split('.')[0]}.{suffix}")
    archive.mkdir(parents=True)
    for path in held:
        os.replace(path, archive / path.name)
    log.warning("%s held an earlier run: its checkpoints and transition log moved to %s (pass resume to continue "
                "a run)", run_dir, archive)
    return archive


class Learner:
    """Replay + SAC/RLPD + service + checkpoints (see module docstring)."""

    def __init__(self, config: SessionConfig, run_dir: str | Path, resume: bool = False,
                 demos: str | Path | None = None, spaces: RobotSpaces | None = None) -> None:
        self.config = config
        self.settings = config.learner
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            archive_earlier_run(self.run_dir)
        self.device = resolve_device(self.settings.device)
        torch.set_num_threads(self.settings.num_threads or max(1, (os.cpu_count() or 2) - 1))
        self.keys = tuple(self.settings.observation_keys)
        self.agent: SACAgent | None = None
        self.online: ReplayBuffer | None = None
        self.demos: ReplayBuffer | None = None
        self.interventions: ReplayBuffer | None = None
        self._demo_path = Path(demos) if demos else None
        self.updates = 0
        self._writer = None
        self._stop = threading.Event()
        self._checkpoint_requested = threading.Event()
        self._last_metrics: dict[str, float] = {}
        self._rng = np.random.default_rng(config.seed)
        # stream id -> episode -> {"online": [add indices], "interventions": [add indices]}, oldest first.
        self._episode_rows: dict[int, OrderedDict[int, dict[str, list[int]]]] = {}
        self.episodes_discarded = 0
        # Warm start (WSRL): the offline checkpoint, until the agent is built from it (a resumed run
        # that has checkpoints of its own loads those instead); the offline buffers; the Q log.
        self.warm_start = self.settings.warm_start
        self.warm_started_from: dict | None = None
        self.offline: list[ReplayBuffer] = []
        self.q_log: QValueLog | None = None
        self.failure: Exception | None = None
        self._pretrained: PretrainedCheckpoint | None = None
        # PA-RL resuming: the base policy as distilled until the checkpoint.
        self._base_policy_dir: Path | None = None
        if self.warm_start.enabled:
            resuming_own = resume and any(self.checkpoint_dir.glob("ckpt-*[0-9]"))
            if resuming_own:
                log.info("warm start: resuming the run from its own checkpoints; %s is not loaded again",
                         self.warm_start.checkpoint)
            else:
                self._pretrained = check_warm_start(self.warm_start, self.settings.sac)
            self.q_log = QValueLog(self.run_dir / Q_LOG_FILE, self.warm_start, resume=resuming_own)
        if not is_loopback(self.settings.address) and self.settings.curve is None:
            raise ConfigError(f"learner.address {self.settings.address!r} binds beyond loopback: set learner.curve "
                              "keys (steerl keys generate) so that only authorised actors send transitions")
        self.service = LearnerService(
            self.settings.address, TransitionLog(self.run_dir / "transition_log"),
            on_transition=self._add, on_episode=self._episode, on_spaces=self._spaces_announced,
            on_discard=self._discard, curve=self.settings.curve)
        if resume:
            self._restore()
            if self.agent is None and spaces is None:  # killed before its first checkpoint
                spaces = self._logged_spaces()
        if self.agent is None and spaces is not None:  # fresh, or resumed before any checkpoint
            self.service.set_spaces(spaces)
            try:
                self._build(spaces)
            except (WarmStartError, ConfigError):
                self.close()
                raise
        replayed = self.service.replay_log()
        if replayed:
            log.info("replayed %d transitions from the transition log", replayed)

    # -- construction -------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return self.service.address

    def _spaces_announced(self, spaces: RobotSpaces) -> None:
        """The first actor's spaces: build. A warm-start checkpoint or a PA-RL base policy that
        does not fit them stops the learner (the actor is refused with the reason; :meth:`run`
        raises it)."""
        try:
            self._build(spaces)
        except (WarmStartError, ConfigError) as error:
            log.error("%s", error)
            self.failure = error
            self.stop()
            raise ProtocolError(pb.ERROR_INCOMPATIBLE, str(error)) from None

    @property
    def _spaces_file(self) -> Path:
        """The spaces of the transitions in the log: a learner resumed before its first
        checkpoint needs them to replay the log (it acknowledged those transitions)."""
        return self.run_dir / "transition_log" / "spaces.json"

    def _logged_spaces(self) -> RobotSpaces | None:
        if not self._spaces_file.exists():
            return None
        return RobotSpaces.from_json(json.loads(self._spaces_file.read_text()))

    def _build(self, spaces: RobotSpaces) -> None:
        """Create the agent and buffers once the robot's spaces are known (with a warm start, the
        agent from the offline checkpoint: checked before anything is kept)."""
        if not self._spaces_file.exists():
            write_durably(self._spaces_file, json.dumps(spaces.to_json()).encode())
        selected = spaces.select(self.keys)
        observation_space, action_space = selected.observation_space(), selected.action_space()
        if self.settings.algorithm == "parl":
            agent = self._parl_agent(selected)
        else:
            agent = SACAgent(self.settings.sac, observation_space, action_space, device=self.device,
                             seed=self.config.seed)
        if self.warm_start.enabled:
            if self._pretrained is not None:
                self.warm_started_from = load_warm_start(agent, self.warm_start, self._pretrained)
                self._pretrained = None
            self.offline = load_offline_data(self.warm_start, observation_space)
        self.spaces = selected
        self.agent = agent
        self.online = ReplayBuffer(observation_space, action_space.shape[0], self.settings.replay_capacity,
                                   seed=self.config.seed)
        self.interventions = ReplayBuffer(observation_space, action_space.shape[0],
                                          self.settings.intervention_capacity, seed=self.config.seed + 1)
        if self._demo_path is not None and self.demos is None:
            self.demos = ReplayBuffer.load(self._demo_path, observation_space)
            log.info("loaded %d demo transitions from %s", len(self.demos), self._demo_path)
        if self.warm_start.enabled:
            self._announce_warm_start()
        self.service.publish(self.agent.publish_policy(), self.updates)
        log.info("learner ready: %s, observation %s, action %s, device %s", self.settings.algorithm,
                 {k: tuple(v.shape) for k, v in selected.observation.items()}, tuple(selected.action.shape), self.device)

    def _parl_agent(self, spaces: RobotSpaces) -> SACAgent:
        """PA-RL: the base policy (from the run's checkpoint when resuming, else
        ``learner.parl.base_policy``) steered and distilled by a critic built from ``learner.sac``."""
        from learner.parl import PARLAgent
        from policies.base import load_policy

        source = self._base_policy_dir or Path(self.settings.parl.base_policy)
        try:
            base = load_policy(source, self.device)
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(f"learner.parl.base_policy: {source}: cannot load the base policy: {error}") from None
        reads = tuple(getattr(base, "observation_keys", ()) or ())
        if reads:
            missing = sorted(set(reads) - set(spaces.observation))
            if missing:
                raise ConfigError(f"learner.parl.base_policy: {source} reads {', '.join(missing)}, which "
                                  "learner.observation_keys leaves out of the replay: add them")
        log.info("PA-RL: fine-tuning the %s policy of %s", base.kind, source)
        return PARLAgent(self.settings.parl, base, spaces.observation_space(), spaces.action_space(),
                         sac=self.settings.sac, device=self.device, seed=self.config.seed)

    def _announce_warm_start(self) -> None:
        """Log how a warm-started run samples, and head the Q log with where it started from."""
        settings = self.warm_start
        offline = sum(len(buffer) for buffer in self._offline_sources())
        if settings.offline_ratio and offline:
            log.info("warm start: %.0f%% of each batch from %d offline transitions, the rest online",
                     100 * settings.offline_ratio, offline)
        else:
            log.info("warm start: fine-tuning on online data only (the offline data is discarded)")
        if self.demos is not None and not settings.offline_ratio:
            log.warning("warm start: the --demos buffer is not sampled: learner.warm_start.offline_ratio is 0")
        if self.updates == 0:
            log.info("warm start: no updates until %d transitions from the pre-trained policy are in",
                     settings.warmup_steps)
        if self.q_log is not None and self.warm_started_from is not None:
            self.q_log.write({"warm_started_from": self.warm_started_from})

    def _offline_sources(self) -> list[ReplayBuffer]:
        """What a warm-started run samples at ``offline_ratio``: the offline data and the demos."""
        return self.offline + ([self.demos] if self.demos is not None else [])

    def _add(self, stream_id: int, transition: dict) -> None:
        assert self.online is not None
        observation = {key: transition["observation"][key] for key in self.spaces.observation}
        next_observation = {key: transition["next_observation"][key] for key in self.spaces.observation}
        fields = (observation, transition["action"], transition["reward"], next_observation,
                  transition["terminated"], transition["truncated"])
        rows = self._rows_of(stream_id, int(transition.get("episode", -1)))
        rows["online"].append(self.online.add(*fields, stream_id=stream_id, intervened=transition["intervened"]))
        if transition["intervened"]:
            assert self.interventions is not None
            rows["interventions"].append(self.interventions.add(*fields, stream_id=stream_id, intervened=True))

    def _rows_of(self, stream_id: int, episode: int) -> dict[str, list[int]]:
        """The add indices of ``episode`` of ``stream_id`` (remembered for the newest episodes only)."""
        episodes = self._episode_rows.setdefault(stream_id, OrderedDict())
        if episode not in episodes:
            episodes[episode] = {"online": [], "interventions": []}
            while len(episodes) > EPISODE_ROWS_MEMORY:
                episodes.popitem(last=False)
        return episodes[episode]

    def _discard(self, stream_id: int, episode: int) -> None:
        """Take every transition of a discarded episode out of the online and intervention buffers."""
        rows = self._episode_rows.get(stream_id, OrderedDict()).pop(episode, None)
        if rows is None:
            log.info("discarded episode %d of stream %d: none of its transitions is stored here (not yet "
                     "arrived, or older than the newest %d episodes)", episode, stream_id, EPISODE_ROWS_MEMORY)
            return
        online = self.online.discard(rows["online"]) if self.online is not None else 0
        interventions = self.interventions.discard(rows["interventions"]) if self.interventions is not None else 0
        self.episodes_discarded += 1
        log.info("discarded episode %d of stream %d: %d online and %d intervention transitions dropped",
                 episode, stream_id, online, interventions)

    def _episode(self, actor_id: str, summary: pb.EpisodeSummary) -> None:
        if summary.discarded:  # re-recorded: not an outcome of the policy (its rows went in _discard)
            return
        writer = self.writer
        tag = "eval" if summary.evaluation else "train"
        step = self.service.transitions_received
        writer.add_scalar(f"{tag}/episode_return", summary.episode_return, step)
        writer.add_scalar(f"{tag}/success", float(summary.success), step)
        writer.add_scalar(f"{tag}/episode_length", summary.length, step)
        writer.add_scalar(f"{tag}/intervention_rate", summary.intervention_rate, step)

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    # -- training -----------------------------------------------------------------------------
    def _sample(self) -> Batch:
        return self._sample_with_sources()[0]

    def _sample_with_sources(self) -> tuple[Batch, np.ndarray | None]:
        """The next update's batch, and with a warm start which rows came from offline data."""
        assert self.online is not None
        sac = self.settings.sac
        if self.warm_start.enabled:
            return sample_batch(self.online, self._offline_sources(), sac.batch_size, self.warm_start.offline_ratio,
                                sac.utd_ratio, self._rng)
        demo_sources = [buffer for buffer in (self.demos, self.interventions) if buffer is not None]
        return sample_mixed(self.online, demo_sources, sac.batch_size, self.settings.demo_ratio, sac.utd_ratio,
                            self._rng), None

    def ready_to_update(self) -> bool:
        """One update per env step received, once ``learning_starts`` transitions are in; with a
        warm start, once ``warmup_steps`` are, and one per env step after those."""
        if self.agent is None or self.online is None:
            return False
        if self.warm_start.enabled:
            warmup = self.warm_start.warmup_steps
            return len(self.online) >= max(1, warmup) and self.updates < self.service.transitions_received - warmup
        return len(self.online) >= self.settings.learning_starts and self.updates < self.service.transitions_received

    def train_step(self) -> dict[str, float]:
        assert self.agent is not None and self.online is not None
        if not self.agent.state_normalized:
            keys = tuple(self.spaces.observation)
            sources = [self.online] + ([self.demos] if self.demos is not None else [])
            self.agent.fit_state_normalization([buffer.observations(keys) for buffer in sources])
            log.info("state standardised with statistics of %d transitions",
                     sum(len(buffer) for buffer in sources))
        if self.warm_start.enabled and self.updates == 0:
            log.info("warm start: warm-up done (%d transitions from the pre-trained policy); fine-tuning online",
                     self.service.transitions_received)
        batch, from_offline = self._sample_with_sources()
        if self.q_log is not None and self.q_log.due(self.updates):
            self._log_q_values(batch, from_offline)
        if self.warm_start.enabled and self.updates == self.warm_start.actor_delay_updates > 0:
            log.info("warm start: the actor updates from now on (%d critic-only updates done)", self.updates)
        if self.warm_start.enabled and self.updates < self.warm_start.actor_delay_updates:
            metrics = self.agent.update(batch, update_actor=False)  # SAC only: PA-RL cannot warm start
        else:
            metrics = self.agent.update(batch)
        self.updates += 1
        if self.settings.algorithm == "parl" and self.updates % self.settings.parl.distill_every_updates == 0:
            metrics.update(self.agent.distill())
        self.service.learner_updates = self.updates
        if self.updates % self.settings.publish_every_updates == 0:
            self.service.publish(self.agent.publish_policy(), self.updates)
        if self.updates % self.settings.checkpoint_every_updates == 0:
            self.checkpoint()
        return metrics

    def _log_q_values(self, batch: Batch, from_offline: np.ndarray | None) -> None:
        """Measure the critic on the online rows of the coming update's batch (warm start)."""
        assert self.q_log is not None and self.agent is not None and from_offline is not None
        entry = self.q_log.record(self.agent, batch, from_offline, self.updates, self.service.transitions_received,
                                  max_rows=self.settings.sac.batch_size)
        for name in ("q_data", "q_policy", "td_target"):
            self.writer.add_scalar(f"warm_start/{name}", entry[name], self.updates)
        log.info("warm start: Q after %d updates: data actions %.4g, policy actions %.4g, TD target %.4g "
                 "(mean reward %.3g)", self.updates, entry["q_data"], entry["q_policy"], entry["td_target"],
                 entry["reward"])

    def stop(self) -> None:
        self._stop.set()

    def request_checkpoint(self) -> None:
        """Ask the training loop (from any thread) to write a checkpoint at its next iteration."""
        self._checkpoint_requested.set()

    def run(self, max_updates: int | None = None) -> None:
        """Serve and train until :meth:`stop` (or ``max_updates``); then checkpoint and close."""
        last_log, window_start, window_updates = time.monotonic(), time.monotonic(), 0
        try:
            while not self._stop.is_set() and (max_updates is None or self.updates < max_updates):
                self.service.poll(timeout_ms=0 if self.ready_to_update() else 5)
                if self.ready_to_update():
                    self._last_metrics = self.train_step()
                    window_updates += 1
                if self._checkpoint_requested.is_set() and self.agent is not None:
                    self.checkpoint()
                    self._checkpoint_requested.clear()
                now = time.monotonic()
                if now - last_log >= LOG_EVERY_S:
                    rate = window_updates / (now - window_start)
                    self._log_metrics(rate)
                    last_log, window_start, window_updates = now, now, 0
        finally:
            if self.agent is not None:
                if self._last_metrics:  # the last window's metrics, however short it was
                    self._log_metrics(window_updates / max(1e-9, time.monotonic() - window_start))
                self.checkpoint()
            self.close()
        if self.failure is not None:
            raise self.failure

    def _log_metrics(self, updates_per_s: float) -> None:
        step = self.service.transitions_received
        for name, value in self._last_metrics.items():
            self.writer.add_scalar(f"learner/{name}", value, self.updates)
        self.writer.add_scalar("learner/updates_per_s", updates_per_s, self.updates)
        self.writer.add_scalar("learner/online_transitions", len(self.online or ()), step)
        self.writer.flush()
        if self.warm_start.enabled and self.updates == 0:
            log.info("warm-up: %d of %d transitions from the pre-trained policy, no updates yet", step,
                     self.warm_start.warmup_steps)
        log.info("updates %d (%.1f/s), transitions %d, %s", self.updates, updates_per_s, step,
                 ", ".join(f"{k} {v:.3g}" for k, v in sorted(self._last_metrics.items())[:6]))

    # -- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def checkpoint(self) -> Path:
        """Write a complete checkpoint atomically and trim the transition log behind it."""
        assert self.agent is not None and self.online is not None
        segment = self.service.transition_log.rotate() if self.service.transition_log is not None else 0
        name = f"ckpt-{self.updates:09d}"
        final = self.checkpoint_dir / name
        staging = self.checkpoint_dir / f"{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_agent(self.agent, staging)
        (staging / "policy.safetensors").write_bytes(self.agent.publish_policy())
        if self.settings.algorithm == "parl":
            self.agent.base_policy.save(staging / BASE_POLICY_DIR)  # distilled so far
        self.online.save(staging / "online")
        if self.demos is not None:
            self.demos.save(staging / "demos")
        if self.interventions is not None and self.interventions.transitions_added:
            self.interventions.save(staging / "interventions")
        meta = {
            "format": 1,
            "algorithm": self.settings.algorithm,
            "updates": self.updates,
            "transitions_received": self.service.transitions_received,
            "weights_version": self.service.weights_version,
            "streams": self.service.stream_table(),
            "spaces": self.spaces.to_json(),
            "observation_keys": list(self.keys),
            "log_segment": segment,
            "config": to_dict(self.config),
            "episode_rows": {str(stream): {str(episode): rows for episode, rows in episodes.items()}
                             for stream, episodes in self._episode_rows.items()},
            "warm_start": self.warm_started_from,
        }
        (staging / "learner.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        latest_tmp = self.checkpoint_dir / "latest.tmp"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, self.checkpoint_dir / "latest")
        if self.service.transition_log is not None:
            self.service.transition_log.drop_before(segment)
        for old in sorted(self.checkpoint_dir.glob("ckpt-*[0-9]"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s (%d updates, %d transitions)", final, self.updates, len(self.online))
        return final

    def _restore(self) -> None:
        candidates = sorted(self.checkpoint_dir.glob("ckpt-*[0-9]"), reverse=True)
        if not candidates:
            log.warning("no checkpoint in %s: starting fresh (the transition log is still replayed)",
                        self.checkpoint_dir)
            return
        for directory in candidates:
            try:
                self._load_checkpoint(directory)
                log.info("resumed from %s (%d updates)", directory, self.updates)
                return
            except WarmStartError:
                raise  # the config's offline data, not the checkpoint, is at fault
            except (CheckpointError, ReplayFormatError, OSError, ValueError, KeyError) as error:
                log.error("checkpoint %s is unreadable (%s); trying the previous one", directory, error)
        raise CheckpointError(f"no readable checkpoint in {self.checkpoint_dir}")

    def _load_checkpoint(self, directory: Path) -> None:
        meta_path = directory / "learner.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{meta_path}: {error}") from None
        spaces = RobotSpaces.from_json(meta["spaces"])
        self.keys = tuple(meta["observation_keys"])
        self.updates = int(meta["updates"])
        self.service.set_spaces(spaces)
        if (directory / BASE_POLICY_DIR).is_dir():
            self._base_policy_dir = directory / BASE_POLICY_DIR
        self._build(spaces)
        assert self.agent is not None
        load_agent(self.agent, directory)
        self.online = ReplayBuffer.load(directory / "online", self.spaces.observation_space())
        if (directory / "demos").exists():
            self.demos = ReplayBuffer.load(directory / "demos", self.spaces.observation_space())
        if (directory / "interventions").exists():
            self.interventions = ReplayBuffer.load(directory / "interventions", self.spaces.observation_space())
        self.service.restore_stream_table(meta["streams"])
        self._episode_rows = {int(stream): OrderedDict((int(episode), rows) for episode, rows in episodes.items())
                              for stream, episodes in meta.get("episode_rows", {}).items()}
        self.service.transitions_received = int(meta["transitions_received"])
        self.service.weights_version = int(meta["weights_version"])
        self.warm_started_from = meta.get("warm_start")
        self.service.publish(self.agent.publish_policy(), self.updates)

    def close(self) -> None:
        self.service.close()
        if self._writer is not None:
            self._writer.close()
