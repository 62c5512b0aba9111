"""The operator console end to end: headless Chromium (Debian's, driven by Playwright) on the page
of a real ``steerl train --dashboard`` session in the PyBullet cell.

Chromium comes from Debian's package (``.ci/run`` installs it); without it these tests are skipped
locally, and fail where ``STEERL_REQUIRE_BROWSER=1`` (CI) says a browser must be there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import chromium_or_skip, configure, free_tcp_address, free_tcp_port
from hardware_configs.schema import SessionConfig, save_config
from learner.learner import latest_checkpoint
from learner.replay import ReplayBuffer
from transport import steerl_pb2 as pb

CHROMIUM = chromium_or_skip()

sync_api = pytest.importorskip("playwright.sync_api")

# The flags a root process in this sandbox needs, and no background traffic to Google.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def press_until(page, selector: str, condition: str, attempts: int = 5, timeout_ms: int = 5_000) -> None:
    """Click ``selector`` until the page's ``condition`` holds. A mark that reaches the actor between
    episodes or before an episode's first step is ignored by design (actor/operator.py), and on an
    unpaced sim with short episodes a press can land there."""
    for _ in range(attempts):
        page.click(selector)
        try:
            page.wait_for_function(condition, timeout=timeout_ms)
            return
        except sync_api.TimeoutError:
            continue
    raise AssertionError(f"{attempts} presses of {selector} never brought about {condition}")


def console_config() -> SessionConfig:
    """The pick-cube cell with two 64x64 cameras at 10 Hz in real time; the learner learns from the
    state only (and hardly at all: the test is about the console)."""
    config = configure("sim_panda_pick_cube_images", control__mode="realtime")
    learner = dataclasses.replace(
        config.learner, address=free_tcp_address(), observation_keys=("tcp_pose", "tcp_velocity", "gripper_width"),
        learning_starts=10**6, checkpoint_every_updates=10**6, num_threads=1,
        sac=dataclasses.replace(config.learner.sac, hidden_dims=(32, 32), image_encoder=None))
    actor = dataclasses.replace(config.actor, random_steps=10**6, eval_every_episodes=0, eval_episodes=0,
                                max_steps_per_update=0.0)
    dashboard = dataclasses.replace(config.dashboard, port=free_tcp_port(), telemetry_address=free_tcp_address(),
                                    command_address=free_tcp_address())
    return dataclasses.replace(config, learner=learner, actor=actor, dashboard=dashboard)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for(condition, what: str, timeout_s: float = 60.0, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def robot_status(config: SessionConfig) -> tuple[dict[str, float], np.ndarray]:
    """The robot server's status and TCP pose, read by an observer of our own (no motion)."""
    from actor.env import ZmqRobotLink

    link = ZmqRobotLink(config, client_name="test-observer", role=pb.ROLE_OBSERVER)
    try:
        observation, info = link.observe()
    finally:
        link.close()
    return info, observation["tcp_pose"]


@pytest.fixture
def session(tmp_path):
    """A running ``steerl train --dashboard`` and the URL of its page."""
    config = console_config()
    config_file = save_config(config, tmp_path / "console.yaml")
    run_dir = tmp_path / "runs" / "console"
    log = open(tmp_path / "session.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "tools.cli", "train", "--config", str(config_file),
                                "--steps", "100000", "--run-dir", str(run_dir), "--dashboard"],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{config.dashboard.port}/"

    def live():
        if process.poll() is not None:
            raise AssertionError(f"the session exited: {(tmp_path / 'session.log').read_text()[-3000:]}")
        try:
            return get_json(url + "api/state")["live"]
        except (urllib.error.URLError, ConnectionError):
            return False

    try:
        wait_for(live, "the session's telemetry on the dashboard", timeout_s=120)
        yield config, url, process, run_dir
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def test_the_page_shows_the_cameras_stops_the_arm_and_labels_a_success(session, browser, tmp_path) -> None:
    config, url, process, run_dir = session
    page = browser.new_page()
    page.goto(url)

    # The camera views update: both cameras appear and their frames keep coming.
    page.wait_for_function("document.querySelector('#camera-front') && document.querySelector('#camera-wrist')",
                           timeout=30_000)
    first = int(page.get_attribute("#camera-front", "data-sequence"))
    page.wait_for_function(f"Number(document.querySelector('#camera-front').dataset.sequence) > {first + 5}",
                           timeout=30_000)
    assert page.evaluate("document.querySelector('#camera-front').naturalWidth") == 64
    assert page.evaluate("window.steerlStats.frames") > 5
    page.wait_for_function("document.querySelector('#connection').textContent === 'actor live'")

    # Emergency stop: the robot server holds the arm and refuses motion; nothing moves.
    page.click("#estop")
    page.wait_for_function("document.querySelector('#operator-state').textContent === 'E-STOPPED'", timeout=10_000)
    info, pose_before = robot_status(config)
    assert info["emergency_stopped"] == 1.0
    time.sleep(1.0)
    info, pose_after = robot_status(config)
    assert info["emergency_stopped"] == 1.0
    np.testing.assert_allclose(pose_after, pose_before, atol=1e-6)
    page.wait_for_function("document.querySelector('#robot-estop').textContent.startsWith('STOPPED')",
                           timeout=10_000)
    steps_stopped = page.evaluate("window.steerlStats.lastState.actor.env_steps")
    time.sleep(1.0)
    assert page.evaluate("window.steerlStats.lastState.actor.env_steps") == steps_stopped

    # Resume releases the robot; the arm moves again.
    page.click("button[data-event=RESUME]")
    page.wait_for_function("document.querySelector('#operator-state').textContent === 'RUNNING'", timeout=10_000)
    wait_for(lambda: robot_status(config)[0]["emergency_stopped"] == 0.0, "the robot server's release")
    page.wait_for_function(f"window.steerlStats.lastState.actor.env_steps > {steps_stopped + 3}", timeout=10_000)

    # Success ends the episode under way with the success flag.
    page.wait_for_function("window.steerlStats.lastState.actor.episode_step >= 3", timeout=20_000)
    press_until(page, "button[data-event=MARK_SUCCESS]",
                "window.steerlStats.lastState.episodes.some(e => e.ended_by === 'success' && e.success)")
    marked = page.evaluate("window.steerlStats.lastState.episodes.find(e => e.ended_by === 'success')")
    assert marked["length"] >= 1  # a mark applies only once the episode has a step
    page.screenshot(path=str(tmp_path / "console.png"), full_page=True)

    # Stop ends the session cleanly; the learner's final checkpoint holds the marked step: reward 1, terminal.
    page.click("#stop-session")
    assert process.wait(timeout=90) == 0
    table = ReplayBuffer.load(latest_checkpoint(run_dir) / "online").transition_table()
    terminal_successes = (table["terminated"] & (table["rewards"] == 1.0)).sum()
    assert terminal_successes >= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert any(entry["success"] == 1.0 for entry in summary["episode_history"])


