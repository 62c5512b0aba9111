"""A tiny continuous-control task for end-to-end learning tests: steer a point to a goal.

Registered as ``tests.point_env:PointReach-v0`` so it can be reached through ``--env-id`` the way
any third-party gymnasium environment would be.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class PointReach(gym.Env):
    """A 2-D point moved by actions in [-1, 1]^2 (0.1 per step) towards a random goal.

    Observation: point and goal positions (4,). Reward: minus the distance to the goal; the episode
    terminates with ``info["success"] = 1`` within 0.05 of the goal.
    """

    metadata = {"render_modes": []}

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._point = np.zeros(2, np.float32)
        self._goal = np.zeros(2, np.float32)

    def _observation(self) -> np.ndarray:
        return np.concatenate([self._point, self._goal]).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._point = self.np_random.uniform(-0.8, 0.8, 2).astype(np.float32)
        self._goal = self.np_random.uniform(-0.8, 0.8, 2).astype(np.float32)
        return self._observation(), {}

    def step(self, action):
        self._point = np.clip(self._point + 0.1 * np.clip(action, -1, 1), -1, 1).astype(np.float32)
        distance = float(np.linalg.norm(self._point - self._goal))
        success = distance < 0.05
        return self._observation(), -distance, success, False, {"success": float(success)}


gym.register("PointReach-v0", entry_point=PointReach, max_episode_steps=30)
