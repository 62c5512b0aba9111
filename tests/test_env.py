"""The actor's gymnasium env on the real PyBullet cell, over ZeroMQ and in-process."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from actor.env import RobotLinkError, make_env
from policies.scripted import ScriptedExpert

from conftest import configure, running_server


def _inproc(config):
    return dataclasses.replace(config, env=dataclasses.replace(config.env, connection="inproc"))


@pytest.mark.parametrize("connection", ["inproc", "zmq"])
@pytest.mark.parametrize("base, cameras", [
    ("sim_panda_reach", ()),
    ("sim_panda_pick_cube", (("front", 32, 32), ("wrist", 32, 32))),
])
def test_env_passes_gymnasium_checker(connection, base, cameras) -> None:
    config = configure(base, cameras=cameras)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if connection == "inproc":
            env = make_env(_inproc(config))
            check_env(env, skip_render_check=True)  # the env has no render modes
            env.close()
        else:
            with running_server(config):
                env = make_env(config)
                check_env(env, skip_render_check=True)  # the env has no render modes
                env.close()
    messages = [str(w.message) for w in caught if "pybullet" not in str(w.filename)]
    assert messages == [], messages


def test_zmq_and_inproc_envs_agree_step_for_step() -> None:
    config = configure("sim_panda_pick_cube", cameras=(("wrist", 24, 24),))
    expert = ScriptedExpert(config.robot)
    local = make_env(_inproc(config))
    with running_server(config):
        remote = make_env(config)
        local_obs, _ = local.reset(seed=3)
        remote_obs, _ = remote.reset(seed=3)
        for _ in range(20):
            for key in local_obs:
                np.testing.assert_array_equal(local_obs[key], remote_obs[key], err_msg=key)
            action = expert.act(local_obs)
            local_obs, local_reward, local_done, _, _ = local.step(action)
            remote_obs, remote_reward, remote_done, _, _ = remote.step(action)
            assert (local_reward, local_done) == (remote_reward, remote_done)
            if local_done:
                break
        assert local_done, "the expert should have lifted the cube within 20 steps"
        remote.close()
    local.close()


def test_scripted_expert_solves_both_tasks_through_the_env() -> None:
    for base in ("sim_panda_reach", "sim_panda_pick_cube"):
        config = _inproc(configure(base, cameras=(), task__dense_reward_weight=0.0))
        env = make_env(config)
        expert = ScriptedExpert(config.robot)
        successes = 0
        for episode in range(5):
            observation, _ = env.reset(seed=episode)
            terminated = truncated = False
            while not (terminated or truncated):
                observation, reward, terminated, truncated, info = env.step(expert.act(observation))
            successes += int(terminated and info["success"] == 1.0 and reward == 1.0)
        env.close()
        assert successes == 5, base


def test_env_raises_a_clear_error_when_no_server_answers() -> None:
    config = configure("sim_panda_reach")
    config = dataclasses.replace(config, env=dataclasses.replace(config.env, timeout_ms=200))
    with pytest.raises(RobotLinkError, match="handshake: no reply from tcp://127.0.0.1:.* within 200 ms"):
        make_env(config)


def test_bad_action_through_the_env_is_an_error_not_a_motion() -> None:
    config = configure("sim_panda_reach", backend="kinematic")
    for connection_config in (_inproc(config), config):
        with running_server(config):
            env = make_env(connection_config)
            observation, _ = env.reset(seed=0)
            with pytest.raises(RobotLinkError, match="non-finite"):
                env.step(np.array([np.nan, 0, 0, 0], np.float32))
            after, *_ = env.step(np.zeros(4, np.float32))
            np.testing.assert_allclose(after["tcp_pose"][:3], observation["tcp_pose"][:3], atol=1e-6)
            env.close()
