"""A simulated robot cell in PyBullet: a Franka Panda on a table, a task, and RGB cameras.

Scene and frames
    The world frame is the robot base frame: the Panda (``franka_panda/panda.urdf`` from
    ``pybullet_data``, fixed base) stands at the origin on a table (a static box, 1.1 m x 1.4 m)
    whose top is the plane z = 0; x points away from the robot, z up. There is no floor: the
    renderer's cost grows with the pixels each object covers, and the table fills the views.
    The default workspace box of :class:`~hardware_configs.schema.SafetyConfig`
    (x 0.30..0.75, y -0.30..0.30, z 0.02..0.45) lies above the table in front of the robot.

    The tool centre point (TCP) is the Panda's ``panda_grasptarget`` link, the point between the
    fingertips. The tool always points down; ``yaw`` is its rotation about the world z axis, 0 when
    the hand's x axis points along world +x (the fingers then open along world y). The gripper is
    the two finger joints (0..0.04 m each), its width their sum (0..0.08 m).

Control
    :meth:`PyBulletCell.command` solves inverse kinematics (with a null-space pull towards an
    elbow-up rest posture) and stores joint targets; :meth:`PyBulletCell.advance` integrates the
    physics at ``pybullet.physics_hz`` with position-controlled joint motors tracking them.
    Each cell owns its physics client, so several cells can live in one process.

Tasks (``config.task.name``) and rewards
    ``reach``      A goal point, shown as a small green sphere without collision, sampled uniformly
                   within +-``randomise_xy_m`` of (0.55, 0.0) in x and y at z = 0.15 (clipped to
                   the workspace box). Success: TCP within ``reach_tolerance_m`` of the goal.
                   Shaping: ``-tanh(distance / 0.1)``.
    ``pick_cube``  A 4 cm, 50 g red cube on the table at (0.55, 0.0) +- ``randomise_xy_m`` with a
                   random yaw. Success: the cube's bottom is more than ``lift_height_m`` above
                   the table and its centre within 3 cm of the TCP (held between the fingers).
                   Shaping: ``-(0.5 * tanh(d / 0.1) + 0.5 * (1 - min(lift / lift_height_m, 1)))``
                   with d the TCP-to-cube distance and lift the height of the cube's bottom.
                   With ``task.reach_shaping: aligned`` the reach term is
                   ``0.5 * tanh(d / 0.1) + 0.5 * tanh(d_xy / 0.03)`` (d_xy: horizontal distance).

    The distance term saturates beyond about 20 cm and is steepest close to the target, where the
    last centimetres of alignment decide a grasp (a linear term gives those almost no signal).

    Reward = ``float(success) + task.dense_reward_weight * shaping`` (shaping in [-1, 0]).
    With ``task.privileged_state`` the observation gains ``task/goal_xyz`` (reach) or
    ``task/cube_pose`` (pick_cube: xyz and quaternion xyzw), and the target relative to the TCP,
    ``task/goal_offset`` or ``task/cube_offset`` (target xyz minus TCP xyz): a policy needs the
    difference to within millimetres, which an MLP reads far more easily than it computes it.

Cameras
    ``front``: fixed, in front of the table looking back at the workspace from above.
    ``wrist``: on the hand, looking down the tool axis; it moves with the arm.
    Both render with PyBullet's CPU tiny renderer (no OpenGL needed).

Determinism
    :meth:`PyBulletCell.reset` drops the contact caches of the last episode, restores a snapshot
    taken at construction and draws every random number from the generator it is given; no body
    is ever allowed to sleep. The same generator state therefore yields a bitwise-identical
    episode, in a fresh cell or in one that has run for hours.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pybullet as p
import pybullet_data

from hardware_configs.schema import CameraConfig, RobotConfig
from robot_server.backends.base import ArmState, ArmTarget, RobotBackend, TaskSignal
from transport.spaces import FieldSpec

PANDA_URDF = "franka_panda/panda.urdf"
ARM_JOINT_NAMES = tuple(f"panda_joint{i}" for i in range(1, 8))
FINGER_JOINT_NAMES = ("panda_finger_joint1", "panda_finger_joint2")
HAND_LINK_NAME = "panda_hand"
TCP_LINK_NAME = "panda_grasptarget"

# Elbow-up posture with the tool pointing down; the null-space target of the IK.
REST_POSE = (0.0, -0.3, 0.0, -2.2, 0.0, 2.0, math.pi / 4)
FINGER_OPEN_M = 0.04
# Motor limits (N m for the arm, N for the fingers) and position-control gains.
# The URDF gives every link an inertia of 0.1 kg m^2, far above the real arm's, so the real
# torque limits (87 and 12 N m) cannot track 3 cm per 0.1 s; the simulated motors are stronger.
ARM_FORCES = (200.0, 200.0, 200.0, 200.0, 40.0, 40.0, 40.0)
FINGER_FORCE = 40.0
ARM_POSITION_GAIN = 0.3
FINGER_POSITION_GAIN = 0.2
VELOCITY_GAIN = 1.0
IK_ATTEMPTS = 5
IK_ITERATIONS = 20
IK_RESIDUAL = 1e-6
IK_TOLERANCE_M = 1e-4
SETTLE_S = 0.05

TABLE_HALF_EXTENTS = (0.55, 0.7, 0.025)
TABLE_CENTRE = (0.35, 0.0, -TABLE_HALF_EXTENTS[2])

REACH_GOAL_CENTRE = (0.55, 0.0, 0.15)
GOAL_MARKER_RADIUS = 0.015
CUBE_CENTRE_XY = (0.55, 0.0)
CUBE_HALF_SIZE = 0.02
CUBE_MASS_KG = 0.05
CUBE_FRICTION = 1.0
CUBE_HELD_RADIUS_M = 0.03
SHAPING_DISTANCE_M = 0.1
ALIGNMENT_DISTANCE_M = 0.03

POSITION_BOUND = 2.0

SUPPORTED_CAMERAS = ("front", "wrist")
FRONT_CAMERA_EYE = (1.05, 0.0, 0.55)
FRONT_CAMERA_TARGET = (0.45, 0.0, 0.18)
FRONT_CAMERA_FOV_DEG = 60.0
WRIST_CAMERA_OFFSET = (0.07, 0.0, 0.02)  # in the hand frame
WRIST_CAMERA_LOOK_AT_DEPTH = 0.10  # looks at this point beyond the TCP along the tool axis
WRIST_CAMERA_FOV_DEG = 70.0


def load_panda(client: int) -> int:
    """Load the Panda (fixed base) with its collision meshes as visuals: the tiny renderer then
    draws a few thousand triangles instead of about 130 000 (about 1 ms instead of 20 per frame).
    The dynamics and collisions are those of the stock URDF."""
    directory = os.path.join(pybullet_data.getDataPath(), os.path.dirname(PANDA_URDF))
    with open(os.path.join(directory, os.path.basename(PANDA_URDF))) as file:
        urdf = file.read()
    collision_meshes = os.path.join(directory, "meshes", "collision")
    urdf = re.sub(r"package://meshes/(visual|collision)/", collision_meshes + os.sep, urdf)
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "panda_low_poly.urdf")
        with open(path, "w") as file:
            file.write(urdf)
        return p.loadURDF(path, useFixedBase=True, physicsClientId=client)


def tool_down_quaternion(yaw: float) -> tuple[float, float, float, float]:
    """The tool-down orientation rotated by ``yaw`` about world z (x, y, z, w)."""
    # PyBullet's Euler convention is R = Rz(yaw) Ry(pitch) Rx(roll): Rx(pi) flips the tool down.
    return tuple(p.getQuaternionFromEuler((math.pi, 0.0, yaw)))


def yaw_of(quat_xyzw: tuple[float, ...]) -> float:
    """The heading of a tool-down orientation: the angle of its x axis about world z."""
    m = p.getMatrixFromQuaternion(quat_xyzw)
    return math.atan2(m[3], m[0])


class _PandaKinematics:
    """A kinematic copy of the Panda in a private physics client, used only to solve IK.

    PyBullet's IK starts from a body's current joint state; posing this copy instead of the
    simulated arm lets the solver iterate (pose, solve, check by forward kinematics) without
    touching the physics.
    """

    def __init__(self) -> None:
        self._client = p.connect(p.DIRECT)
        p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=self._client)
        self._robot = load_panda(self._client)
        joints, links = {}, {}
        lower, upper = [], []
        for index in range(p.getNumJoints(self._robot, physicsClientId=self._client)):
            info = p.getJointInfo(self._robot, index, physicsClientId=self._client)
            joints[info[1].decode()] = index
            links[info[12].decode()] = index
            if info[2] != p.JOINT_FIXED:
                lower.append(info[8])
                upper.append(info[9])
        self.arm_joints = [joints[name] for name in ARM_JOINT_NAMES]
        self.finger_joints = [joints[name] for name in FINGER_JOINT_NAMES]
        self.hand_link = links[HAND_LINK_NAME]
        self.tcp_link = links[TCP_LINK_NAME]
        # The IK works on all movable joints: the arm, then the fingers.
        self._null_space = dict(
            lowerLimits=lower, upperLimits=upper,
            jointRanges=[hi - lo for lo, hi in zip(lower, upper)],
            restPoses=[*REST_POSE, FINGER_OPEN_M, FINGER_OPEN_M],
        )
        n_arm = len(self.arm_joints)
        self.arm_lower, self.arm_upper = np.asarray(lower[:n_arm]), np.asarray(upper[:n_arm])

    def solve(self, xyz: np.ndarray, yaw: float, start: np.ndarray) -> np.ndarray:
        """Arm joint angles putting the TCP at ``xyz`` with the tool down at ``yaw``, near
        ``start``: one solve with a null-space pull towards the elbow-up rest posture (which
        leaves a sub-millimetre residual), then plain solves until the TCP is on target."""
        position = [float(v) for v in xyz]
        orientation = tool_down_quaternion(float(yaw))
        arm = np.clip(start, self.arm_lower, self.arm_upper)
        self._pose(arm)
        for attempt in range(IK_ATTEMPTS):
            solution = p.calculateInverseKinematics(
                self._robot, self.tcp_link, position, orientation,
                maxNumIterations=IK_ITERATIONS, residualThreshold=IK_RESIDUAL,
                physicsClientId=self._client, **(self._null_space if attempt == 0 else {}),
            )
            arm = np.clip(solution[: len(self.arm_joints)], self.arm_lower, self.arm_upper)
            self._pose(arm)
            if np.linalg.norm(self.tcp_position() - xyz) < IK_TOLERANCE_M:
                break
        return arm

    def tcp_position(self) -> np.ndarray:
        state = p.getLinkState(
            self._robot, self.tcp_link, computeForwardKinematics=1, physicsClientId=self._client
        )
        return np.asarray(state[4])

    def _pose(self, arm: np.ndarray) -> None:
        for joint, angle in zip(self.arm_joints, arm):
            p.resetJointState(self._robot, joint, float(angle), physicsClientId=self._client)

    def close(self) -> None:
        p.disconnect(physicsClientId=self._client)


def _bounded_position(xyz: np.ndarray) -> np.ndarray:
    return np.clip(xyz, -POSITION_BOUND, POSITION_BOUND).astype(np.float32)


class _Task(Protocol):
    def randomise(self, rng: np.random.Generator) -> None: ...

    def evaluate(self, tcp_xyz: np.ndarray) -> tuple[bool, float]:
        """(success, shaping in [-1, 0])."""
        ...

    def observation_specs(self) -> dict[str, FieldSpec]: ...

    def observation(self, tcp_xyz: np.ndarray) -> dict[str, np.ndarray]: ...

    @property
    def bodies(self) -> list[int]:
        """The task's bodies that move under physics."""
        ...


