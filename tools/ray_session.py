"""Scale out with Ray: the learner, many simulated actors and a policy server as Ray actors.

``steerl train --ray`` (or ``ray.enabled: true``) runs one session on a Ray instance: a local one
started here by default, or the running cluster at ``ray.address``. Ray places, starts, watches
and restarts the processes; it carries no experience. The data path is the one of every other
session: each actor ships transitions to the learner over the actor <-> learner ZeroMQ protocol
(sequence numbers, acknowledgements once logged durably, weights back), so a real robot's actor
(``steerl actor``) can join a Ray-run learner at the address the session prints.

Processes (each a Ray actor)
    - :class:`LearnerWorker`: the :class:`~learner.learner.Learner` (replay, SAC/RLPD, checkpoints,
      transition log), training in a thread while the supervisor asks for its status. It asks Ray
      for a GPU when the cluster has one (``ray.learner_gpus``).
    - :class:`SimActorWorker` x ``ray.num_actors``: a PyBullet cell of its own (in its process, or
      behind a robot server child on a free port with ``ray.actor_env: server``) and the ordinary
      :class:`~actor.acting.ActingLoop` + :class:`~actor.learner_link.LearnerLink`. CPU only.
    - :class:`PolicyServerWorker` (``ray.policy_server: DIR``): ``steerl policy-server`` on that
      policy directory; the actors then take their actions from it. GPU when there is one.

How N actors share one session's settings
    Actor ``i`` is ``ray-actor-i`` to the learner. Episode seeds differ per actor (drawn from the
    session seed, ``i`` and the first episode number). The random exploration steps are split
    between the actors; only actor 0 runs the periodic and final evaluations (its results are the
    session's). Simulation pacing (``actor.max_steps_per_update``) is divided by N, so that the
    actors together keep the learner's update-to-data ratio.

Faults
    - An actor that dies (its process killed, its node lost) is restarted by Ray, up to
      ``ray.max_actor_restarts`` times. It says hello under the same id, the learner answers with
      the last transition it holds from it, and the actor numbers its next episode after that one.
      The steps it had taken that the learner had not yet acknowledged die with it (the episode
      under way is cut short at its last acknowledged step); nothing is stored twice, and no step
      is missing inside any stored episode (the learner counts ``missing`` per actor: it stays 0).
    - A learner that dies is restarted by Ray (``ray.max_learner_restarts``) with ``resume``: it
      loads its last checkpoint and replays its transition log, so every transition it ever
      acknowledged is back. Meanwhile the actors act on with their last weights and keep what the
      learner has not acknowledged; they resend it when it answers. If it came back on another
      node, the supervisor points them at its new address.
    - The run directory must be on storage the learner's node can reach after a restart (on one
      machine: any directory; on a cluster: shared storage, or pin the learner to a node).

The supervisor (:class:`RaySession`, in the ``steerl train`` process) polls the workers twice a
second, resubmits the acting loop of a restarted actor, shows one progress line for the whole
session and stops it when the learner holds ``total_steps`` transitions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np

from hardware_configs.loader import ConfigError, load_dataclass, to_dict
from hardware_configs.schema import SessionConfig

log = logging.getLogger("steerl.ray")

POLL_INTERVAL_S = 0.5
# How long the supervisor waits for a worker to answer a status call.
STATUS_TIMEOUT_S = 10.0
# How long starting a worker (imports, a PyBullet cell, a learner) may take.
START_TIMEOUT_S = 180.0
# When the session ends: time for the actors to finish their episode (and actor 0 its final
# evaluation) and for the learner to write its last checkpoint.
ACTOR_STOP_TIMEOUT_S = 300.0
LEARNER_STOP_TIMEOUT_S = 180.0


def _config_from(data: dict, what: str) -> SessionConfig:
    """The session config a worker receives as plain data, validated again where it runs."""
    return load_dataclass(SessionConfig, data, what)


def _with_host(address: str, host: str) -> str:
    """``tcp://A:PORT`` -> ``tcp://HOST:PORT``."""
    parsed = urlparse(address)
    return f"{parsed.scheme}://{host}:{parsed.port}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _restarted_by_ray() -> bool:
    """Whether Ray restarted the current actor after its process died."""
    import warnings

    import ray

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Ray's own use of a deprecated property
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def _gpu_ids() -> list:
    """The GPUs Ray assigned to the current worker."""
    import ray

    return list(ray.get_gpu_ids())


