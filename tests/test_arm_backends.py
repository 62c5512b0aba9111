"""The real-arm backends (franka through franky, ur through ur_rtde) behind the same interfaces as
PyBullet: the RobotCell with its safety layer, the RobotServer over loopback ZeroMQ, and the actor's
env. The vendor libraries are replaced by fakes built from their documented API (fake_franky.py,
fake_ur_rtde.py), whose API surface is checked against the real modules where they are installed.
The ``hardware`` tests run against a real arm when STEERL_ROBOT_IP (and STEERL_ROBOT_KIND=franka|ur)
are set, and are skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import yaml

import fake_franky
import fake_ur_rtde
from actor.env import RobotLinkError, make_env
from conftest import free_tcp_address, running_server
from fake_arm import quat_from_rotvec
from hardware_configs.loader import ConfigError, to_dict
from hardware_configs.schema import CONFIG_DIR, ControlConfig, ServerConfig, SessionConfig, load_config
from robot_server.backends import ArmFault, RobotBackend, make_backend
from robot_server.backends.franka import FrankaArm
from robot_server.backends.orientation import (
    quaternion_to_matrix,
    same_hemisphere,
    tool_down_quaternion,
    yaw_of_quaternion,
)
from robot_server.backends.ur import (
    URArm,
    orientation_error_rotvec,
    quaternion_to_rotvec,
    rotvec_to_quaternion,
    tool_down_rotvec,
)
from robot_server.cell import RobotCell, config_section_hashes

FRANKA_EXAMPLE = "franka_realsense_example"
UR_EXAMPLE = "ur5e_example"
TEST_RATE_HZ = 50.0
# (backend, control mode) pairs the parametrised tests drive.
ARMS = [("franka", "impedance"), ("franka", "cartesian_motion"), ("ur", "servoL"), ("ur", "speedL")]
POSE_STREAMING_ARMS = [arm for arm in ARMS if arm[1] != "speedL"]


@pytest.fixture(autouse=True)
def fresh_fakes() -> Iterator[None]:
    fake_franky.forget_arms()
    fake_ur_rtde.forget_controllers()
    yield
    fake_franky.forget_arms()
    fake_ur_rtde.forget_controllers()


# -- helpers --------------------------------------------------------------------------------------
def real_config(backend: str, control: str | None = None, rate_hz: float = TEST_RATE_HZ,
                **robot_changes: Any) -> SessionConfig:
    """A bundled real-arm example on a fresh loopback address without CURVE keys, without camera
    devices (no cameras here), on a fast realtime clock."""
    config = load_config(FRANKA_EXAMPLE if backend == "franka" else UR_EXAMPLE)
    robot = config.robot
    if control is not None:
        robot = dataclasses.replace(robot, **{backend: dataclasses.replace(getattr(robot, backend), control=control)})
    robot = dataclasses.replace(robot, cameras=(), camera_devices=(),
                                control=ControlConfig(rate_hz=rate_hz, mode="realtime"), **robot_changes)
    address = free_tcp_address()
    return dataclasses.replace(config, robot=robot, server=ServerConfig(address=address),
                               env=dataclasses.replace(config.env, address=address, curve=None, timeout_ms=3000))


@dataclasses.dataclass
class FakeArm:
    """A backend on a fake vendor library and handles on the simulated arm behind it."""

    backend: RobotBackend
    sim: Any  # fake_franky.SimulatedFranka or fake_ur_rtde.SimulatedUR

    def tcp_xyz(self) -> np.ndarray:
        with self.sim.lock:
            self.sim.tcp.update()
            return self.sim.tcp.xyz.copy()

    def streamed_targets(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(target_xyz, measured_xyz_when_commanded) of every streamed pose target."""
        return self.sim.arm_targets() if isinstance(self.sim, fake_franky.SimulatedFranka) \
            else self.sim.streamed_targets()

    def refuse_next_command(self) -> str:
        """Make the arm refuse the next streamed command; returns the vendor's message."""
        if isinstance(self.sim, fake_ur_rtde.SimulatedUR):
            self.sim.refuse_next(RuntimeError("RTDEControlInterface: RTDE control script is not running!"))
            return "RTDE control script is not running!"
        message = 'libfranka: Move command aborted: motion aborted by reflex! ["cartesian_reflex"]'
        if self.backend._config.control == "impedance":
            self.sim.reflex(fake_franky.ControlException(message))  # rethrown by the next poll_motion
        else:
            self.sim.refuse_next_move(fake_franky.ControlException(message))
        return message


def fake_arm(config: SessionConfig) -> FakeArm:
    if config.robot.backend == "franka":
        backend = FrankaArm(config.robot, vendor=fake_franky)
        return FakeArm(backend, fake_franky.arm_at(config.robot.franka.robot_ip))
    backend = URArm(config.robot, vendor=fake_ur_rtde)
    return FakeArm(backend, fake_ur_rtde.controller_at(config.robot.ur.robot_ip))