def test_a_page_without_the_token_is_refused_and_commands_nothing(tmp_path, browser) -> None:
    """A console bound beyond loopback: the page loads, but without the token its buttons are refused
    (401) and the robot is not stopped; with the token the same press goes through."""
    config = console_config()
    config_file = save_config(config, tmp_path / "console.yaml")
    port = config.dashboard.port
    refused = subprocess.run([sys.executable, "-m", "tools.cli", "dashboard", "--config", str(config_file),
                              "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "STEERL_DASHBOARD_TOKEN": ""})
    assert refused.returncode == 2 and "dashboard.host" in refused.stderr and "token" in refused.stderr

    server = subprocess.Popen([sys.executable, "-m", "tools.cli", "dashboard", "--config", str(config_file),
                               "--host", "0.0.0.0", "--token", "s3cret", "--runs-dir", str(tmp_path / "runs")])
    try:
        wait_for(lambda: _status(f"http://127.0.0.1:{port}/api/state") == 401, "the dashboard")
        assert _status(f"http://127.0.0.1:{port}/api/state?token=s3cret") == 200
        page = browser.new_page()
        page.on("dialog", lambda dialog: dialog.dismiss())  # the page asks for the token; nobody answers
        page.goto(f"http://127.0.0.1:{port}/")
        page.click("#estop")
        page.wait_for_function("document.querySelector('#message').textContent.includes('refused')", timeout=10_000)
        assert "token" in page.text_content("#message")

        page.goto(f"http://127.0.0.1:{port}/?token=s3cret")
        page.click("#estop")  # no actor and no robot server: refused for that reason, not for the token
        page.wait_for_function("document.querySelector('#message').textContent.includes('no actor')", timeout=20_000)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError):
        return None


def test_the_page_starts_and_stops_a_session_and_evaluates_its_checkpoint(tmp_path, browser) -> None:
    """``steerl dashboard`` alone: the page starts a session on the dashboard's config, shows it live,
    stops it, lists the checkpoint it wrote and evaluates it."""
    config = console_config()
    config = dataclasses.replace(config, robot=dataclasses.replace(
        config.robot, control=dataclasses.replace(config.robot.control, mode="sync"),
        task=dataclasses.replace(config.robot.task, max_episode_steps=20)))
    config_file = save_config(config, tmp_path / "console.yaml")
    runs = tmp_path / "runs"
    server = subprocess.Popen([sys.executable, "-m", "tools.cli", "dashboard", "--config", str(config_file),
                               "--runs-dir", str(runs)])
    url = f"http://127.0.0.1:{config.dashboard.port}/"
    try:
        wait_for(lambda: _status(url + "api/state") == 200, "the dashboard")
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.querySelector('#config-select').options.length > 1")
        assert page.input_value("#config-select") == str(config_file)  # its own config comes first
        page.fill("#steps-input", "100000")
        page.click("#start-session")
        page.wait_for_function("document.querySelector('#connection').textContent === 'actor live'", timeout=120_000)
        page.wait_for_function("window.steerlStats.lastState.actor.env_steps > 50", timeout=60_000)
        assert page.evaluate("window.steerlStats.lastState.session.running")

        # Any button works on a session the page started.
        press_until(page, "button[data-event=MARK_FAILURE]",
                    "window.steerlStats.lastState.episodes.some(e => e.ended_by === 'failure')")
        page.click("#stop-session")
        page.wait_for_function("window.steerlStats.lastState.session && !window.steerlStats.lastState.session.running",
                               timeout=120_000)
        assert page.evaluate("window.steerlStats.lastState.session.exit_code") == 0

        page.click("#refresh-checkpoints")
        page.wait_for_selector("#checkpoints tbody tr", timeout=10_000)
        assert page.text_content("#checkpoints tbody tr td") == "console"  # the run directory's name
        page.fill("#eval-episodes", "2")
        page.click("#checkpoints tbody tr button")
        page.wait_for_function("document.querySelector('#evaluations').textContent.includes('over 2 episodes')",
                               timeout=120_000)
        evaluation = page.evaluate("window.steerlStats.lastState.evaluations[0]")
        assert evaluation["result"]["episodes"] == 2 and 0.0 <= evaluation["result"]["success_rate"] <= 1.0
    finally:
        server.terminate()
        server.wait(timeout=60)