class _ReachTask:
    """Bring the TCP to a goal point shown as a visual-only sphere."""

    def __init__(self, client: int, config: RobotConfig) -> None:
        self._client = client
        self._task = config.task
        self._low = np.asarray(config.safety.workspace_low, dtype=np.float64)
        self._high = np.asarray(config.safety.workspace_high, dtype=np.float64)
        self.goal = np.clip(np.asarray(REACH_GOAL_CENTRE), self._low, self._high)
        shape = p.createVisualShape(
            p.GEOM_SPHERE, radius=GOAL_MARKER_RADIUS, rgbaColor=(0.1, 0.9, 0.1, 1.0),
            physicsClientId=client,
        )
        self._marker = p.createMultiBody(
            baseMass=0.0, baseCollisionShapeIndex=-1, baseVisualShapeIndex=shape,
            basePosition=self.goal.tolist(), physicsClientId=client,
        )

    @property
    def bodies(self) -> list[int]:
        return []

    def randomise(self, rng: np.random.Generator) -> None:
        half = self._task.randomise_xy_m
        offset = rng.uniform(-half, half, size=2)
        goal = np.asarray(REACH_GOAL_CENTRE, dtype=np.float64)
        goal[:2] += offset
        self.goal = np.clip(goal, self._low, self._high)
        p.resetBasePositionAndOrientation(
            self._marker, self.goal.tolist(), (0.0, 0.0, 0.0, 1.0), physicsClientId=self._client
        )

    def evaluate(self, tcp_xyz: np.ndarray) -> tuple[bool, float]:
        distance = float(np.linalg.norm(tcp_xyz - self.goal))
        return distance <= self._task.reach_tolerance_m, -math.tanh(distance / SHAPING_DISTANCE_M)

    def observation_specs(self) -> dict[str, FieldSpec]:
        bound = FieldSpec("float32", (3,), -POSITION_BOUND, POSITION_BOUND)
        return {"task/goal_xyz": bound, "task/goal_offset": bound}

    def observation(self, tcp_xyz: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "task/goal_xyz": _bounded_position(self.goal),
            "task/goal_offset": _bounded_position(self.goal - tcp_xyz),
        }