def action(config: SessionConfig, xyz=(0.0, 0.0, 0.0), yaw: float = 0.0, gripper: float = -1.0) -> np.ndarray:
    values = [*xyz, yaw, gripper] if config.robot.action.use_yaw else [*xyz, gripper]
    return np.asarray(values, dtype=np.float32)


def wait_until(condition: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


# -- rotations ------------------------------------------------------------------------------------
def test_tool_down_quaternion_matches_the_pybullet_convention() -> None:
    import pybullet as p

    for yaw in np.linspace(-3.0, 3.0, 13):
        ours = tool_down_quaternion(yaw)
        theirs = np.asarray(p.getQuaternionFromEuler((math.pi, 0.0, float(yaw))))
        assert min(np.linalg.norm(ours - theirs), np.linalg.norm(ours + theirs)) < 1e-9
        assert yaw_of_quaternion(ours) == pytest.approx(yaw, abs=1e-9)
        matrix = quaternion_to_matrix(ours)
        assert matrix[:, 2] == pytest.approx([0.0, 0.0, -1.0], abs=1e-12)  # the tool points down


def test_rotation_vector_quaternion_round_trips() -> None:
    rng = np.random.default_rng(0)
    axes = rng.normal(size=(200, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.concatenate([rng.uniform(0.0, math.pi, 190), [0.0, 1e-12, 1e-7, 1e-3, math.pi - 1e-9,
                                                               math.pi, 2.0, 3.0, 3.1, 3.14159]])
    for axis, angle in zip(axes, angles):
        rotvec = axis * angle
        quat = rotvec_to_quaternion(rotvec)
        assert np.linalg.norm(quat) == pytest.approx(1.0)
        independent = quat_from_rotvec(rotvec)  # fake_arm's own implementation
        assert min(np.linalg.norm(quat - independent), np.linalg.norm(quat + independent)) < 1e-9
        back = quaternion_to_rotvec(quat)
        if angle < math.pi - 1e-6:
            assert back == pytest.approx(rotvec, abs=1e-9)
        assert quaternion_to_matrix(rotvec_to_quaternion(back)) == pytest.approx(quaternion_to_matrix(quat), abs=1e-9)
        assert quaternion_to_rotvec(-quat) == pytest.approx(back, abs=1e-9)  # q and -q: one rotation


def test_ur_tool_down_rotation_vectors_and_yaw() -> None:
    assert tool_down_rotvec(0.0) == pytest.approx([math.pi, 0.0, 0.0])
    assert tool_down_rotvec(math.pi / 2) == pytest.approx(math.pi * np.array([math.cos(math.pi / 4), math.sin(math.pi / 4), 0.0]))
    assert np.abs(tool_down_rotvec(math.pi)) == pytest.approx([0.0, math.pi, 0.0], abs=1e-12)
    reference = tool_down_quaternion(0.0)
    for yaw in np.linspace(-3.1, 3.1, 63):
        rotvec = tool_down_rotvec(yaw)
        assert np.linalg.norm(rotvec) == pytest.approx(math.pi)
        for reported in (rotvec, -rotvec):  # at pi the controller may report either sign
            quat = rotvec_to_quaternion(reported)
            assert yaw_of_quaternion(quat) == pytest.approx(yaw, abs=1e-9)
            if abs(yaw) < math.pi / 2:
                assert same_hemisphere(quat, reference) == pytest.approx(tool_down_quaternion(yaw), abs=1e-9)
    error = orientation_error_rotvec(tool_down_quaternion(0.3), tool_down_quaternion(0.2))
    assert error == pytest.approx([0.0, 0.0, 0.1], abs=1e-9)  # a turn of 0.1 rad about world z


# -- through the RobotCell ------------------------------------------------------------------------
@pytest.mark.parametrize("backend, control", ARMS)
def test_reset_goes_to_the_randomised_reset_pose_with_the_gripper_open(backend: str, control: str) -> None:
    config = real_config(backend, control)
    arm = fake_arm(config)
    cell = RobotCell(config, backend=arm.backend)
    noise = np.asarray(getattr(config.robot, backend).reset.xyz_noise_m)
    starts = []
    for seed in (1, 2):
        observation, _, _ = cell.reset(seed=seed)
        tcp = observation["tcp_pose"][:3]
        assert np.all(np.abs(tcp - np.asarray(config.robot.reset_xyz)) <= noise + 1e-5)
        assert yaw_of_quaternion(observation["tcp_pose"][3:]) == pytest.approx(
            config.robot.reset_yaw_rad, abs=getattr(config.robot, backend).reset.yaw_noise_rad + 1e-4)
        assert observation["gripper_width"][0] == pytest.approx(arm.backend.max_gripper_width_m)
        assert arm.tcp_xyz() == pytest.approx(tcp, abs=1e-5)
        starts.append(tcp)
    assert not np.allclose(starts[0], starts[1]), "the reset pose is not randomised"
    if backend == "franka":
        blocking = [entry for entry in arm.sim.log if entry[0] == "move" and not entry[2]]
        assert blocking and blocking[-1][1] == "CartesianMotion"
        assert quaternion_to_matrix(blocking[-1][4])[:, 2] == pytest.approx([0, 0, -1], abs=1e-9)
        assert ("gripper_move", 0.08, config.robot.franka.gripper_speed_mps) in arm.sim.log
    else:
        moves = [entry for entry in arm.sim.log if entry[0] == "moveL"]
        assert moves[-1][2:4] == (config.robot.ur.reset_speed_mps, config.robot.ur.reset_acceleration_mps2)
        assert quaternion_to_matrix(rotvec_to_quaternion(moves[-1][1][3:]))[:, 2] == pytest.approx([0, 0, -1], abs=1e-9)
    cell.close()


@pytest.mark.parametrize("backend, control", ARMS)
def test_steps_move_towards_targets_within_the_per_step_limit(backend: str, control: str) -> None:
    config = real_config(backend, control)
    arm = fake_arm(config)
    cell = RobotCell(config, backend=arm.backend)
    observation, _, _ = cell.reset(seed=0)
    start = observation["tcp_pose"][:3].copy()
    for _ in range(6):
        result = cell.step(action(config, xyz=(1.0, 0.0, 0.0)))
    moved = result.observation["tcp_pose"][:3] - start
    assert moved[0] > 0.01 and abs(moved[1]) < 0.005 and abs(moved[2]) < 0.005
    limit = config.robot.safety.max_step_xyz_m
    if control == "speedL":
        speeds = [np.asarray(entry[1]) for entry in arm.sim.log if entry[0] == "speedL"]
        assert len(speeds) == 6
        for twist in speeds:
            assert twist[0] > 0 and np.linalg.norm(twist[:3]) <= config.robot.ur.speed_max_mps + 1e-9
            assert np.linalg.norm(twist[3:]) <= config.robot.ur.speed_max_radps + 1e-9
    else:
        targets = arm.streamed_targets()
        assert len(targets) >= 6
        for target, measured in targets[-6:]:
            assert np.all(np.abs(target - measured) <= limit + 1e-6)
    if backend == "ur" and control == "servoL":
        servo = [entry for entry in arm.sim.log if entry[0] == "servoL"][-1]
        ur = config.robot.ur
        assert servo[2:7] == (ur.servo_velocity_mps, ur.servo_acceleration_mps2, 1.0 / TEST_RATE_HZ,
                              ur.servo_lookahead_time_s, ur.servo_gain)
    cell.close()


@pytest.mark.parametrize("backend, control", POSE_STREAMING_ARMS)
def test_a_far_target_is_clipped_by_the_safety_layer_before_the_vendor_sees_it(backend: str, control: str) -> None:
    probe = real_config(backend, control)
    high = np.asarray(probe.robot.safety.workspace_high)
    config = real_config(backend, control, reset_xyz=tuple(high - 0.01),
                         action=dataclasses.replace(probe.robot.action, xyz_scale_m=0.5))
    config = dataclasses.replace(config, robot=dataclasses.replace(config.robot, **{backend: dataclasses.replace(
        getattr(config.robot, backend), reset=dataclasses.replace(getattr(config.robot, backend).reset, xyz_noise_m=(0.0, 0.0, 0.0)))}))
    arm = fake_arm(config)
    cell = RobotCell(config, backend=arm.backend)
    cell.reset(seed=0)
    for _ in range(4):
        result = cell.step(action(config, xyz=(1.0, 1.0, 1.0)))
        assert result.info["safety/clipped_step"] or result.info["safety/clipped_box"]
    limit = config.robot.safety.max_step_xyz_m
    targets = arm.streamed_targets()
    assert len(targets) >= 4
    for target, measured in targets[-4:]:
        assert np.all(np.abs(target - measured) <= limit + 1e-6), (target, measured)
        assert np.all(target <= high + 1e-9) and np.all(target >= np.asarray(config.robot.safety.workspace_low) - 1e-9)
    assert np.allclose(targets[-1][0], high), "the box did not bound the last target"
    assert np.all(arm.tcp_xyz() <= high + 1e-6)
    cell.close()


@pytest.mark.parametrize("backend, control", ARMS)
def test_hold_stops_the_arm_where_it_is(backend: str, control: str) -> None:
    config = real_config(backend, control)
    arm = fake_arm(config)
    cell = RobotCell(config, backend=arm.backend)
    cell.reset(seed=0)
    cell.step(action(config, xyz=(1.0, 0.0, 0.0)))
    arm.backend.command(dataclasses.replace(  # a target 2 cm away, then stop at once
        cell.safety.target(action(config, xyz=(1.0, 0.0, 0.0)).astype(np.float64), arm.backend.read_state())[0]))
    cell.hold()
    held = arm.tcp_xyz()
    time.sleep(0.05)
    assert arm.tcp_xyz() == pytest.approx(held, abs=1e-3)
    assert np.linalg.norm(arm.backend.read_state().tcp_linear_velocity) < 0.05
    last = arm.sim.log[-1]
    expected = {"impedance": "reference", "cartesian_motion": "move", "servoL": "servoStop", "speedL": "speedStop"}[control]
    assert last[0] == expected
    if control == "cartesian_motion":
        assert last[1] == "CartesianStopMotion"
    if control == "impedance":
        assert last[1] == pytest.approx(last[3], abs=1e-3)  # the reference is where the arm was
    cell.close()


@pytest.mark.parametrize("backend, control", POSE_STREAMING_ARMS)
def test_a_refused_command_is_reported_clearly_and_the_arm_stays_still(backend: str, control: str) -> None:
    config = real_config(backend, control)
    arm = fake_arm(config)
    cell = RobotCell(config, backend=arm.backend)
    cell.reset(seed=0)
    cell.step(action(config, xyz=(1.0, 0.0, 0.0)))
    assert wait_until(lambda: np.linalg.norm(arm.backend.read_state().tcp_linear_velocity) < 1e-3)
    before = arm.tcp_xyz()
    targets_before = len(arm.streamed_targets())
    vendor_message = arm.refuse_next_command()
    with pytest.raises(ArmFault) as fault:
        cell.step(action(config, xyz=(1.0, 0.0, 0.0)))
    message = str(fault.value)
    assert message.startswith(f"{backend}: ") and vendor_message in message and "held" in message
    assert {"impedance": "Robot.poll_motion", "cartesian_motion": "Robot.move(CartesianMotion",
            "servoL": "RTDEControlInterface.servoL"}[control] in message
    time.sleep(0.03)
    assert arm.tcp_xyz() == pytest.approx(before, abs=1e-4), "the arm moved after a refused command"
    assert len(arm.streamed_targets()) == targets_before, "the refused target reached the arm"
    if backend == "franka":
        assert ("recover",) in arm.sim.log and not arm.sim.has_errors
    # The arm recovered: the next step moves again (impedance: a fresh tracking motion).
    cell.step(action(config, xyz=(1.0, 0.0, 0.0)))
    assert wait_until(lambda: arm.tcp_xyz()[0] > before[0] + 0.01)
    cell.close()


@pytest.mark.parametrize("control", ["impedance", "cartesian_motion"])
def test_franka_reset_recovers_from_a_reflex(control: str) -> None:
    config = real_config("franka", control)
    arm = fake_arm(config)
    cell = RobotCell(config, backend=arm.backend)
    cell.reset(seed=0)
    cell.step(action(config, xyz=(1.0, 0.0, 0.0)))
    arm.sim.reflex(fake_franky.ControlException('libfranka: Move command aborted: motion aborted by reflex! ["joint_reflex"]'))
    observation, _, _ = cell.reset(seed=0)  # the reset is the way out of a fault
    assert ("recover",) in arm.sim.log and not arm.sim.has_errors
    assert arm.tcp_xyz() == pytest.approx(observation["tcp_pose"][:3], abs=1e-5)
    cell.step(action(config, xyz=(1.0, 0.0, 0.0)))
    assert wait_until(lambda: arm.tcp_xyz()[0] > observation["tcp_pose"][0] + 0.01)
    cell.close()


def test_inprocess_env_reports_an_arm_fault_as_a_link_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "franky", fake_franky)
    config = real_config("franka", "cartesian_motion")
    config = dataclasses.replace(config, env=dataclasses.replace(config.env, connection="inproc"))
    env = make_env(config)
    env.reset(seed=0)
    fake_franky.arm_at("172.16.0.2").refuse_next_move(fake_franky.CommandException("libfranka: command rejected"))
    with pytest.raises(RobotLinkError, match=r"step refused by the robot cell: franka: Robot.move\(CartesianMotion.*"
                                             r"CommandException: libfranka: command rejected"):
        env.step(action(config, xyz=(1.0, 0.0, 0.0)))
    env.step(action(config, xyz=(1.0, 0.0, 0.0)))
    env.close()


def test_ur_a_servo_command_returning_false_is_refused_clearly() -> None:
    config = real_config("ur", "servoL")
    arm = fake_arm(config)
    cell = RobotCell(config, backend=arm.backend)
    cell.reset(seed=0)
    arm.sim.refuse_next(False)
    with pytest.raises(ArmFault, match=r"ur: RTDEControlInterface.servoL refused the command \(returned False"):
        cell.step(action(config, xyz=(1.0, 0.0, 0.0)))
    assert arm.sim.log[-1] == ("servoStop", config.robot.ur.stop_deceleration_mps2)


def test_ur_protective_stop_holds_and_is_reported_until_cleared() -> None:
    config = real_config("ur", "servoL")
    arm = fake_arm(config)
    cell = RobotCell(config, backend=arm.backend)
    cell.reset(seed=0)
    cell.step(action(config, xyz=(1.0, 0.0, 0.0)))
    arm.sim.protective_stop()
    servo_count = len(arm.streamed_targets())
    before = arm.tcp_xyz()
    for _ in range(2):
        with pytest.raises(ArmFault, match="protective stop.*isProtectiveStopped.*teach pendant"):
            cell.step(action(config, xyz=(1.0, 0.0, 0.0)))
    assert len(arm.streamed_targets()) == servo_count and arm.tcp_xyz() == pytest.approx(before, abs=1e-6)
    with pytest.raises(ArmFault, match="reset not sent: the arm is in protective stop"):
        cell.reset(seed=1)
    arm.sim.clear_protective_stop()
    cell.reset(seed=1)  # the control script ended with the stop: the reset uploads it again
    assert ("reuploadScript",) in arm.sim.log
    cell.step(action(config, xyz=(1.0, 0.0, 0.0)))
    assert len(arm.streamed_targets()) == servo_count + 1
    cell.close()


@pytest.mark.parametrize("backend", ["franka", "ur"])
def test_gripper_commands_follow_the_threshold(backend: str) -> None:
    config = real_config(backend)
    arm = fake_arm(config)
    cell = RobotCell(config, backend=arm.backend)
    cell.reset(seed=0)
    for gripper in (1.0, 1.0, -1.0, -0.5, 0.5):
        result = cell.step(action(config, gripper=gripper))
    if backend == "franka":
        commands = [entry[0] for entry in arm.sim.gripper_targets()][1:]  # after the reset's open
        assert commands == ["gripper_grasp", "gripper_move", "gripper_grasp"]
        grasp = arm.sim.gripper_targets()[1]
        assert grasp[1:] == (0.0, config.robot.franka.gripper_speed_mps, config.robot.franka.gripper_force_n, 0.005, 1.0)
        assert result.observation["gripper_width"][0] == pytest.approx(0.0)
    else:
        outputs = [entry for entry in arm.sim.log if entry[0] == "setToolDigitalOut"]
        assert [level for _, _, level in outputs] == [False, True, False, True]  # reset opens first
        assert result.observation["gripper_width"][0] == pytest.approx(0.0)
        cell.step(action(config, gripper=-1.0))
        assert cell.backend.read_state().gripper_width_m == pytest.approx(config.robot.ur.gripper_max_width_m)
    cell.close()


# -- through the robot server over ZeroMQ ----------------------------------------------------------
@pytest.mark.parametrize("backend, control", [("franka", "cartesian_motion"), ("ur", "servoL")])
def test_server_replies_with_the_arm_fault_and_keeps_serving(backend: str, control: str) -> None:
    config = real_config(backend, control)
    arm = fake_arm(config)
    with running_server(config, arm.backend) as server:
        env = make_env(config, client_name="arm-fault-test")
        env.reset(seed=0)
        env.step(action(config, xyz=(1.0, 0.0, 0.0)))
        assert wait_until(lambda: np.linalg.norm(arm.backend.read_state().tcp_linear_velocity) < 1e-3)
        before = arm.tcp_xyz()
        vendor_message = arm.refuse_next_command()
        with pytest.raises(RobotLinkError) as error:
            env.step(action(config, xyz=(1.0, 0.0, 0.0)))
        assert f"step refused by the robot server: ERROR_INTERNAL: arm fault: {backend}: " in str(error.value)
        assert vendor_message in str(error.value) and "held" in str(error.value)
        assert arm.tcp_xyz() == pytest.approx(before, abs=1e-4)
        assert server.errors_sent == 1
        observation, *_ = env.step(action(config, xyz=(1.0, 0.0, 0.0)))  # the server still serves
        assert wait_until(lambda: arm.tcp_xyz()[0] > before[0] + 0.01)
        env.close()


def test_same_actor_code_drives_the_franka_fake_and_pybullet() -> None:
    """One config, two backends: the actor's env built from the *simulation* config talks to a
    robot server on the (fake) Franka and to one on PyBullet, and sees the same spaces."""
    real = real_config("franka", "impedance", rate_hz=20.0)
    sim = dataclasses.replace(real, robot=dataclasses.replace(real.robot, backend="pybullet"))
    assert config_section_hashes(sim) == config_section_hashes(real)

    def drive(server_config: SessionConfig, backend: RobotBackend | None) -> tuple[Any, np.ndarray]:
        with running_server(server_config, backend):
            env = make_env(dataclasses.replace(sim, env=server_config.env), client_name="actor")
            observation, _ = env.reset(seed=0)
            start = observation["tcp_pose"][:3].copy()
            for _ in range(5):
                observation, reward, terminated, truncated, info = env.step(action(sim, xyz=(1.0, 0.0, 0.0)))
                assert not terminated and info["watchdog_tripped"] == 0.0
            space = env.observation_space
            env.close()
            return space, observation["tcp_pose"][:3] - start

    real_space, real_moved = drive(real, fake_arm(real).backend)
    sim_address = free_tcp_address()
    sim_server = dataclasses.replace(sim, server=ServerConfig(address=sim_address),
                                     env=dataclasses.replace(sim.env, address=sim_address))
    sim_space, sim_moved = drive(sim_server, None)
    assert real_space == sim_space
    assert real_moved[0] > 0.02 and sim_moved[0] > 0.02


def test_make_backend_imports_the_vendor_library_only_when_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = ("import sys, robot_server.server, robot_server.backends.franka, robot_server.backends.ur; "
             "loaded = {'franky', 'rtde_control', 'rtde_receive', 'rtde_io'} & set(sys.modules); "
             "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=Path(__file__).resolve().parents[1], timeout=60)

    franka = real_config("franka")
    monkeypatch.setitem(sys.modules, "franky", fake_franky)
    backend = make_backend(franka.robot)
    assert isinstance(backend, FrankaArm)
    assert fake_franky.arm_at("172.16.0.2").connect_arguments == {
        "relative_dynamics_factor": franka.robot.franka.relative_dynamics_factor,
        "default_torque_threshold": franka.robot.franka.collision_torque_threshold_nm,
        "default_force_threshold": franka.robot.franka.collision_force_threshold_n}

    ur = real_config("ur")
    for module in ("rtde_control", "rtde_receive", "rtde_io"):
        monkeypatch.setitem(sys.modules, module, fake_ur_rtde)
    assert isinstance(make_backend(ur.robot), URArm)
    assert fake_ur_rtde.controller_at("192.168.1.102").connect_frequencies == [-1.0]

    monkeypatch.setitem(sys.modules, "franky", None)  # not installed
    with pytest.raises(ImportError, match=r"'franka' needs the python module 'franky' \(pip package franky-control\).*steerl\[hardware\]"):
        make_backend(franka.robot)


def test_unreachable_arm_is_reported_with_its_address() -> None:
    config = real_config("franka")
    fake_franky.arm_at("172.16.0.2").unreachable = True
    with pytest.raises(ArmFault, match=r"franka: cannot connect to the arm at 172\.16\.0\.2.*NetworkException"):
        FrankaArm(config.robot, vendor=fake_franky)
    config = real_config("ur")
    fake_ur_rtde.controller_at("192.168.1.102").unreachable = True
    with pytest.raises(ArmFault, match=r"ur: cannot connect to the controller at 192\.168\.1\.102.*RuntimeError"):
        URArm(config.robot, vendor=fake_ur_rtde)


# -- configs --------------------------------------------------------------------------------------
def _example_dict(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())


def _load(tmp_path: Path, data: dict) -> SessionConfig:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)


@pytest.mark.parametrize("example, section, change, expected", [
    (FRANKA_EXAMPLE, "franka", {"robot_ip": ""}, "robot: franka.robot_ip: required with backend 'franka'"),
    (UR_EXAMPLE, "ur", {"robot_ip": ""}, "robot: ur.robot_ip: required with backend 'ur'"),
    (FRANKA_EXAMPLE, "franka", {"robot_ip": "http://172.16.0.2"}, "robot.franka: robot_ip: 'http://172.16.0.2' is neither"),
    (FRANKA_EXAMPLE, "franka", {"translational_stiffness": 5000.0}, "robot.franka: translational_stiffness must lie in (0, 3000]"),
    (FRANKA_EXAMPLE, "franka", {"relative_dynamics_factor": 0.0}, "robot.franka: relative_dynamics_factor must lie in (0, 1]"),
    (FRANKA_EXAMPLE, "franka", {"control": "joint"}, "robot.franka.control: expected one of 'impedance', 'cartesian_motion'"),
    (UR_EXAMPLE, "ur", {"gripper_pin": 2}, "robot.ur: gripper_pin must lie in [0, 1] for gripper 'tool_digital_output'"),
    (UR_EXAMPLE, "ur", {"servo_gain": 50.0}, "robot.ur: servo_gain must lie in [100, 2000]"),
    (UR_EXAMPLE, "ur", {"servo_lookahead_time_s": 0.5}, "robot.ur: servo_lookahead_time_s must lie in [0.03, 0.2]"),
    (UR_EXAMPLE, "ur", {"reset": {"xyz_noise_m": [-0.1, 0, 0]}}, "robot.ur.reset: xyz_noise_m and yaw_noise_rad must be non-negative"),
])
def test_bad_real_arm_configs_name_the_field(tmp_path: Path, example: str, section: str, change: dict, expected: str) -> None:
    data = _example_dict(example)
    data["robot"][section].update(change)
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, data)
    assert expected in str(error.value)


def test_real_arms_need_the_realtime_clock_and_camera_devices(tmp_path: Path) -> None:
    data = _example_dict(FRANKA_EXAMPLE)
    data["robot"]["control"]["mode"] = "sync"
    with pytest.raises(ConfigError, match="robot: control.mode: backend 'franka' is a real arm"):
        _load(tmp_path, data)
    data = _example_dict(UR_EXAMPLE)
    del data["robot"]["cameras"][1]["device"], data["robot"]["cameras"][1]["crop"]
    with pytest.raises(ConfigError, match=r"robot: cameras\[1\].device: camera 'wrist' needs a device with backend 'ur'"):
        _load(tmp_path, data)


@pytest.mark.parametrize("example", [FRANKA_EXAMPLE, UR_EXAMPLE])
def test_examples_reference_keys_by_path_and_hold_no_secrets(example: str) -> None:
    text = (CONFIG_DIR / f"{example}.yaml").read_text()
    config = load_config(example)
    assert config.server.curve is not None and config.env.curve is not None
    for path in (config.server.curve.secret_key_file, config.server.curve.authorized_keys_dir,
                 config.env.curve.secret_key_file, config.env.curve.server_public_key_file):
        assert path.startswith("/")
    # A Z85 CURVE key is 40 characters; none may sit in the file.
    assert not re.search(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}", text.replace("/etc/steerl/keys/", ""))


def _leaf_paths(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        paths = {}
        for key, item in value.items():
            paths.update(_leaf_paths(item, f"{prefix}.{key}" if prefix else key))
        return paths
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        paths = {}
        for index, item in enumerate(value):
            paths.update(_leaf_paths(item, f"{prefix}[{index}]"))
        return paths
    return {prefix: value}


@pytest.mark.parametrize("example, section", [(FRANKA_EXAMPLE, "franka"), (UR_EXAMPLE, "ur")])
def test_sim_and_real_configs_differ_only_in_backend_and_device_sections(tmp_path: Path, example: str, section: str) -> None:
    """The simulation twin of a real config: backend pybullet, no vendor section, no camera devices."""
    data = _example_dict(example)
    data["robot"]["backend"] = "pybullet"
    del data["robot"][section], data["robot"]["camera_devices"]
    for camera in data["robot"]["cameras"]:
        camera.pop("device"), camera.pop("crop", None)
    sim, real = _load(tmp_path, data), load_config(example)
    sim_paths, real_paths = _leaf_paths(to_dict(sim)), _leaf_paths(to_dict(real))
    differing = {path for path in set(sim_paths) | set(real_paths) if sim_paths.get(path) != real_paths.get(path)}
    allowed = re.compile(rf"^robot\.(backend|{section}\..*|camera_devices.*|cameras\[\d+\]\.(device|crop))$")
    assert differing and all(allowed.match(path) for path in differing), sorted(differing)
    # The handshake compares these hashes: a client built from the sim twin is accepted by the real cell.
    assert config_section_hashes(sim) == config_section_hashes(real)


# -- API conformance of the fakes with the real vendor libraries ---------------------------------
def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[(<{":
            depth += 1
        elif char in "])>}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def _pybind_overloads(function: Any, name: str) -> list[list[tuple[str, bool]]]:
    """[(parameter name, has a default), ...] of each overload in a pybind11 docstring."""
    overloads = []
    for line in (getattr(function, "__doc__", None) or "").splitlines():
        match = re.match(rf"^\s*(?:\d+\. )?{re.escape(name)}\((.*)\) -> ", line)
        if match:
            params = []
            for part in _split_top_level(match.group(1)):
                param_name = part.split(":")[0].split("=")[0].strip()
                if param_name not in ("self", "*args", "**kwargs"):
                    params.append((param_name, re.search(r"=\s*\S", part) is not None))
            overloads.append(params)
    return overloads


def _conforms(fake: Callable, overload: list[tuple[str, bool]]) -> bool:
    """The fake's parameters appear in the real overload in order (positional-only ones at the same
    index, where pybind names them argN), and every real parameter the fake lacks has a default."""
    fake_params = [p for p in inspect.signature(fake).parameters.values() if p.name != "self"]
    names = [name for name, _ in overload]
    used, cursor = set(), -1
    for index, param in enumerate(fake_params):
        if param.kind == inspect.Parameter.POSITIONAL_ONLY:
            if index >= len(names) or not (names[index] == param.name or re.fullmatch(r"arg\d+", names[index])):
                return False
            position = index
        elif param.name in names:
            position = names.index(param.name)
        else:
            return False
        if position <= cursor:
            return False
        cursor = position
        used.add(position)
    return all(has_default for index, (_, has_default) in enumerate(overload) if index not in used)


def _check_class_surface(fake_cls: type, real_cls: type, fake_only: set[str] = frozenset()) -> list[str]:
    problems = []
    for name, member in vars(fake_cls).items():
        if (name.startswith("_") and name != "__init__") or name in fake_only:
            continue
        if not hasattr(real_cls, name):
            problems.append(f"{fake_cls.__name__}.{name}: not on the real class")
            continue
        if inspect.isfunction(member):
            overloads = _pybind_overloads(getattr(real_cls, name), name)
            if not overloads:
                problems.append(f"{fake_cls.__name__}.{name}: no signature in the real docstring")
            elif not any(_conforms(member, overload) for overload in overloads):
                problems.append(f"{fake_cls.__name__}.{name}{inspect.signature(member)} matches none of {overloads}")
    return problems


FAKE_FRANKY_API = ["Exception", "ControlException", "CommandException", "NetworkException", "InvalidOperationException",
                   "GripperException", "MotionReuseException", "Affine", "Twist", "RobotPose", "RobotVelocity",
                   "CartesianState", "ReferenceType", "RelativeDynamicsFactor", "CartesianMotion", "CartesianStopMotion",
                   "CartesianReference", "CartesianImpedanceTrackingMotion", "Robot", "BoolFuture", "Gripper"]


def test_fake_franky_matches_the_real_api() -> None:
    franky = pytest.importorskip("franky", reason="franky-control is not installed (pip install 'steerl[hardware]')")
    problems = []
    for name in FAKE_FRANKY_API:
        fake_cls, real_cls = getattr(fake_franky, name), getattr(franky, name, None)
        if real_cls is None:
            problems.append(f"franky.{name}: missing")
        elif issubclass(fake_cls, BaseException):
            for other in FAKE_FRANKY_API:
                other_fake = getattr(fake_franky, other)
                if isinstance(other_fake, type) and issubclass(other_fake, BaseException) and \
                        issubclass(fake_cls, other_fake) != issubclass(real_cls, getattr(franky, other)):
                    problems.append(f"{name} derives from {other} in one module only")
        elif name == "ReferenceType":
            problems += [f"ReferenceType.{m}: missing" for m in fake_cls.__members__ if not hasattr(real_cls, m)]
        else:
            # Robot.data_types is the fake's own hook; a BoolFuture is only ever made by franky itself.
            fake_only = {"Robot": {"data_types"}, "BoolFuture": {"__init__"}}.get(name, set())
            problems += _check_class_surface(fake_cls, real_cls, fake_only=fake_only)
    assert not problems, "\n".join(problems)


def test_fake_ur_rtde_matches_the_real_api() -> None:
    problems = []
    for module_name, class_name in (("rtde_control", "RTDEControlInterface"), ("rtde_receive", "RTDEReceiveInterface"),
                                    ("rtde_io", "RTDEIOInterface")):
        module = pytest.importorskip(module_name, reason="ur-rtde is not installed (pip install 'steerl[hardware]')")
        problems += _check_class_surface(getattr(fake_ur_rtde, class_name), getattr(module, class_name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("control", ["impedance", "cartesian_motion"])
def test_franka_backend_builds_real_franky_motions(control: str) -> None:
    """The backend's motions, references and poses are real franky objects here; only the Robot and
    Gripper (the network) are simulated."""
    franky = pytest.importorskip("franky", reason="franky-control is not installed (pip install 'steerl[hardware]')")

    class HybridRobot(fake_franky.Robot):
        data_types = franky

    vendor = SimpleNamespace(**{name: getattr(franky, name) for name in dir(franky) if not name.startswith("_")})
    vendor.Robot, vendor.Gripper = HybridRobot, fake_franky.Gripper
    for error in ("Exception", "GripperException", "MotionReuseException"):  # raised by the simulated side
        setattr(vendor, error, getattr(fake_franky, error))
    config = real_config("franka", control)
    backend = FrankaArm(config.robot, vendor=vendor)
    cell = RobotCell(config, backend=backend)
    observation, _, _ = cell.reset(seed=0)
    start = observation["tcp_pose"][:3].copy()
    for _ in range(4):
        result = cell.step(action(config, xyz=(1.0, 0.0, 0.0), gripper=1.0))
    assert result.observation["tcp_pose"][0] > start[0] + 0.01
    kinds = {entry[1] for entry in fake_franky.arm_at("172.16.0.2").log if entry[0] == "move"}
    assert "CartesianMotion" in kinds
    if control == "impedance":
        assert "CartesianImpedanceTrackingMotion" in kinds
    cell.hold()
    cell.close()


# -- real hardware --------------------------------------------------------------------------------
@pytest.mark.hardware
@pytest.mark.skipif(not os.environ.get("STEERL_ROBOT_IP"),
                    reason="real arm: set STEERL_ROBOT_IP and STEERL_ROBOT_KIND=franka|ur")
def test_real_arm_reads_its_state_and_holds() -> None:
    """Smoke test on a real arm: connect, read the state, hold, read again. Commands no motion."""
    kind = os.environ.get("STEERL_ROBOT_KIND", "franka")
    assert kind in ("franka", "ur"), f"STEERL_ROBOT_KIND must be franka or ur, got {kind!r}"
    config = load_config(FRANKA_EXAMPLE if kind == "franka" else UR_EXAMPLE)
    section = dataclasses.replace(getattr(config.robot, kind), robot_ip=os.environ["STEERL_ROBOT_IP"])
    robot = dataclasses.replace(config.robot, cameras=(), camera_devices=(), **{kind: section})
    backend = make_backend(robot)
    try:
        first = backend.read_state()
        assert np.all(np.isfinite(first.tcp_xyz)) and np.linalg.norm(first.tcp_xyz) < 2.0
        assert np.linalg.norm(first.tcp_quat_xyzw) == pytest.approx(1.0, abs=1e-6)
        assert 0.0 <= first.gripper_width_m <= backend.max_gripper_width_m
        backend.hold()
        time.sleep(0.5)
        second = backend.read_state()
        assert np.linalg.norm(second.tcp_xyz - first.tcp_xyz) < 0.01, "the arm drifted while held"
        assert np.linalg.norm(second.tcp_linear_velocity) < 0.05
    finally:
        backend.close()
