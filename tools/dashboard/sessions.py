"""Sessions, checkpoints and evaluations the page starts: ``steerl`` child processes.

:class:`SessionManager` starts ``steerl train --console`` on a config chosen in the page (one
session at a time: one robot; the config's ``dashboard`` section is replaced by the dashboard's own,
so that the session's telemetry reaches this page; the config used is kept in the run directory), stops it through the console's stop command (the actor ends its
episode, the learner writes its final checkpoint; SIGTERM only if it does not end in time), lists
the checkpoints under the runs directory and evaluates one with ``steerl eval``. An evaluation
needs the robot, so it is refused while a session acts on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dataclasses

from hardware_configs.loader import ConfigError
from hardware_configs.schema import CONFIG_DIR, DashboardConfig, load_config, resolve_config_path, save_config

# How long a stop request waits for the session to end by itself before SIGTERM.
STOP_GRACE_S = 120.0
# The end of a child's log the page shows.
LOG_TAIL_BYTES = 2000


class SessionRefused(RuntimeError):
    """A start, stop or evaluation refused: bad input (``status`` 400, the message names the field)
    or not possible now (409, the message says why)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One ``steerl`` child the page started."""

    kind: str  # "train" or "eval"
    command: list[str]
    log_path: Path
    process: subprocess.Popen
    started_unix_s: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def describe(self) -> dict[str, Any]:
        tail = ""
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(max(0, log_file.seek(0, 2) - LOG_TAIL_BYTES))
                tail = log_file.read().decode(errors="replace")
        except OSError:
            pass
        return {"kind": self.kind, "running": self.running, "exit_code": self.process.poll(),
                "pid": self.process.pid, "started_unix_s": self.started_unix_s, "log_tail": tail,
                "result": self.result, **self.details}


def bundled_configs() -> list[str]:
    """The names of the configs in hardware_configs/."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