def _quiet_worker_logs() -> None:
    """Workers print warnings and errors only (Ray forwards them to the supervisor's terminal)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def actor_config(config: SessionConfig, index: int, learner_address: str, restarted: bool,
                 policy_server_address: str | None = None) -> SessionConfig:
    """The config of simulated actor ``index`` of ``ray.num_actors`` (see the module docstring)."""
    actors = config.ray.num_actors
    acting = config.actor
    acting = dataclasses.replace(
        acting,
        random_steps=0 if restarted else math.ceil(acting.random_steps / actors),
        eval_every_episodes=acting.eval_every_episodes if index == 0 else 0,
        eval_episodes=acting.eval_episodes if index == 0 else 0,
        max_steps_per_update=acting.max_steps_per_update / actors,
    )
    if policy_server_address is not None:
        acting = dataclasses.replace(acting, policy_source="remote", policy_server=dataclasses.replace(
            acting.policy_server, address=policy_server_address))
    env = config.env
    server = config.server
    if config.ray.actor_env == "inproc":
        env = dataclasses.replace(env, connection="inproc")
    else:
        address = f"tcp://127.0.0.1:{_free_port()}"
        env = dataclasses.replace(env, connection="zmq", address=address)
        server = dataclasses.replace(server, address=address)
    seed = int(np.random.SeedSequence([config.seed, index]).generate_state(1)[0] % 2**31)
    return dataclasses.replace(config, seed=seed, env=env, server=server, actor=acting,
                               learner=dataclasses.replace(config.learner, address=learner_address))


class LearnerWorker:
    """The learner as a Ray actor: trains in a thread; answers status and stop calls meanwhile."""

    def __init__(self, config_data: dict, run_dir: str, demos: str | None, resume: bool,
                 bind_node_address: bool) -> None:
        import ray

        from learner.learner import Learner

        _quiet_worker_logs()
        config = _config_from(config_data, "ray learner config")
        if bind_node_address:  # actors on other nodes must reach it
            config = dataclasses.replace(config, learner=dataclasses.replace(
                config.learner, address=_with_host(config.learner.address, ray.util.get_node_ip_address())))
        #: Whether Ray restarted this worker after its process died (it then resumes).
        self.restarted = _restarted_by_ray()
        self.learner = Learner(config, run_dir, resume=resume or self.restarted, demos=demos)
        self.resumed_updates = self.learner.updates
        self.error: str | None = None
        self._thread = threading.Thread(target=self._train, name="learner", daemon=True)
        self._thread.start()

    def _train(self) -> None:
        try:
            self.learner.run()
        except BaseException as error:  # reported through status(); the supervisor stops the session
            self.error = f"{type(error).__name__}: {error}"
            log.error("learner failed: %s", self.error)

    def address(self) -> str:
        return self.learner.address

    def status(self) -> dict[str, Any]:
        """Updates, transitions held, weights version, per-actor ingest counts, health."""
        service = self.learner.service
        actors = {}
        for actor_id, stats in list(service.actors.items()):
            actors[actor_id] = {"accepted": stats.accepted, "duplicates": stats.duplicates,
                                "missing": stats.missing, "rejected": sum(stats.rejected.values()),
                                "acked": list(stats.acked) if stats.acked else None}
        online = self.learner.online
        return {"updates": self.learner.updates, "transitions": service.transitions_received,
                "weights_version": service.weights_version, "weights_bytes": service.weights_bytes,
                "replay_nbytes": online.nbytes if online is not None else 0,
                "replay_capacity": online.capacity if online is not None else 0,
                "address": self.learner.address,
                "restarted": self.restarted, "resumed_updates": self.resumed_updates, "pid": os.getpid(),
                "gpu_ids": _gpu_ids(),
                "training": self._thread.is_alive(), "error": self.error, "actors": actors}

    def checkpoint(self, timeout_s: float) -> int:
        """Write a checkpoint at the training loop's next iteration and wait for it; returns the
        update count it holds."""
        latest = self.learner.checkpoint_dir / "latest"
        before = latest.read_text() if latest.exists() else ""
        self.learner.request_checkpoint()
        deadline = time.monotonic() + timeout_s
        while not (latest.exists() and latest.read_text() != before):
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError(f"no checkpoint written within {timeout_s:.0f} s")
            time.sleep(0.05)
        return int(latest.read_text().split("-")[-1])

    def stop(self, timeout_s: float = LEARNER_STOP_TIMEOUT_S) -> dict[str, Any]:
        """Stop training; the learner writes its final checkpoint. Returns the final status."""
        self.learner.stop()
        self._thread.join(timeout_s)
        return self.status()


class SimActorWorker:
    """One simulated actor as a Ray actor: its own PyBullet cell, the ordinary acting loop."""

    def __init__(self, config_data: dict, index: int, learner_address: str,
                 policy_server_address: str | None = None) -> None:
        from rich.console import Console

        from actor.rollout import connect_env, robot_server_process
        from actor.env import make_env
        from tools.session import attach_reward_classifier, attach_teleop

        _quiet_worker_logs()
        self.index = index
        self.actor_id = f"ray-actor-{index}"
        self.restarted = _restarted_by_ray()
        session = _config_from(config_data, f"ray actor {index} config")
        self.config = actor_config(session, index, learner_address, self.restarted, policy_server_address)
        self._stack = ExitStack()
        console = Console(quiet=True)
        try:
            if self.config.env.connection == "inproc":
                env = make_env(self.config, client_name=self.actor_id)
            else:
                server = self._stack.enter_context(robot_server_process(self.config))
                env = connect_env(self.config, server)
            self._stack.callback(env.close)
            env = attach_teleop(self.config, attach_reward_classifier(self.config, env, console), console)
            if hasattr(env, "device"):
                self._stack.callback(env.device.close)
        except BaseException:
            self._stack.close()
            raise
        self.env = env
        self._lock = threading.Lock()
        self._loop = None
        self._link = None
        self._remote = None
        self._stop_requested = False

    def run(self, total_steps: int) -> dict[str, Any]:
        """Act until :meth:`stop` (or ``total_steps`` of this actor); actor 0 then runs the final
        evaluation. Returns the final :meth:`progress`."""
        import torch

        from actor.remote_policy import connect_remote_policy
        from tools.session import start_acting
        from transport.spaces import RobotSpaces

        torch.set_num_threads(1)
        config = self.config
        spaces = RobotSpaces.from_gym(self.env.observation_space, self.env.action_space).select(
            config.learner.observation_keys)
        remote = None
        if config.actor.policy_source == "remote":
            remote = connect_remote_policy(config.actor.policy_server, spaces, client_name=self.actor_id)
        self._remote = remote
        try:
            loop, link = start_acting(config, self.env, self.actor_id, spaces, remote)
            with self._lock:
                self._loop, self._link = loop, link
                if self._stop_requested:
                    loop.request_stop()
            try:
                loop.run(total_steps)
                if self.index == 0 and config.actor.eval_episodes and loop.policy is not None:
                    loop.evaluate(config.actor.eval_episodes)
            finally:
                link.close(flush_timeout_s=30)
        finally:
            if remote is not None:
                remote.close()
        return self.progress()

    def progress(self, final: bool = False) -> dict[str, Any]:
        """This actor's acting statistics; ``final`` adds its episode history and the weights of
        its best evaluation."""
        loop, link = self._loop, self._link
        if loop is None:
            return {"index": self.index, "started": False, "restarted": self.restarted, "pid": os.getpid()}
        stats = loop.stats
        report = {
            "index": self.index, "started": True, "restarted": self.restarted, "pid": os.getpid(),
            "gpu_ids": _gpu_ids(),
            "env_steps": stats.env_steps, "episodes": stats.episodes, "episode": stats.episode,
            "success_rate": stats.success_rate, "mean_return": stats.mean_return,
            "recent_successes": len(stats.recent_successes), "steps_per_s": stats.steps_per_s,
            "policy_version": stats.policy_version, "eval_success_rate": stats.eval_success_rate,
            "eval_history": list(stats.eval_history), "best_eval": stats.best_eval,
            "link_connected": bool(link and link.connected), "link_latency_ms": link.latency_ms if link else None,
            "learner_updates": link.learner_updates if link else 0, "dropped": link.dropped if link else 0,
        }
        remote = self._remote
        if remote is not None:
            report["remote_policy"] = {"name": remote.stats.policy_name, "answered": remote.stats.answered,
                                       "holds": sum(remote.stats.holds.values()),
                                       "round_trip_ms": remote.stats.round_trip_ms}
        if final:
            report["episode_history"] = list(stats.episode_history)
            report["best_policy_weights"] = stats.best_policy_weights
        return report

    def stop(self) -> None:
        """End the acting loop after the episode under way."""
        with self._lock:
            self._stop_requested = True
            if self._loop is not None:
                self._loop.request_stop()

    def retarget(self, learner_address: str) -> None:
        """The learner now listens at ``learner_address`` (it was restarted elsewhere)."""
        self.config = dataclasses.replace(self.config, learner=dataclasses.replace(
            self.config.learner, address=learner_address))
        if self._link is not None:
            self._link.retarget(learner_address)

    def close(self) -> None:
        self._stack.close()


class PolicyServerWorker:
    """``steerl policy-server`` as a Ray actor (on a GPU when it was given one)."""

    def __init__(self, config_data: dict, policy_dir: str, bind_node_address: bool) -> None:
        import ray
        import torch

        from learner.policy_server import PolicyServer

        _quiet_worker_logs()
        config = _config_from(config_data, "ray policy server config")
        server_config = config.learner.policy_server
        if bind_node_address:
            server_config = dataclasses.replace(
                server_config, address=_with_host(server_config.address, ray.util.get_node_ip_address()))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.server = PolicyServer.from_directory(policy_dir, server_config, device=device)
        self._thread = threading.Thread(target=self.server.serve_forever, name="policy-server", daemon=True)
        self._thread.start()

    def address(self) -> str:
        return self.server.address

    def gpu_ids(self) -> list:
        return _gpu_ids()

    def stop(self) -> None:
        self.server.stop()
        self._thread.join(10)


@dataclasses.dataclass
class ActorSlot:
    """The supervisor's view of one simulated actor."""

    index: int
    handle: Any
    run: Any = None  # the ObjectRef of its running run() call
    # running; restarting (its process died, Ray brings it back); done (stopped); dead (restarts used up)
    state: str = "running"
    restarts: int = 0
    pid: int | None = None
    last: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Env steps of its earlier lives (a restarted actor counts from 0 again).
    earlier_steps: int = 0

    @property
    def alive(self) -> bool:
        return self.state in ("running", "restarting")

    @property
    def env_steps(self) -> int:
        return self.earlier_steps + int(self.last.get("env_steps", 0))


