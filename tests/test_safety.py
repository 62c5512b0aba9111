"""The safety layer and the robot cell, on the exact kinematic arm: what reaches the arm is safe."""

from __future__ import annotations

import numpy as np
import pytest

from robot_server.cell import EpisodeNotStarted, RobotCell
from robot_server.safety import UnsafeAction

from conftest import configure


def _cell(**changes) -> RobotCell:
    return RobotCell(configure(backend="kinematic", **changes))


def _tcp(observation) -> np.ndarray:
    return observation["tcp_pose"][:3].astype(np.float64)


def test_action_moves_tcp_by_scaled_delta() -> None:
    cell = _cell()
    start = _tcp(cell.reset(seed=0)[0])
    result = cell.step(np.array([0.5, -0.5, 0.25, -1.0], np.float32))
    np.testing.assert_allclose(_tcp(result.observation) - start, [0.015, -0.015, 0.0075], atol=1e-6)
    assert result.info["safety/clipped_step"] == 0.0 and result.info["safety/clipped_box"] == 0.0


def test_per_step_limit_clips_large_scale() -> None:
    cell = _cell(action__xyz_scale_m=0.10, safety__max_step_xyz_m=0.02)
    start = _tcp(cell.reset(seed=0)[0])
    result = cell.step(np.array([1.0, 0.0, -1.0, 0.0], np.float32))
    np.testing.assert_allclose(_tcp(result.observation) - start, [0.02, 0.0, -0.02], atol=1e-6)
    assert result.info["safety/clipped_step"] == 1.0


def test_target_never_leaves_the_workspace_box() -> None:
    cell = _cell()
    cell.reset(seed=0)
    low = np.array(cell.config.robot.safety.workspace_low)
    high = np.array(cell.config.robot.safety.workspace_high)
    rng = np.random.default_rng(0)
    clipped = 0
    for _ in range(300):
        result = cell.step(rng.uniform(-3, 3, size=4).astype(np.float32))
        xyz = _tcp(result.observation)
        assert np.all(xyz >= low - 1e-6) and np.all(xyz <= high + 1e-6)
        clipped += result.info["safety/clipped_box"]
        if result.truncated:
            cell.reset()
    assert clipped > 0, "the random walk should have hit the box"


def test_out_of_range_action_is_clipped_and_reported() -> None:
    cell = _cell()
    start = _tcp(cell.reset(seed=0)[0])
    result = cell.step(np.array([5.0, 0.0, 0.0, 0.0], np.float32))
    assert result.info["safety/clipped_action"] == 1.0
    np.testing.assert_allclose(_tcp(result.observation) - start, [0.03, 0, 0], atol=1e-6)


@pytest.mark.parametrize("action, message", [
    (np.array([np.nan, 0, 0, 0], np.float32), r"non-finite values at index \[0\]"),
    (np.array([0, 0, np.inf, -np.inf], np.float32), r"non-finite values at index \[2, 3\]"),
    (np.zeros(5, np.float32), r"expected shape \(4,\)"),
    (np.zeros((1, 4), np.float32), r"expected shape \(4,\)"),
    (np.zeros(4, np.int64), "dtype int64 is not a float type"),
])
def test_bad_action_is_refused_and_arm_does_not_move(action: np.ndarray, message: str) -> None:
    cell = _cell()
    start = _tcp(cell.reset(seed=0)[0])
    with pytest.raises(UnsafeAction, match=message):
        cell.step(action)
    np.testing.assert_array_equal(_tcp(cell.observe()[0]), start)
    assert cell.counters.refused_actions == 1


def test_yaw_is_limited_per_step_and_in_range() -> None:
    cell = _cell(action__use_yaw=True, action__yaw_scale_rad=0.5, safety__max_step_yaw_rad=0.1,
                 safety__yaw_limits_rad=(-0.25, 0.25))
    cell.reset(seed=0)
    yaws = [cell.backend.read_state().tcp_yaw]
    for _ in range(5):
        result = cell.step(np.array([0, 0, 0, 1.0, 0], np.float32))
        yaws.append(cell.backend.read_state().tcp_yaw)
    assert np.allclose(np.diff(yaws)[:2], 0.1)
    assert yaws[-1] == pytest.approx(0.25)
    assert result.info["safety/clipped_box"] == 1.0


def test_gripper_command_is_absolute() -> None:
    cell = _cell()
    cell.reset(seed=0)
    closed = cell.step(np.array([0, 0, 0, 1.0], np.float32)).observation["gripper_width"][0]
    half = cell.step(np.array([0, 0, 0, 0.0], np.float32)).observation["gripper_width"][0]
    assert closed == pytest.approx(0.0) and half == pytest.approx(0.04)


def test_binary_gripper_is_fully_closed_for_any_positive_command() -> None:
    cell = _cell(action__gripper="binary")
    cell.reset(seed=0)
    widths = [cell.step(np.array([0, 0, 0, g], np.float32)).observation["gripper_width"][0]
              for g in (0.2, 0.0, 0.9, -0.3)]
    np.testing.assert_allclose(widths, [0.0, 0.08, 0.0, 0.08], atol=1e-6)


def test_step_outside_an_episode_is_refused() -> None:
    cell = _cell(task__max_episode_steps=2)
    with pytest.raises(EpisodeNotStarted):
        cell.step(np.zeros(4, np.float32))
    cell.reset(seed=0)
    assert not cell.step(np.zeros(4, np.float32)).truncated
    assert cell.step(np.zeros(4, np.float32)).truncated
    with pytest.raises(EpisodeNotStarted):
        cell.step(np.zeros(4, np.float32))


def test_watchdog_holds_and_reports_after_silence() -> None:
    now = [100.0]
    config = configure(backend="kinematic", safety__watchdog_ms=200)
    cell = RobotCell(config, clock=lambda: now[0])
    cell.reset(seed=0)
    cell.step(np.zeros(4, np.float32))
    now[0] += 0.1
    assert cell.check_watchdog() == pytest.approx(0.1)
    assert cell.step(np.zeros(4, np.float32)).info["watchdog_tripped"] == 0.0
    now[0] += 0.5
    assert cell.check_watchdog() is None
    assert cell.counters.watchdog_trips == 1
    result = cell.step(np.zeros(4, np.float32))
    assert result.info["watchdog_tripped"] == 1.0 and result.info["watchdog_trips"] == 1.0
    assert cell.step(np.zeros(4, np.float32)).info["watchdog_tripped"] == 0.0
