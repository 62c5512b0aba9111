"""What every benchmark records about the machine it ran on (benchmarks import it as ``machine``)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU, cores, memory, versions, date and load at start; ``extra`` adds benchmark-specific keys."""
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gb = None
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": memory_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    info.update(extra)
    return info


def time_calls(call: Callable[[], Any], repeats: int, warmup: int = 3) -> np.ndarray:
    """Seconds of each of ``repeats`` calls of ``call`` (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        call()
    seconds = np.empty(repeats)
    for index in range(repeats):
        started = time.perf_counter()
        call()
        seconds[index] = time.perf_counter() - started
    return seconds


def latency_ms(select: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    """Median, 90th percentile and minimum of :func:`time_calls`, in milliseconds. A call that
    returns its result on the CPU has finished its device work when the clock stops."""
    times_ms = 1e3 * time_calls(select, repeats, warmup)
    return {"p50_ms": float(np.median(times_ms)), "p90_ms": float(np.percentile(times_ms, 90)),
            "min_ms": float(times_ms.min()), "repeats": repeats}


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    """Write a benchmark's results to ``path`` (the ``--json`` option), if one was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")


def print_targets(targets: dict[str, bool]) -> None:
    """One ``PASS``/``FAIL`` line per target."""
    for name, met in targets.items():
        print(f"{'PASS' if met else 'FAIL'}  {name}")