class SessionManager:
    """The page's sessions and evaluations (see the module docstring). ``runs_dir``: where sessions
    write and checkpoints are listed; ``actor_live``: whether an actor is acting now (telemetry)."""

    def __init__(self, runs_dir: str | Path, actor_live: Callable[[], bool],
                 request_stop: Callable[[], Any], own_config: str = "",
                 dashboard: DashboardConfig | None = None) -> None:
        self.runs_dir = Path(runs_dir)
        self.dashboard = dashboard or DashboardConfig()
        self.own_config = own_config
        self._actor_live = actor_live
        self._request_stop = request_stop
        self._lock = threading.Lock()
        self.session: Job | None = None
        self.evaluations: list[Job] = []

    def _spawn(self, kind: str, arguments: list[str], log_path: Path, details: dict[str, Any]) -> Job:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "tools.cli", *arguments]
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return Job(kind, command, log_path, process, details=details)

    def configs(self) -> list[str]:
        """What the page offers to start: the dashboard's own config first, then the bundled ones."""
        bundled = bundled_configs()
        if not self.own_config:
            return bundled
        return [self.own_config] + [name for name in bundled if name != self.own_config]

    # -- sessions ---------------------------------------------------------------------------------
    def start(self, config: str, steps: int) -> dict[str, Any]:
        """Start ``steerl train --console`` on ``config`` (a bundled name or a YAML path)."""
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 100_000_000:
            raise SessionRefused(f"steps: an integer in 1..100000000, got {steps!r}")
        try:
            path = resolve_config_path(config)
            session_config = dataclasses.replace(load_config(path), dashboard=self.dashboard)
        except ConfigError as error:
            raise SessionRefused(f"config: {error}") from None
        with self._lock:
            if self.session is not None and self.session.running:
                raise SessionRefused(f"a session is running already (pid {self.session.process.pid}); stop it first", status=409)
            if self._actor_live():
                raise SessionRefused("an actor is acting on the robot (a session this page did not start); "
                                     "stop it first", status=409)
            name = path.stem
            run_dir = self.runs_dir / name
            run_dir.mkdir(parents=True, exist_ok=True)
            config_file = save_config(session_config, run_dir / "dashboard_session.yaml")
            self.session = self._spawn("train", ["train", "--config", str(config_file), "--steps", str(steps),
                                                 "--run-dir", str(run_dir), "--console"],
                                       run_dir / "dashboard_session.log",
                                       {"config": name, "steps": steps, "run_dir": str(run_dir)})
            return self.session.describe()

    def stop(self) -> dict[str, Any]:
        """Ask the session's actor to stop after its episode; SIGTERM a started one that has not ended
        after ``STOP_GRACE_S``."""
        with self._lock:
            session = self.session
        own = session is not None and session.running
        if not own and not self._actor_live():
            raise SessionRefused("no session is running", status=409)
        delivered = True
        try:
            self._request_stop()
        except RuntimeError:
            delivered = False
        if own:
            assert session is not None
            if not delivered:
                session.process.terminate()
            else:
                threading.Thread(target=self._terminate_late, args=(session,), daemon=True).start()
        return {"stopping": True, "via": "console" if delivered else "SIGTERM"}

    @staticmethod
    def _terminate_late(session: Job) -> None:
        try:
            session.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            session.process.terminate()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            session = self.session.describe() if self.session is not None else None
            evaluations = [job.describe() for job in self.evaluations[-20:]]
        return {"session": session, "evaluations": evaluations}

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoints(self) -> list[dict[str, Any]]:
        """Every checkpoint and best policy under the runs directory, newest first."""
        found = []
        if not self.runs_dir.is_dir():
            return found
        for run_dir in sorted(path for path in self.runs_dir.iterdir() if path.is_dir()):
            candidates = sorted((run_dir / "checkpoints").glob("ckpt-*[0-9]"))
            if (run_dir / "best_policy" / "learner.json").exists():
                candidates.append(run_dir / "best_policy")
            for directory in candidates:
                if not (directory / "learner.json").exists():
                    continue
                try:
                    meta = json.loads((directory / "learner.json").read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                found.append({"run": run_dir.name, "name": directory.name, "path": str(directory),
                              "updates": meta.get("updates"), "transitions": meta.get("transitions_received"),
                              "algorithm": meta.get("algorithm", "sac"),
                              "modified_unix_s": directory.stat().st_mtime})
        return sorted(found, key=lambda entry: entry["modified_unix_s"], reverse=True)

    def evaluate(self, config: str, checkpoint: str, episodes: int) -> dict[str, Any]:
        """Start ``steerl eval`` of ``checkpoint`` (one listed by :meth:`checkpoints`)."""
        if not isinstance(episodes, int) or isinstance(episodes, bool) or not 1 <= episodes <= 1000:
            raise SessionRefused(f"episodes: an integer in 1..1000, got {episodes!r}")
        try:
            path = resolve_config_path(config)
        except ConfigError as error:
            raise SessionRefused(f"config: {error}") from None
        listed = {entry["path"] for entry in self.checkpoints()}
        if checkpoint not in listed:
            raise SessionRefused(f"checkpoint: {checkpoint!r} is not one of the checkpoints under {self.runs_dir}")
        with self._lock:
            if (self.session is not None and self.session.running) or self._actor_live():
                raise SessionRefused("a session is acting on the robot; an evaluation needs it: stop the session first", status=409)
            if any(job.running for job in self.evaluations):
                raise SessionRefused("an evaluation is running already", status=409)
            result_path = Path(tempfile.mkdtemp(prefix="steerl-eval-")) / "result.json"
            job = self._spawn("eval", ["eval", "--config", str(path), "--checkpoint", checkpoint, "--episodes",
                                       str(episodes), "--json", str(result_path)],
                              Path(checkpoint).parent.parent / "dashboard_eval.log",
                              {"config": path.stem, "checkpoint": checkpoint, "episodes": episodes,
                               "result_path": str(result_path)})
            self.evaluations.append(job)
            threading.Thread(target=self._collect, args=(job, result_path), daemon=True).start()
            return job.describe()

    @staticmethod
    def _collect(job: Job, result_path: Path) -> None:
        job.process.wait()
        try:
            job.result = json.loads(result_path.read_text())
        except (OSError, json.JSONDecodeError):
            job.result = None

    def close(self) -> None:
        """Stop every child this manager started."""
        with self._lock:
            jobs = ([self.session] if self.session is not None else []) + self.evaluations
        for job in jobs:
            if job.running:
                job.process.terminate()
                try:
                    job.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    job.process.kill()
