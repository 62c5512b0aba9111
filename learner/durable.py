"""Crash-safe files and directories: what survives a power cut is either the old copy or the new one.

``write_directory_atomically(final, write)`` lets ``write`` fill the sibling ``final.tmp`` (every
file fsynced by the writer, e.g. with :func:`write_durably`), fsyncs it, moves a previous
``final`` to ``final.old``, renames ``final.tmp`` to ``final``, fsyncs the parent directory and
only then removes ``final.old``. A crash at any point leaves ``final`` or ``final.old`` complete;
a leftover ``final.tmp`` is never read and is cleared by the next write.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def sibling_paths(final: Path) -> tuple[Path, Path]:
    """``(final.tmp, final.old)``."""
    return final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_directory(directory: Path) -> None:
    """fsync a directory (its entries), where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_directory_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Fill ``final.tmp`` with ``write(tmp)`` and swap it into place (see the module docstring)."""
    tmp, old = sibling_paths(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    fsync_directory(tmp)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)  # stale: ``final`` is complete
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_directory(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return final