class _PickCubeTask:
    """Lift a cube off the table with the gripper."""

    _POSE_LOW = (-POSITION_BOUND,) * 3 + (-1.0,) * 4
    _POSE_HIGH = (POSITION_BOUND,) * 3 + (1.0,) * 4

    def __init__(self, client: int, config: RobotConfig) -> None:
        self._client = client
        self._task = config.task
        half = (CUBE_HALF_SIZE,) * 3
        collision = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=client)
        visual = p.createVisualShape(
            p.GEOM_BOX, halfExtents=half, rgbaColor=(0.9, 0.15, 0.1, 1.0), physicsClientId=client
        )
        self.cube = p.createMultiBody(
            baseMass=CUBE_MASS_KG, baseCollisionShapeIndex=collision,
            baseVisualShapeIndex=visual, basePosition=(*CUBE_CENTRE_XY, CUBE_HALF_SIZE),
            physicsClientId=client,
        )
        p.changeDynamics(
            self.cube, -1, lateralFriction=CUBE_FRICTION, spinningFriction=0.001,
            rollingFriction=0.0001, physicsClientId=client,
        )

    @property
    def bodies(self) -> list[int]:
        return [self.cube]

    def randomise(self, rng: np.random.Generator) -> None:
        half = self._task.randomise_xy_m
        x, y = np.asarray(CUBE_CENTRE_XY) + rng.uniform(-half, half, size=2)
        yaw = rng.uniform(-math.pi / 4, math.pi / 4)
        p.resetBasePositionAndOrientation(
            self.cube, (float(x), float(y), CUBE_HALF_SIZE),
            p.getQuaternionFromEuler((0.0, 0.0, float(yaw))), physicsClientId=self._client,
        )

    def pose(self) -> tuple[np.ndarray, np.ndarray]:
        xyz, quat = p.getBasePositionAndOrientation(self.cube, physicsClientId=self._client)
        return np.asarray(xyz), np.asarray(quat)

    def evaluate(self, tcp_xyz: np.ndarray) -> tuple[bool, float]:
        cube_xyz, _ = self.pose()
        distance = float(np.linalg.norm(tcp_xyz - cube_xyz))
        lift = max(0.0, float(cube_xyz[2]) - CUBE_HALF_SIZE)
        lifted = lift > self._task.lift_height_m
        success = lifted and distance <= CUBE_HELD_RADIUS_M
        lift_fraction = min(lift / self._task.lift_height_m, 1.0)
        reach = math.tanh(distance / SHAPING_DISTANCE_M)
        if self._task.reach_shaping == "aligned":
            horizontal = float(np.linalg.norm(tcp_xyz[:2] - cube_xyz[:2]))
            reach = 0.5 * reach + 0.5 * math.tanh(horizontal / ALIGNMENT_DISTANCE_M)
        shaping = -(0.5 * reach + 0.5 * (1.0 - lift_fraction))
        return success, shaping

    def observation_specs(self) -> dict[str, FieldSpec]:
        return {
            "task/cube_pose": FieldSpec("float32", (7,), self._POSE_LOW, self._POSE_HIGH),
            "task/cube_offset": FieldSpec("float32", (3,), -POSITION_BOUND, POSITION_BOUND),
        }

    def observation(self, tcp_xyz: np.ndarray) -> dict[str, np.ndarray]:
        xyz, quat = self.pose()
        pose = np.clip(np.concatenate([xyz, quat]), self._POSE_LOW, self._POSE_HIGH)
        return {
            "task/cube_pose": pose.astype(np.float32),
            "task/cube_offset": _bounded_position(xyz - tcp_xyz),
        }


