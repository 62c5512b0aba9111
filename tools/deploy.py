"""``steerl deploy``: run a trained or generalist policy on the robot, optionally V-GPS-steered.

The policy acts through the same robot server, safety layer, teleop override and operator console
as a training session; no learner is involved. ``--policy`` takes

- a policy directory (``policy.json``: a diffusion policy from ``steerl train-bc``, an OpenVLA
  adapter, a saved SAC policy, ...), or
- a learner checkpoint, a run directory (its newest checkpoint) or a ``best_policy`` directory.

``--vgps-critic CKPT`` wraps it in :class:`~policies.vgps.VGPSPolicy`: ``--k`` samples per step,
re-ranked by the critic with temperature ``--beta`` (0: argmax).

Every executed step is recorded (:class:`DeploymentRecorder`): ``RUN_DIR/episodes.jsonl`` has one
line per episode (return, length, success, interventions, re-recorded or not), and
``RUN_DIR/transitions/`` the steps as a replay buffer (operator steps flagged ``intervened``), ready
to be used as demonstrations or offline data. A re-recorded episode's steps are left out and the
episode is run again: ``--episodes`` counts the kept ones.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from actor.acting import ActingLoop
from hardware_configs.schema import SessionConfig
from transport import steerl_pb2 as pb


class DeploymentRecorder:
    """Keeps what a deployment executed; the acting loop drives it through the data interface of
    :class:`~actor.learner_link.LearnerLink` (``submit``, ``episode_finished``, ``take_policy``).

    Steps are held per episode and committed when the episode's summary arrives (dropped when it
    was re-recorded); :meth:`close` writes the buffer."""

    connected = False
    learner_updates = 0
    latency_ms = None

    def __init__(self, run_dir: str | Path, observation_space, action_dim: int, capacity: int, seed: int = 0) -> None:
        from learner.replay import ReplayBuffer

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.buffer = ReplayBuffer(observation_space, action_dim, capacity, seed=seed)
        self._pending: dict[int, list[tuple]] = {}
        self.episodes: list[dict[str, Any]] = []
        self._log = open(self.run_dir / "episodes.jsonl", "a", encoding="utf-8")

    def take_policy(self) -> None:
        return None

    @property
    def kept_episodes(self) -> int:
        """Episodes recorded and not re-recorded."""
        return sum(not entry["discarded"] for entry in self.episodes)

    def submit(self, episode: int, step: int, observation: dict[str, np.ndarray], action: np.ndarray,
               reward: float, next_observation: dict[str, np.ndarray], terminated: bool, truncated: bool,
               intervened: bool = False) -> None:
        self._pending.setdefault(episode, []).append(
            (observation, action, reward, next_observation, terminated, truncated, intervened))

    def episode_finished(self, summary: pb.EpisodeSummary) -> None:
        steps = self._pending.pop(summary.episode, [])
        if not summary.discarded:
            for observation, action, reward, next_observation, terminated, truncated, intervened in steps:
                self.buffer.add(observation, action, reward, next_observation, terminated, truncated,
                                intervened=intervened)
        record = {"episode": summary.episode, "return": round(summary.episode_return, 4), "length": summary.length,
                  "success": summary.success, "interventions": summary.interventions,
                  "discarded": summary.discarded, "unix_s": round(time.time(), 3)}
        self.episodes.append(record)
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()

    def close(self) -> Path:
        """Write the recorded transitions; returns their directory."""
        self._log.close()
        return self.buffer.save(self.run_dir / "transitions")


def load_deploy_policy(config: SessionConfig, spec: str | Path, vgps_critic: str | None = None,
                       num_samples: int = 10, beta: float = 1.0):
    """The policy named by ``spec`` (see the module docstring), V-GPS-steered with ``vgps_critic``.
    Returns (policy, a short name for the page and the logs)."""
    from policies.base import POLICY_FILE, load_policy

    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--policy: {spec} does not exist")
    if (path / POLICY_FILE).exists():
        base = load_policy(path)
        name = f"{base.kind} {path.name}"
    elif vgps_critic:
        from policies.sac_policy import SACPolicy

        base = SACPolicy.from_checkpoint(path, config)
        name = f"sac {path.name}"
    else:  # SAC or PA-RL, as steerl eval loads it
        from learner.learner import load_policy_from_checkpoint

        base, _ = load_policy_from_checkpoint(config, path)
        name = f"checkpoint {path.name}"
    if not vgps_critic:
        return base, name
    from policies.vgps import VGPSConfig, VGPSPolicy, load_critic

    steering = VGPSConfig(num_samples=num_samples, temperature=beta, seed=config.seed)
    steering.validate()
    policy = VGPSPolicy(base, load_critic(vgps_critic), steering)
    return policy, f"{name} + V-GPS (K={num_samples}, beta={beta:g})"


def run_deployment(config: SessionConfig, policy, policy_name: str, episodes: int, run_dir: str | Path,
                   deterministic: bool = False, start_server: bool = True, with_console: bool = False,
                   with_dashboard: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run ``policy`` for ``episodes`` episodes on the config's robot (see the module docstring);
    returns the summary also written to ``RUN_DIR/deploy_summary.json``."""
    from tools.session import (
        attach_reward_classifier,
        attach_teleop,
        dashboard_process,
        open_console,
        open_env,
    )

    console = console or Console()
    run_dir = Path(run_dir)
    console.print(f"[bold]steerl deploy[/] {config.name}: {policy_name}, {episodes} episodes, run dir {run_dir}")
    with ExitStack() as stack:
        env = open_env(config, None, stack, start_server=start_server)
        stack.callback(env.close)
        env = attach_teleop(config, attach_reward_classifier(config, env, console), console)
        if hasattr(env, "device"):
            stack.callback(env.device.close)
        recorder = DeploymentRecorder(run_dir, env.observation_space, env.action_space.shape[0],
                                      capacity=episodes * config.robot.task.max_episode_steps + 1, seed=config.seed)
        operator_console = None
        if with_console or with_dashboard:
            operator_console = open_console(config, stack, f"deploy-{config.name}", 0, mode="deploy",
                                            policy_name=policy_name)
        if with_dashboard:
            stack.enter_context(dashboard_process(config, run_dir.parent))
            console.print(f"operator console: http://{config.dashboard.host}:{config.dashboard.port}/")
        loop = ActingLoop(config, env, recorder, tuple(env.observation_space.spaces), console=operator_console)
        loop.policy, loop.random_steps = policy, 0
        started = time.monotonic()
        try:
            while recorder.kept_episodes < episodes and not loop.stop_requested:
                episode_return, length, success = loop.run_episode(deterministic=deterministic)
                outcome = loop.last_episode
                label = "discarded" if outcome is not None and outcome.discarded else (
                    "success" if success else "failure")
                done = [entry for entry in recorder.episodes if not entry["discarded"]]
                rate = np.mean([entry["success"] for entry in done]) if done else 0.0
                console.print(f"episode {recorder.kept_episodes}/{episodes}: {label}, return {episode_return:.2f}, "
                              f"{length} steps; success so far {rate:.0%}")
        finally:
            transitions = recorder.close()
    kept = [entry for entry in recorder.episodes if not entry["discarded"]]
    summary = {
        "config": config.name, "policy": policy_name, "episodes": len(kept),
        "discarded": len(recorder.episodes) - len(kept),
        "success_rate": float(np.mean([entry["success"] for entry in kept])) if kept else None,
        "mean_return": float(np.mean([entry["return"] for entry in kept])) if kept else None,
        "intervened_steps": int(sum(entry["interventions"] for entry in kept)),
        "transitions": str(transitions), "wall_time_s": round(time.monotonic() - started, 1),
    }
    (run_dir / "deploy_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    shown = "-" if summary["success_rate"] is None else f"{summary['success_rate']:.0%}"
    console.print(f"[bold]done[/]: success {shown} over {len(kept)} episodes; steps recorded in {transitions}")
    return summary
