"""Shared fixtures: configs for the kinematic and PyBullet cells, and a robot server on loopback."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from contextlib import contextmanager
from typing import Iterator

import pytest

from hardware_configs.schema import CameraConfig, SessionConfig, load_config
from robot_server.backends import RobotBackend
from robot_server.cell import RobotCell
from robot_server.server import RobotServer


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_tcp_address() -> str:
    return f"tcp://127.0.0.1:{free_tcp_port()}"


def configure(base: str = "sim_panda_reach", *, backend: str | None = None, cameras=None,
              address: str | None = None, **robot_changes) -> SessionConfig:
    """A bundled config with a fresh loopback address and the given robot changes.

    ``robot_changes`` may name nested sections with double underscores: ``safety__watchdog_ms=100``.
    """
    config = load_config(base)
    robot = config.robot
    if backend is not None:
        robot = dataclasses.replace(robot, backend=backend)
    if cameras is not None:
        robot = dataclasses.replace(robot, cameras=tuple(CameraConfig(n, w, h) for n, w, h in cameras))
    for key, value in robot_changes.items():
        if "__" in key:
            section, field = key.split("__")
            robot = dataclasses.replace(robot, **{section: dataclasses.replace(getattr(robot, section), **{field: value})})
        else:
            robot = dataclasses.replace(robot, **{key: value})
    address = address or free_tcp_address()
    return dataclasses.replace(
        config, robot=robot,
        server=dataclasses.replace(config.server, address=address),
        env=dataclasses.replace(config.env, address=address, timeout_ms=3000),
    )


@contextmanager
def running_server(config: SessionConfig, backend: RobotBackend | None = None) -> Iterator[RobotServer]:
    """A RobotServer serving ``config`` (on ``backend`` when given) on a background thread, stopped on exit."""
    server = RobotServer(config, cell=RobotCell(config, backend=backend) if backend is not None else None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=10)
        assert not thread.is_alive(), "robot server did not stop"


@pytest.fixture
def kinematic_config() -> SessionConfig:
    return configure(backend="kinematic")


@pytest.fixture
def key_pipe():
    """An os.pipe() standing in for a terminal: a keyboard device reads the first fd, the test
    writes key bytes into the second."""
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass


def chromium_or_skip() -> str:
    """The path of Debian's Chromium for the browser tests; skips without it, unless
    ``STEERL_REQUIRE_BROWSER`` is set (CI), where its absence is an error."""
    import shutil
    from pathlib import Path

    path = shutil.which("chromium") or "/usr/bin/chromium"
    if Path(path).exists():
        return path
    if os.environ.get("STEERL_REQUIRE_BROWSER"):
        raise RuntimeError(f"STEERL_REQUIRE_BROWSER is set but there is no Chromium at {path} (apt-get install chromium)")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