_TASKS = {"reach": _ReachTask, "pick_cube": _PickCubeTask}


class PyBulletCell(RobotBackend):
    """A Franka Panda cell simulated in its own PyBullet physics client."""

    max_gripper_width_m = 2 * FINGER_OPEN_M

    def __init__(self, config: RobotConfig) -> None:
        for camera in config.cameras:
            if camera.name not in SUPPORTED_CAMERAS:
                raise ValueError(
                    f"PyBulletCell has no camera {camera.name!r}; supported cameras: "
                    f"{', '.join(SUPPORTED_CAMERAS)}"
                )
        if config.task.name not in _TASKS:
            raise ValueError(f"unknown task {config.task.name!r}; supported: {', '.join(_TASKS)}")
        self._config = config
        self._cameras: tuple[CameraConfig, ...] = tuple(config.cameras)
        self._physics_hz = float(config.pybullet.physics_hz)
        self._closed = False
        self._client = -1
        self._kinematics = _PandaKinematics()
        try:
            self._client = p.connect(p.GUI if config.pybullet.gui else p.DIRECT)
            if self._client < 0:
                raise RuntimeError("PyBullet could not connect (one GUI per process at most)")
            self._build_scene()
            self._task: _Task = _TASKS[config.task.name](self._client, config)
            self._dynamic_bodies = [self._robot, *self._task.bodies]
            for body in self._dynamic_bodies:
                # A sleeping body would keep its sleep across a restore: never let one sleep.
                p.changeDynamics(
                    body, -1, activationState=p.ACTIVATION_STATE_DISABLE_SLEEPING,
                    physicsClientId=self._client,
                )
            self._reset_posture = self._kinematics.solve(
                np.asarray(config.reset_xyz, dtype=np.float64), config.reset_yaw_rad,
                np.asarray(REST_POSE),
            )
            self._initial_state = p.saveState(physicsClientId=self._client)
        except Exception:
            self.close()
            raise
        self._arm_targets = self._reset_posture.copy()
        self._finger_target = FINGER_OPEN_M

    def _build_scene(self) -> None:
        client = self._client
        p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=client)
        p.setGravity(0.0, 0.0, -9.81, physicsClientId=client)
        p.setTimeStep(1.0 / self._physics_hz, physicsClientId=client)
        table_collision = p.createCollisionShape(
            p.GEOM_BOX, halfExtents=TABLE_HALF_EXTENTS, physicsClientId=client
        )
        table_visual = p.createVisualShape(
            p.GEOM_BOX, halfExtents=TABLE_HALF_EXTENTS, rgbaColor=(0.72, 0.58, 0.42, 1.0),
            physicsClientId=client,
        )
        p.createMultiBody(
            baseMass=0.0, baseCollisionShapeIndex=table_collision,
            baseVisualShapeIndex=table_visual, basePosition=TABLE_CENTRE, physicsClientId=client,
        )
        self._robot = load_panda(client)
        # Same URDF, so the joint and link indices of the kinematic copy apply here too.
        self._arm_joints = self._kinematics.arm_joints
        self._finger_joints = self._kinematics.finger_joints
        self._tcp_link = self._kinematics.tcp_link
        self._hand_link = self._kinematics.hand_link

    def _set_joint_positions(self, arm: np.ndarray, finger: float) -> None:
        for joint, angle in zip(self._arm_joints, arm):
            p.resetJointState(self._robot, joint, float(angle), 0.0, physicsClientId=self._client)
        for joint in self._finger_joints:
            p.resetJointState(self._robot, joint, finger, 0.0, physicsClientId=self._client)

    def _tcp_link_state(self) -> tuple[np.ndarray, tuple, np.ndarray, np.ndarray]:
        state = p.getLinkState(
            self._robot, self._tcp_link, computeLinkVelocity=1, computeForwardKinematics=1,
            physicsClientId=self._client,
        )
        return np.asarray(state[4]), state[5], np.asarray(state[6]), np.asarray(state[7])

    def _apply_motor_targets(self) -> None:
        joints = self._arm_joints + self._finger_joints
        targets = [*self._arm_targets, self._finger_target, self._finger_target]
        n_fingers = len(self._finger_joints)
        p.setJointMotorControlArray(
            self._robot, joints, p.POSITION_CONTROL, targetPositions=targets,
            targetVelocities=[0.0] * len(joints),
            forces=[*ARM_FORCES, *([FINGER_FORCE] * n_fingers)],
            positionGains=[ARM_POSITION_GAIN] * len(self._arm_joints)
            + [FINGER_POSITION_GAIN] * n_fingers,
            velocityGains=[VELOCITY_GAIN] * len(joints),
            physicsClientId=self._client,
        )

    # ------------------------------------------------------------------------- RobotBackend

    def reset(self, rng: np.random.Generator) -> None:
        self._forget_contacts()
        p.restoreState(stateId=self._initial_state, physicsClientId=self._client)
        noise = self._config.pybullet.reset_joint_noise_rad
        posture = self._reset_posture + rng.uniform(-noise, noise, size=len(self._arm_joints))
        posture = np.clip(posture, self._kinematics.arm_lower, self._kinematics.arm_upper)
        self._set_joint_positions(posture, FINGER_OPEN_M)
        self._arm_targets = posture
        self._finger_target = FINGER_OPEN_M
        self._task.randomise(rng)
        self.advance(SETTLE_S)

    def _forget_contacts(self) -> None:
        """Drop the contact caches of the last episode.

        ``restoreState`` resets poses and velocities but keeps the persistent contact points (and
        their warm-start impulses) of body pairs still touching after the restore, so a used cell
        would not replay a fresh cell's episode exactly (micrometres at first, millimetres after a
        grasp). Pulling the bodies apart and running the collision detection once releases every
        such contact.
        """
        for height, body in enumerate(self._dynamic_bodies, start=1):
            p.resetBasePositionAndOrientation(
                body, (0.0, 0.0, 10.0 * height), (0.0, 0.0, 0.0, 1.0), physicsClientId=self._client
            )
        p.performCollisionDetection(physicsClientId=self._client)

    def command(self, target: ArmTarget) -> None:
        xyz = np.asarray(target.xyz, dtype=np.float64)
        self._arm_targets = self._kinematics.solve(xyz, target.yaw, self._arm_targets)
        closed = min(max(float(target.gripper_closed), 0.0), 1.0)
        self._finger_target = FINGER_OPEN_M * (1.0 - closed)

    def advance(self, duration_s: float) -> None:
        self._apply_motor_targets()
        for _ in range(max(1, round(duration_s * self._physics_hz))):
            p.stepSimulation(physicsClientId=self._client)

    def hold(self) -> None:
        """Keep the arm where it is now; the gripper keeps its command (a held cube stays held)."""
        states = p.getJointStates(self._robot, self._arm_joints, physicsClientId=self._client)
        self._arm_targets = np.asarray([state[0] for state in states], dtype=np.float64)

    def read_state(self) -> ArmState:
        xyz, quat, linear, angular = self._tcp_link_state()
        fingers = p.getJointStates(self._robot, self._finger_joints, physicsClientId=self._client)
        width = sum(state[0] for state in fingers)
        return ArmState(
            tcp_xyz=xyz,
            tcp_quat_xyzw=np.asarray(quat),
            tcp_yaw=yaw_of(quat),
            tcp_linear_velocity=linear,
            tcp_angular_velocity=angular,
            gripper_width_m=float(min(max(width, 0.0), self.max_gripper_width_m)),
        )

    def task_signal(self) -> TaskSignal:
        success, shaping = self._task.evaluate(self._tcp_link_state()[0])
        reward = float(success) + self._config.task.dense_reward_weight * shaping
        return TaskSignal(reward=reward, success=success)

    def task_observation_specs(self) -> dict[str, FieldSpec]:
        return self._task.observation_specs() if self._config.task.privileged_state else {}

    def read_task_observation(self) -> dict[str, np.ndarray]:
        if not self._config.task.privileged_state:
            return {}
        return self._task.observation(self._tcp_link_state()[0])

    # ------------------------------------------------------------------------------ cameras

    def camera_specs(self) -> dict[str, FieldSpec]:
        return {c.name: FieldSpec("uint8", (c.height, c.width, 3), 0, 255) for c in self._cameras}

    def read_cameras(self) -> dict[str, np.ndarray]:
        return {camera.name: self._render(camera) for camera in self._cameras}

    def _camera_matrices(self, camera: CameraConfig) -> tuple[Sequence[float], Sequence[float]]:
        aspect = camera.width / camera.height
        if camera.name == "front":
            view = p.computeViewMatrix(FRONT_CAMERA_EYE, FRONT_CAMERA_TARGET, (0.0, 0.0, 1.0))
            projection = p.computeProjectionMatrixFOV(FRONT_CAMERA_FOV_DEG, aspect, 0.1, 3.0)
            return view, projection
        hand = p.getLinkState(
            self._robot, self._hand_link, computeForwardKinematics=1, physicsClientId=self._client
        )
        rotation = np.asarray(p.getMatrixFromQuaternion(hand[5])).reshape(3, 3)
        eye = np.asarray(hand[4]) + rotation @ np.asarray(WRIST_CAMERA_OFFSET)
        target = self._tcp_link_state()[0] + rotation[:, 2] * WRIST_CAMERA_LOOK_AT_DEPTH
        view = p.computeViewMatrix(eye.tolist(), target.tolist(), rotation[:, 0].tolist())
        projection = p.computeProjectionMatrixFOV(WRIST_CAMERA_FOV_DEG, aspect, 0.01, 2.0)
        return view, projection

    def _render(self, camera: CameraConfig) -> np.ndarray:
        view, projection = self._camera_matrices(camera)
        _, _, rgba, _, _ = p.getCameraImage(
            camera.width, camera.height, viewMatrix=view, projectionMatrix=projection,
            renderer=p.ER_TINY_RENDERER, shadow=0, flags=p.ER_NO_SEGMENTATION_MASK,
            physicsClientId=self._client,
        )
        image = np.asarray(rgba, dtype=np.uint8).reshape(camera.height, camera.width, 4)
        return np.ascontiguousarray(image[:, :, :3])

    # -------------------------------------------------------------------------------- close

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._client >= 0:
            p.disconnect(physicsClientId=self._client)
        self._kinematics.close()