class RaySession:
    """Starts, supervises and stops one Ray-run training session (see the module docstring).

    ``start()`` then ``poll()`` repeatedly (or ``run()``), then ``stop()``; :meth:`kill_actor` and
    :meth:`kill_learner` kill a worker's process the way a crash does (Ray restarts it).
    """

    def __init__(self, config: SessionConfig, run_dir: str | Path, demos: str | None = None,
                 resume: bool = False) -> None:
        _check_ray_config(config)
        self.config = config
        self.settings = config.ray
        self.run_dir = Path(run_dir).resolve()
        self.demos = str(Path(demos).resolve()) if demos else None
        self.resume = resume
        self.learner: Any = None
        self.policy_server: Any = None
        self.actors: list[ActorSlot] = []
        self.learner_status: dict[str, Any] = {}
        self.learner_restarts = 0
        self.learner_address = ""
        self._started_ray = False
        self._learner_pid: int | None = None
        self._total_steps = 0

    # -- start --------------------------------------------------------------------------------
    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.settings.address:
            ray.init(address=self.settings.address, log_to_driver=True)
        else:
            wanted = self.settings.learner_cpus + self.settings.num_actors * self.settings.actor_cpus + (
                1 if self.settings.policy_server else 0)
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(wanted)), include_dashboard=False,
                     object_store_memory=self.settings.object_store_mb * 1024 * 1024, log_to_driver=True)
        self._started_ray = True

    def _gpus(self) -> tuple[float, float]:
        """GPUs for the learner and for the policy server: one each when the cluster has enough,
        half of one each when it has a single GPU (as on one workstation), none without."""
        import ray

        total = ray.cluster_resources().get("GPU", 0)
        wanted = self.settings.learner_gpus
        if wanted is None:
            wanted = 1.0 if total >= 1 and self.config.learner.device != "cpu" else 0.0
        if not self.settings.policy_server:
            return wanted, 0.0
        if total >= 2 * max(wanted, 1.0):
            return wanted, 1.0
        share = min(wanted, 0.5) if wanted else (0.5 if total >= 1 else 0.0)
        return share, share

    def start(self, total_steps: int) -> None:
        """Start Ray (unless it runs already), the learner, the policy server and the actors."""
        import ray

        self._init_ray()
        self._total_steps = total_steps
        data = to_dict(self.config)
        on_cluster = bool(self.settings.address)
        gpus, server_gpus = self._gpus()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        learner_class = ray.remote(LearnerWorker).options(
            num_cpus=self.settings.learner_cpus, num_gpus=gpus,
            max_restarts=self.settings.max_learner_restarts, max_task_retries=0, max_concurrency=4)
        self.learner = learner_class.remote(data, str(self.run_dir), self.demos, self.resume, on_cluster)
        self.learner_address = ray.get(self.learner.address.remote(), timeout=START_TIMEOUT_S)
        self.learner_status = ray.get(self.learner.status.remote(), timeout=STATUS_TIMEOUT_S)
        self._learner_pid = self.learner_status["pid"]
        log.info("learner at %s (%g GPU)", self.learner_address, gpus)
        policy_server_address = None
        if self.settings.policy_server:
            server_class = ray.remote(PolicyServerWorker).options(num_cpus=1, num_gpus=server_gpus, max_restarts=1)
            self.policy_server = server_class.remote(data, str(Path(self.settings.policy_server).resolve()),
                                                     on_cluster)
            policy_server_address = ray.get(self.policy_server.address.remote(), timeout=START_TIMEOUT_S)
        actor_class = ray.remote(SimActorWorker).options(
            num_cpus=self.settings.actor_cpus, num_gpus=0, max_restarts=self.settings.max_actor_restarts,
            max_task_retries=0, max_concurrency=4)
        for index in range(self.settings.num_actors):
            handle = actor_class.remote(data, index, self.learner_address, policy_server_address)
            self.actors.append(ActorSlot(index, handle))
        for slot in self.actors:
            slot.run = slot.handle.run.remote(total_steps)

    # -- supervise ----------------------------------------------------------------------------
    def poll(self) -> dict[str, Any]:
        """Check every worker once: resubmit the acting loop of an actor Ray restarted, follow a
        restarted learner; returns :meth:`snapshot`."""
        import ray

        self._poll_learner()
        for slot in self.actors:
            if slot.state == "running" and ray.wait([slot.run], timeout=0)[0]:
                self._run_ended(slot)
        asked = {slot.index: slot.handle.progress.remote() for slot in self.actors if slot.alive}
        for index, ref in asked.items():
            slot = self.actors[index]
            try:
                report = ray.get(ref, timeout=STATUS_TIMEOUT_S)
            except ray.exceptions.ActorDiedError as error:
                self._gone(slot, str(error).splitlines()[0])
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue  # dead and being restarted, or busy: the next poll asks again
            if slot.state == "restarting" and report["pid"] != slot.pid:  # its new process is up
                slot.state, slot.pid = "running", report["pid"]
                slot.handle.retarget.remote(self.learner_address)
                slot.run = slot.handle.run.remote(self._total_steps)
                log.warning("actor %d is back (restart %d): it resumes its episode numbering from the learner",
                            slot.index, slot.restarts)
            elif slot.state == "running":
                slot.pid = report["pid"]
                slot.last = report
        return self.snapshot()

    def _run_ended(self, slot: ActorSlot) -> None:
        import ray

        try:
            slot.last = ray.get(slot.run)
            slot.state = "done"  # asked to stop, or done with its steps
            return
        except ray.exceptions.RayActorError as error:  # its process died
            reason = str(error).splitlines()[0]
        except ray.exceptions.RayTaskError as error:  # its acting loop raised: a restart would repeat it
            log.error("actor %d failed: %s", slot.index, error)
            slot.state = "dead"
            return
        slot.restarts += 1
        slot.earlier_steps += int(slot.last.get("env_steps", 0))
        slot.last = {}
        if slot.restarts > self.settings.max_actor_restarts:
            self._gone(slot, reason)
            return
        slot.state = "restarting"
        log.warning("actor %d died (%s); Ray restarts it (restart %d of %d)", slot.index, reason, slot.restarts,
                    self.settings.max_actor_restarts)

    def _gone(self, slot: ActorSlot, reason: str) -> None:
        log.error("actor %d died and is not restarted any more (%d restarts): %s", slot.index,
                  self.settings.max_actor_restarts, reason)
        slot.state = "dead"

    def _poll_learner(self) -> None:
        import ray

        try:
            status = ray.get(self.learner.status.remote(), timeout=STATUS_TIMEOUT_S)
        except ray.exceptions.ActorDiedError as error:
            raise RuntimeError(f"the learner died and is not restarted any more: {error}") from None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                ray.exceptions.ActorUnavailableError):
            return  # being restarted: the actors keep acting and hold their transitions
        if status["pid"] != self._learner_pid:
            self.learner_restarts += 1
            self._learner_pid = status["pid"]
            log.warning("the learner was restarted; resumed from its checkpoint at %d updates",
                        status["resumed_updates"])
            if status["address"] != self.learner_address:
                self.learner_address = status["address"]
                for slot in self.actors:
                    if slot.alive:
                        slot.handle.retarget.remote(self.learner_address)
        if status["error"]:
            raise RuntimeError(f"the learner failed: {status['error']}")
        self.learner_status = status

    def snapshot(self) -> dict[str, Any]:
        """The session in numbers: what the progress line shows and the summary keeps."""
        status = self.learner_status
        lead = self.actors[0].last if self.actors else {}
        successes = [slot.last["success_rate"] for slot in self.actors if slot.last.get("recent_successes")]
        return {
            "transitions": int(status.get("transitions", 0)),
            "updates": int(status.get("updates", 0)),
            "env_steps": sum(slot.env_steps for slot in self.actors),
            "episodes": sum(int(slot.last.get("episodes", 0)) for slot in self.actors),
            "actors_alive": sum(slot.alive for slot in self.actors),
            "actors_total": len(self.actors),
            "actor_restarts": sum(slot.restarts for slot in self.actors),
            "learner_restarts": self.learner_restarts,
            "success_rate": float(np.mean(successes)) if successes else None,
            "eval_success_rate": lead.get("eval_success_rate"),
            "steps_per_s": sum(float(slot.last.get("steps_per_s", 0.0)) for slot in self.actors if slot.alive),
            "missing": sum(a["missing"] for a in status.get("actors", {}).values()),
        }

    def run(self, total_steps: int, on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Start, supervise until the learner holds ``total_steps`` transitions (or every actor
        has ended), stop; returns the summary."""
        self.start(total_steps)
        try:
            while True:
                snapshot = self.poll()
                if on_progress is not None:
                    on_progress(snapshot)
                if snapshot["transitions"] >= total_steps or not any(slot.alive for slot in self.actors):
                    break
                time.sleep(POLL_INTERVAL_S)
        finally:
            summary = self.stop()
        return summary

    # -- faults (tests, chaos drills) ---------------------------------------------------------
    def kill_actor(self, index: int) -> None:
        """Kill actor ``index``'s process as a crash would; Ray restarts it."""
        import ray

        ray.kill(self.actors[index].handle, no_restart=False)

    def kill_learner(self) -> None:
        """Kill the learner's process as a crash would; Ray restarts it from its last checkpoint."""
        import ray

        ray.kill(self.learner, no_restart=False)

    def checkpoint_learner(self, timeout_s: float = 60.0) -> int:
        """Have the learner write a checkpoint now; returns its update count."""
        import ray

        return ray.get(self.learner.checkpoint.remote(timeout_s), timeout=timeout_s + STATUS_TIMEOUT_S)

    # -- stop ---------------------------------------------------------------------------------
    def stop(self) -> dict[str, Any]:
        """Stop the actors (each ends its episode; actor 0 evaluates), then the learner (final
        checkpoint); write the summary and the best evaluated policy; shut a local Ray down."""
        import ray

        summary: dict[str, Any] = {}
        try:
            for slot in self.actors:
                if slot.alive:
                    slot.handle.stop.remote()
            deadline = time.monotonic() + ACTOR_STOP_TIMEOUT_S
            for slot in self.actors:
                if slot.state != "running":
                    continue
                try:
                    slot.last = ray.get(slot.run, timeout=max(1.0, deadline - time.monotonic()))
                    slot.state = "done"
                except Exception as error:  # noqa: BLE001 - what it had not shipped dies with it, as in a crash
                    log.warning("actor %d did not stop cleanly: %s", slot.index, str(error).splitlines()[0])
            lead = self._lead_report()
            if self.learner is not None:
                try:
                    self.learner_status = ray.get(self.learner.stop.remote(), timeout=LEARNER_STOP_TIMEOUT_S)
                except Exception as error:  # noqa: BLE001
                    log.error("the learner did not stop cleanly: %s", str(error).splitlines()[0])
            if self.policy_server is not None:
                try:
                    ray.get(self.policy_server.stop.remote(), timeout=30)
                except Exception:  # noqa: BLE001
                    pass
            for slot in self.actors:
                try:
                    ray.get(slot.handle.close.remote(), timeout=30)
                except Exception:  # noqa: BLE001
                    pass
            summary = self._summary(lead)
        finally:
            for handle in [slot.handle for slot in self.actors] + [self.learner, self.policy_server]:
                if handle is not None:
                    try:
                        ray.kill(handle, no_restart=True)
                    except Exception:  # noqa: BLE001
                        pass
            if self._started_ray:
                ray.shutdown()
        return summary

    def _lead_report(self) -> dict[str, Any]:
        """Actor 0's final report: the session's evaluations, episode history and best policy."""
        import ray

        if not self.actors or self.actors[0].state == "dead":
            return {}
        try:
            return ray.get(self.actors[0].handle.progress.remote(final=True), timeout=STATUS_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the summary then lacks actor 0's evaluations
            return {}

    def _summary(self, lead: dict[str, Any]) -> dict[str, Any]:
        from learner.learner import write_best_policy

        weights, best_eval = lead.get("best_policy_weights"), lead.get("best_eval")
        best_dir = None
        if weights is not None and best_eval is not None:
            best_dir = str(write_best_policy(self.run_dir, weights, best_eval))
        snapshot = self.snapshot()
        summary = {
            "config": self.config.name,
            "ray": to_dict(self.settings),
            "env_steps": snapshot["env_steps"],
            "transitions": snapshot["transitions"],
            "updates": snapshot["updates"],
            "episodes": snapshot["episodes"],
            "final_eval_success_rate": lead.get("eval_success_rate"),
            "eval_history": lead.get("eval_history", []),
            "best_eval": best_eval,
            "best_policy": best_dir,
            "episode_history_actor_0": lead.get("episode_history", []),
            "learner_restarts": self.learner_restarts,
            "actors": [{"index": slot.index, "state": slot.state, "restarts": slot.restarts, "env_steps": slot.env_steps,
                        **self.learner_status.get("actors", {}).get(f"ray-actor-{slot.index}", {})}
                       for slot in self.actors],
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def _check_ray_config(config: SessionConfig) -> None:
    """What a Ray session cannot do, said before anything starts."""
    if config.actor.teleop:
        from hardware_configs.teleop import load_teleop_config

        device = load_teleop_config(config.actor.teleop).device
        if device != "simulated_operator":
            raise ConfigError(f"actor.teleop: a {device} needs the operator's terminal or USB port; Ray's simulated "
                              "actors take the simulated_operator only (run a real device's actor with steerl actor)")
    if config.robot.backend != "pybullet":
        raise ConfigError(f"robot.backend: Ray runs simulated actors only, got {config.robot.backend!r} (a real "
                          "robot's actor joins a Ray-run learner with steerl actor)")
    if config.ray.address:  # workers on other machines: every socket a worker binds must be CURVE-protected
        needed = {"learner.curve": config.learner.curve, "actor.learner_curve": config.actor.learner_curve}
        if config.ray.policy_server:
            needed.update({"learner.policy_server.curve": config.learner.policy_server.curve,
                           "actor.policy_server.curve": config.actor.policy_server.curve})
        missing = [name for name, keys in needed.items() if keys is None]
        if missing:
            raise ConfigError(f"ray.address {config.ray.address!r}: on a cluster the learner binds its node's address, "
                              f"beyond loopback: set {', '.join(missing)} (steerl keys generate; the key files must "
                              "exist at the same paths on every node)")
    if config.ray.policy_server and not Path(config.ray.policy_server).is_dir():
        raise ConfigError(f"ray.policy_server: {config.ray.policy_server}: no such policy directory")


def session_line(snapshot: dict[str, Any], updates_per_s: float) -> str:
    """One line for the operator: actors, restarts, success, evaluation, learner progress."""
    success = "-" if snapshot["success_rate"] is None else f"{snapshot['success_rate']:.0%}"
    evaluation = "-" if snapshot["eval_success_rate"] is None else f"{snapshot['eval_success_rate']:.0%}"
    line = (f"actors {snapshot['actors_alive']}/{snapshot['actors_total']}  "
            f"episodes {snapshot['episodes']}  success {success}  eval {evaluation}  "
            f"updates {snapshot['updates']} ({updates_per_s:.0f}/s)  {snapshot['steps_per_s']:.0f} steps/s")
    restarts = snapshot["actor_restarts"] + snapshot["learner_restarts"]
    if restarts:
        line += f"  restarts: actors {snapshot['actor_restarts']}, learner {snapshot['learner_restarts']}"
    if snapshot["missing"]:
        line += f"  [MISSING STEPS {snapshot['missing']}]"
    return line


def run_ray_training(config: SessionConfig, run_dir: str | Path, total_steps: int, demos: str | None = None,
                     resume: bool = False) -> int:
    """``steerl train --ray``: the session on Ray with a live progress line; writes summary.json."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    settings = config.ray
    where = settings.address or "a local Ray instance"
    console.print(f"[bold]steerl train --ray[/] {config.name}: {settings.num_actors} simulated actors "
                  f"({settings.actor_env}) + learner on {where}, {total_steps} env steps, run dir {run_dir}"
                  f"{', policy server ' + settings.policy_server if settings.policy_server else ''}")
    session = RaySession(config, run_dir, demos, resume)
    columns = [TextColumn("[bold blue]transitions"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[line]}"), TimeElapsedColumn()]
    rate = {"updates": 0, "time": time.monotonic(), "per_s": 0.0}
    started = time.monotonic()
    with Progress(*columns, console=console, refresh_per_second=2) as progress:
        task = progress.add_task("train", total=total_steps, line="starting workers")

        def show(snapshot: dict[str, Any]) -> None:
            now = time.monotonic()
            if now - rate["time"] > 2.0:
                rate["per_s"] = (snapshot["updates"] - rate["updates"]) / (now - rate["time"])
                rate["updates"], rate["time"] = snapshot["updates"], now
            progress.update(task, completed=min(snapshot["transitions"], total_steps),
                            line=session_line(snapshot, rate["per_s"]))

        summary = session.run(total_steps, on_progress=show)
    console.print(f"learner listened at {session.learner_address}")
    final = summary.get("final_eval_success_rate")
    console.print(f"[bold]done[/] in {time.monotonic() - started:.0f} s: {summary.get('transitions', 0)} "
                  f"transitions from {settings.num_actors} actors, {summary.get('updates', 0)} updates, final "
                  f"evaluation {'-' if final is None else f'{final:.0%}'}; summary in {Path(run_dir) / 'summary.json'}")
    return 0
