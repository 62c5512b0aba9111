"""Behaviour of the PyBullet cell backend, on the real simulator with fixed seeds."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from hardware_configs.schema import CameraConfig, PyBulletConfig, RobotConfig, TaskConfig
from robot_server.backends.base import ArmState, ArmTarget
from robot_server.backends.pybullet_cell import PyBulletCell

PERIOD_S = 0.1
MAX_STEP_M = 0.03

REACH = RobotConfig(task=TaskConfig(name="reach"))
PICK = RobotConfig(task=TaskConfig(name="pick_cube"))


@pytest.fixture
def make_cell() -> Iterator[Callable[[RobotConfig], PyBulletCell]]:
    cells: list[PyBulletCell] = []

    def make(config: RobotConfig) -> PyBulletCell:
        cell = PyBulletCell(config)
        cells.append(cell)
        return cell

    yield make
    for cell in cells:
        cell.close()


def reset(cell: PyBulletCell, seed: int) -> ArmState:
    cell.reset(np.random.default_rng(seed))
    return cell.read_state()


def step(cell: PyBulletCell, xyz, yaw: float = 0.0, gripper: float = 0.0) -> ArmState:
    cell.command(ArmTarget(np.asarray(xyz, dtype=np.float64), yaw, gripper))
    cell.advance(PERIOD_S)
    return cell.read_state()


def move_to(cell: PyBulletCell, goal, yaw: float = 0.0, gripper: float = 0.0) -> ArmState:
    """Walk the TCP to ``goal`` in steps of at most 3 cm, as the safety layer would allow."""
    goal = np.asarray(goal, dtype=np.float64)
    state = cell.read_state()
    for _ in range(30):
        delta = goal - state.tcp_xyz
        distance = float(np.linalg.norm(delta))
        if distance < 0.002:
            break
        target = state.tcp_xyz + delta * min(1.0, MAX_STEP_M / distance)
        state = step(cell, target, yaw, gripper)
    return state


def random_commands(seed: int, n: int) -> list[ArmTarget]:
    rng = np.random.default_rng(seed)
    commands, xyz = [], np.array([0.5, 0.0, 0.25])
    for _ in range(n):
        xyz = np.clip(xyz + rng.uniform(-0.015, 0.015, 3), (0.35, -0.2, 0.05), (0.7, 0.2, 0.4))
        commands.append(ArmTarget(xyz.copy(), float(rng.uniform(-0.3, 0.3)), float(rng.uniform())))
    return commands


# ------------------------------------------------------------------------------- arm motion


def test_reset_puts_tcp_at_reset_pose_with_gripper_open(make_cell) -> None:
    cell = make_cell(REACH)
    state = reset(cell, 0)
    assert np.linalg.norm(state.tcp_xyz - np.asarray(REACH.reset_xyz)) < 0.01
    assert abs(state.tcp_yaw) < 0.02
    assert state.gripper_width_m > 0.07
    assert cell.max_gripper_width_m == pytest.approx(0.08)
    # The tool points down: the TCP frame's z axis is world -z.
    x, y, z, w = state.tcp_quat_xyzw
    tool_z_world_z = 1.0 - 2.0 * (x * x + y * y)
    assert tool_z_world_z == pytest.approx(-1.0, abs=1e-3)
    assert np.linalg.norm(state.tcp_linear_velocity) < 0.05


def test_reset_honours_configured_pose(make_cell) -> None:
    config = dataclasses.replace(REACH, reset_xyz=(0.45, 0.1, 0.3), reset_yaw_rad=0.4)
    state = reset(make_cell(config), 0)
    assert np.linalg.norm(state.tcp_xyz - np.array([0.45, 0.1, 0.3])) < 0.01
    assert state.tcp_yaw == pytest.approx(0.4, abs=0.02)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_3cm_step_is_reached_within_one_period(make_cell, axis: int) -> None:
    cell = make_cell(REACH)
    start = reset(cell, 0).tcp_xyz
    target = start.copy()
    target[axis] += MAX_STEP_M
    moved = step(cell, target).tcp_xyz - start
    assert moved[axis] == pytest.approx(MAX_STEP_M, abs=0.005)
    others = [i for i in range(3) if i != axis]
    assert np.all(np.abs(moved[others]) < 0.005)


def test_yaw_target_is_reached(make_cell) -> None:
    cell = make_cell(REACH)
    start = reset(cell, 0).tcp_xyz
    for _ in range(3):
        state = step(cell, start, yaw=0.3)
    assert state.tcp_yaw == pytest.approx(0.3, abs=0.05)
    assert np.linalg.norm(state.tcp_xyz - start) < 0.005


def test_hold_stops_the_arm(make_cell) -> None:
    cell = make_cell(REACH)
    start = reset(cell, 0).tcp_xyz
    cell.command(ArmTarget(start + np.array([0.03, 0.03, -0.03]), 0.2, 0.0))
    cell.advance(0.05)  # half-way through the motion
    cell.hold()
    held = cell.read_state().tcp_xyz
    cell.advance(0.5)
    assert np.linalg.norm(cell.read_state().tcp_xyz - held) < 0.002


def test_gripper_follows_its_command(make_cell) -> None:
    cell = make_cell(REACH)
    start = reset(cell, 0).tcp_xyz
    for _ in range(5):
        state = step(cell, start, gripper=1.0)
    assert state.gripper_width_m < 0.005
    for _ in range(5):
        state = step(cell, start, gripper=0.5)
    assert state.gripper_width_m == pytest.approx(0.04, abs=0.005)


def test_reset_joint_noise_is_drawn_from_the_generator(make_cell) -> None:
    config = dataclasses.replace(REACH, pybullet=PyBulletConfig(reset_joint_noise_rad=0.05))
    cell = make_cell(config)
    a, b, c = (reset(cell, seed).tcp_xyz for seed in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert 1e-4 < np.linalg.norm(a - c) < 0.1


# ------------------------------------------------------------------------------ determinism


def snapshot(cell: PyBulletCell) -> list[np.ndarray]:
    state = cell.read_state()
    signal = cell.task_signal()
    arrays = [
        state.tcp_xyz, state.tcp_quat_xyzw, state.tcp_linear_velocity,
        state.tcp_angular_velocity,
        np.array([state.tcp_yaw, state.gripper_width_m, signal.reward, signal.success]),
    ]
    arrays += list(cell.read_task_observation().values()) + list(cell.read_cameras().values())
    return arrays


def run_episode(cell: PyBulletCell, seed: int, commands: list[ArmTarget]) -> list[np.ndarray]:
    cell.reset(np.random.default_rng(seed))
    trace = snapshot(cell)
    for command in commands:
        cell.command(command)
        cell.advance(PERIOD_S)
        trace += snapshot(cell)
    return trace


def assert_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("task", ["reach", "pick_cube"])
def test_same_seed_gives_bitwise_identical_episodes(make_cell, task: str) -> None:
    config = RobotConfig(
        task=TaskConfig(name=task, dense_reward_weight=0.5),
        cameras=(CameraConfig("front", 32, 32), CameraConfig("wrist", 32, 32)),
        pybullet=PyBulletConfig(reset_joint_noise_rad=0.02),
    )
    first, second = make_cell(config), make_cell(config)
    commands = random_commands(7, 15)
    # Leave a history in the first cell: contacts (fingers pressed on the table, a pushed
    # cube) and an arm at rest for longer than Bullet takes to put bodies to sleep.
    run_episode(first, 3, random_commands(8, 5))
    move_to(first, (0.55, 0.05, 0.0), gripper=1.0)
    first.advance(3.0)
    # A used cell gives the same episode as a fresh one, and a reset replays it exactly.
    reference = run_episode(second, 11, commands)
    assert_identical(run_episode(first, 11, commands), reference)
    assert_identical(run_episode(second, 11, commands), reference)


def test_different_seeds_place_goal_and_cube_differently(make_cell) -> None:
    reach, pick = make_cell(REACH), make_cell(PICK)
    goals, cubes = [], []
    for seed in range(5):
        reset(reach, seed)
        reset(pick, seed)
        goals.append(reach.read_task_observation()["task/goal_xyz"])
        cubes.append(pick.read_task_observation()["task/cube_pose"])
    for i in range(5):
        for j in range(i):
            assert np.linalg.norm(goals[i] - goals[j]) > 1e-3
            assert np.linalg.norm(cubes[i][:2] - cubes[j][:2]) > 1e-3


# ----------------------------------------------------------------------------------- tasks


@pytest.mark.parametrize(
    "config, target_key, offset_key, size",
    [(REACH, "task/goal_xyz", "task/goal_offset", 3), (PICK, "task/cube_pose", "task/cube_offset", 7)],
)
def test_task_observation_matches_its_spec(make_cell, config, target_key: str, offset_key: str, size: int) -> None:
    cell = make_cell(config)
    specs = cell.task_observation_specs()
    assert sorted(specs) == sorted([target_key, offset_key])
    assert specs[target_key].dtype == "float32" and specs[target_key].shape == (size,)
    assert specs[offset_key].dtype == "float32" and specs[offset_key].shape == (3,)
    for seed in range(3):
        reset(cell, seed)
        observation = cell.read_task_observation()
        for key, spec in specs.items():
            assert observation[key].dtype == np.float32
            assert spec.to_box().contains(observation[key])
        # The offset is the target's position relative to the TCP, in metres.
        tcp_xyz = cell.read_state().tcp_xyz
        np.testing.assert_allclose(observation[offset_key], observation[target_key][:3] - tcp_xyz, atol=1e-5)


def test_task_observation_is_empty_without_privileged_state(make_cell) -> None:
    config = dataclasses.replace(PICK, task=TaskConfig(name="pick_cube", privileged_state=False))
    cell = make_cell(config)
    reset(cell, 0)
    assert cell.task_observation_specs() == {}
    assert cell.read_task_observation() == {}


def test_reach_goal_is_randomised_inside_the_workspace(make_cell) -> None:
    cell = make_cell(REACH)
    low, high = np.asarray(REACH.safety.workspace_low), np.asarray(REACH.safety.workspace_high)
    half = REACH.task.randomise_xy_m
    for seed in range(20):
        reset(cell, seed)
        goal = cell.read_task_observation()["task/goal_xyz"].astype(np.float64)
        assert np.all(goal >= low - 1e-6) and np.all(goal <= high + 1e-6)
        assert abs(goal[0] - 0.55) <= half + 1e-6 and abs(goal[1]) <= half + 1e-6
        assert goal[2] == pytest.approx(0.15)


def test_reaching_the_goal_succeeds(make_cell) -> None:
    cell = make_cell(REACH)
    reset(cell, 4)
    assert cell.task_signal().success is False
    assert cell.task_signal().reward == 0.0
    goal = cell.read_task_observation()["task/goal_xyz"].astype(np.float64)
    move_to(cell, goal)
    signal = cell.task_signal()
    assert signal.success is True
    assert signal.reward == 1.0


def test_dense_reward_is_a_weighted_shaping_term(make_cell) -> None:
    weight = 0.5
    cell = make_cell(dataclasses.replace(REACH, task=TaskConfig(dense_reward_weight=weight)))
    state = reset(cell, 4)
    goal = cell.read_task_observation()["task/goal_xyz"].astype(np.float64)
    distance = np.linalg.norm(state.tcp_xyz - goal)
    expected = -weight * np.tanh(distance / 0.1)
    assert cell.task_signal().reward == pytest.approx(expected, abs=1e-6)
    move_to(cell, goal)
    assert 1.0 - weight * np.tanh(0.3) < cell.task_signal().reward <= 1.0  # within the 3 cm tolerance


def grasp_cube(cell: PyBulletCell, close: float) -> None:
    """Scripted pick: above the cube, down to it, close the gripper, lift."""
    cube = cell.read_task_observation()["task/cube_pose"][:3].astype(np.float64)
    move_to(cell, cube + [0.0, 0.0, 0.10])
    move_to(cell, cube)
    for _ in range(4):
        step(cell, cell.read_state().tcp_xyz, gripper=close)
    move_to(cell, cube + [0.0, 0.0, 0.15], gripper=close)


def test_scripted_grasp_picks_up_the_cube(make_cell) -> None:
    cell = make_cell(PICK)
    reset(cell, 2)
    signal = cell.task_signal()
    assert signal.success is False and signal.reward == 0.0
    grasp_cube(cell, close=1.0)
    cube_z = float(cell.read_task_observation()["task/cube_pose"][2])
    assert cube_z - 0.02 > PICK.task.lift_height_m
    assert 0.03 < cell.read_state().gripper_width_m < 0.06  # the cube is between the fingers
    signal = cell.task_signal()
    assert signal.success is True and signal.reward == 1.0


def test_lifting_without_closing_leaves_the_cube(make_cell) -> None:
    cell = make_cell(PICK)
    reset(cell, 2)
    grasp_cube(cell, close=0.0)
    assert float(cell.read_task_observation()["task/cube_pose"][2]) < 0.025
    assert cell.task_signal().success is False


# --------------------------------------------------------------------------------- cameras


def test_cameras_render_rgb_images_of_the_configured_size(make_cell) -> None:
    cameras = (CameraConfig("front", width=80, height=48), CameraConfig("wrist", 64, 64))
    cell = make_cell(dataclasses.replace(PICK, cameras=cameras))
    specs = cell.camera_specs()
    assert specs["front"].shape == (48, 80, 3) and specs["front"].dtype == "uint8"
    assert specs["wrist"].shape == (64, 64, 3)
    start = reset(cell, 0).tcp_xyz
    before = cell.read_cameras()
    for name, image in before.items():
        assert image.shape == specs[name].shape and image.dtype == np.uint8
        assert image.flags["C_CONTIGUOUS"]
        assert image.std() > 5.0, f"{name} image is nearly constant"
    for _ in range(3):
        step(cell, start + [0.0, 0.06, -0.09], yaw=0.3)
    after = cell.read_cameras()
    changed = np.any(after["wrist"] != before["wrist"], axis=-1).mean()
    assert changed > 0.05, f"only {changed:.1%} of the wrist image changed"


def test_unknown_camera_is_refused(make_cell) -> None:
    config = dataclasses.replace(REACH, cameras=(CameraConfig("overhead"),))
    with pytest.raises(ValueError, match="overhead") as error:
        make_cell(config)
    assert "front" in str(error.value) and "wrist" in str(error.value)


def test_close_is_idempotent() -> None:
    cell = PyBulletCell(REACH)
    cell.close()
    cell.close()


def test_tool_down_yaw_convention() -> None:
    from robot_server.backends.pybullet_cell import tool_down_quaternion, yaw_of

    for yaw in (-1.2, 0.0, 0.7, math.pi / 2):
        assert yaw_of(tool_down_quaternion(yaw)) == pytest.approx(yaw, abs=1e-9)
