"""The robot link benchmark runs end to end in quick mode and writes a complete JSON report.

Timings are not asserted (they depend on the machine); only that every number is there, finite
and positive, and that the targets are reported as booleans.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "robot_link.py"

LATENCY_SECTIONS = ("zmq_state", "zmq_images", "zmq_floor_state", "zmq_floor_images", "http_json",
                    "http_json_new_connection")
LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "steps")
REALTIME_KEYS = ("period_mean_ms", "period_p50_ms", "jitter_p50_ms", "jitter_p99_ms", "jitter_max_ms", "steps")
TARGETS = ("zmq_state_p99_le_0.5ms", "zmq_images_p99_le_1.5ms", "http_over_zmq_p50_ge_10",
           "realtime_jitter_p99_le_1ms")
MACHINE_KEYS = ("cpu_model", "cpu_count", "python", "numpy", "pyzmq", "protobuf", "date")


def _positive_finite(value: object, where: str) -> None:
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
    assert math.isfinite(value) and value > 0, f"{where}: {value!r} is not a positive finite number"


def test_robot_link_quick(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    completed = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], cwd=REPO,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    results = json.loads(out.read_text())

    assert results["quick"] is True
    for key in MACHINE_KEYS:
        assert results["machine"][key], f"machine.{key} missing"
    for section in LATENCY_SECTIONS:
        for key in LATENCY_KEYS:
            _positive_finite(results[section][key], f"{section}.{key}")
        assert results[section]["p50_ms"] <= results[section]["p99_ms"] <= results[section]["max_ms"]
    for key in REALTIME_KEYS:
        _positive_finite(results["realtime"][key], f"realtime.{key}")
    _positive_finite(results["http_over_zmq_p50_ratio"], "http_over_zmq_p50_ratio")
    for variant in ("state", "images"):
        pieces = results["breakdown"][variant]
        # Hooks on public functions only; the script skips (and reports) private ones it cannot find.
        for key in ("client_env_step_total_us", "server_cell_step_total", "server_safety_target",
                    "server_encode_observation", "client_decode_observation"):
            _positive_finite(pieces[key], f"breakdown.{variant}.{key}")
        assert isinstance(pieces["missing_hooks"], list)
    assert set(results["targets"]) == set(TARGETS)
    assert all(isinstance(flag, bool) for flag in results["targets"].values())
    assert "PASS" in completed.stdout or "FAIL" in completed.stdout


def test_learning_benchmark_quick(tmp_path: Path) -> None:
    out, png = tmp_path / "learning.json", tmp_path / "curve.png"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "learning.py"), "--quick", "--demos", "2", "--compare-without-demos",
         "--compare-with-operator", "--skip-demos-variant", "--parallel", "--seed", "3", "--json", str(out), "--png", str(png)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    results = json.loads(out.read_text())
    assert results["quick"] is True and set(results["variants"]) == {"operator", "no_demos"} and results["seed"] == 3
    for name, variant in results["variants"].items():
        assert variant["env_steps"] >= results["steps"], name
        assert variant["curve"] and all(0.0 <= p["success_rate"] <= 1.0 for p in variant["curve"]), name
        assert [p["env_steps"] for p in variant["curve"]] == sorted(p["env_steps"] for p in variant["curve"])
        assert variant["final_eval"]["episodes"] == 3 and 0.0 <= variant["final_eval"]["success_rate"] <= 1.0
        assert variant["best_policy_eval"]["episodes"] == 3
        assert variant["best_policy_eval"]["selected_by"]["success_rate"] == max(p["success_rate"] for p in variant["curve"])
        assert sum(b["episodes"] for b in variant["training_episodes"]) >= 1
        assert sum(b["episodes"] for b in variant["training_curve"]) == sum(b["episodes"] for b in variant["training_episodes"])
        _positive_finite(variant["train_wall_s"], f"{name}.train_wall_s")
    assert results["variants"]["operator"]["demos"] == 2 and results["variants"]["no_demos"]["demos"] == 0
    # Only the operator variant has someone intervening.
    assert max(b["intervention_rate"] for b in results["variants"]["operator"]["training_episodes"]) > 0.0
    assert all(b["intervention_rate"] == 0.0 for b in results["variants"]["no_demos"]["training_episodes"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetune_benchmark_quick(tmp_path: Path) -> None:
    out, png, work = tmp_path / "finetune.json", tmp_path / "curves.png", tmp_path / "work"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "finetune.py"), "--quick", "--parallel", "--offline-ratio", "0.25",
         "--work-dir", str(work),
         "--json", str(out), "--png", str(png)], cwd=REPO, capture_output=True, text=True, timeout=420)
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    results = json.loads(out.read_text())
    assert results["quick"] is True and set(results["variants"]) == {"wsrl", "wsrl_no_warmup", "rlpd"}
    assert results["pretrained_eval"]["episodes"] == 3
    for name, variant in results["variants"].items():
        assert variant["env_steps"] >= results["steps"], name
        assert variant["curve"] and variant["final_eval"]["episodes"] == 3, name
        assert set(variant["collapse"]) == {"window_end_steps", "evaluations", "min_success", "dip_below_pretrained",
                                            "min_success_whole_run"}, name
    # The warm-started variants started from the Cal-QL checkpoint (their Q log says so); RLPD from the data.
    for name in ("wsrl", "wsrl_no_warmup"):
        q_log = (work / name / "warm_start_q.json").read_text()
        assert str(work / "calql") in q_log, name
    assert results["variants"]["rlpd"]["demos"] == 1 and not (work / "rlpd" / "warm_start_q.json").exists()
    # --offline-ratio reaches the warm-started variants' learners only.
    for name, ratio in (("wsrl", 0.25), ("wsrl_no_warmup", 0.25), ("rlpd", 0.0)):
        assert f"offline_ratio: {ratio}" in (work / f"{name}.yaml").read_text(), name
    assert set(results["targets"]) == {"wsrl_no_post_switch_collapse", "wsrl_final_ge_rlpd"}
    assert all(isinstance(flag, bool) for flag in results["targets"].values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A trial: one variant from the same pre-training (not recorded or trained again), its own gripper epsilon.
    checkpoint_files = sorted(path.name for path in (work / "calql").rglob("*"))
    trial = tmp_path / "trial.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "finetune.py"), "--quick", "--variants", "wsrl",
         "--reuse-pretraining", "--gripper-epsilon", "0.3", "--work-dir", str(work), "--json", str(trial)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert "reusing the offline data" in completed.stdout
    results = json.loads(trial.read_text())
    assert set(results["variants"]) == {"wsrl"} and set(results["targets"]) == {"wsrl_no_post_switch_collapse"}
    assert results["calql"]["wall_s"] is None and results["gripper_exploration_epsilon"] == 0.3
    assert "exploration_epsilon: 0.3" in (work / "wsrl.yaml").read_text()
    assert sorted(path.name for path in (work / "calql").rglob("*")) == checkpoint_files


def test_steps_to_target_and_the_operator_comparison() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.learning import operator_comparison, steps_to_target

    def curve(*rates: float) -> list[dict]:
        return [{"env_steps": 1000 * (i + 1), "success_rate": rate} for i, rate in enumerate(rates)]

    assert steps_to_target(curve(0.5, 1.0, 0.6, 0.9, 0.9)) == {"first_step_at_target": 2000,
                                                              "first_step_at_target_confirmed": 4000}
    assert steps_to_target(curve(0.2, 0.95)) == {"first_step_at_target": 2000, "first_step_at_target_confirmed": None}

    def bins(*rates: float) -> list[dict]:
        return [{"episodes": 20, "intervention_rate": rate} for rate in rates] + [{"episodes": 1, "intervention_rate": 1.0}]

    demos = {**steps_to_target(curve(0.5, 1.0, 0.6, 0.9, 0.9)), "training_episodes": bins(0.0, 0.0)}
    helped = {**steps_to_target(curve(0.9, 1.0)), "training_episodes": bins(0.3, 0.1, 0.12)}
    result = operator_comparison({"demos": demos, "operator": helped})
    assert result["steps_ratio_operator_over_demos"] == {"first_step_at_target": 0.5,
                                                        "first_step_at_target_confirmed": 0.25}
    assert result["intervention_rate_by_bin"] == [0.3, 0.1, 0.12]  # the 1-episode bin is too small to count
    assert result["targets"] == {"operator_halves_steps_to_target_first_eval": True,
                                 "operator_halves_steps_to_target_confirmed": True,
                                 "operator_intervention_rate_falls": True}
    stubborn = {**helped, "training_episodes": bins(0.3, 0.25)}
    assert not operator_comparison({"demos": demos, "operator": stubborn})["targets"]["operator_intervention_rate_falls"]


def test_the_operator_comparison_over_seeds_uses_medians() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.learning import median_steps, operator_comparison_over_seeds

    assert median_steps([3000, None, 1000]) == 3000 and median_steps([None, None, 1000]) is None
    assert median_steps([1000, 3000]) == 2000 and median_steps([1000, None]) is None

    def run(first: int | None, confirmed: int | None, *rates: float) -> dict:
        return {"first_step_at_target": first, "first_step_at_target_confirmed": confirmed,
                "training_episodes": [{"episodes": 20, "intervention_rate": rate} for rate in rates]}

    per_seed = {1: {"demos": run(4000, 8000), "operator": run(2000, 2000, 0.4, 0.1)},
                2: {"demos": run(6000, None), "operator": run(1000, 4000, 0.3, 0.05)},
                3: {"demos": run(2000, 3000), "operator": run(2500, 2500, 0.2, 0.1)}}
    result = operator_comparison_over_seeds(per_seed, steps=12_000)
    assert result["median_steps_to_target"]["first_step_at_target"] == {"demos": 4000, "operator": 2000}
    assert result["steps_ratio_operator_over_demos"]["first_step_at_target"] == 0.5
    assert result["steps_ratio_operator_over_demos"]["first_step_at_target_confirmed"] == 2500 / 8000
    assert result["steps_ratio_per_seed"]["3"]["first_step_at_target"] == 1.25  # one seed's ratio can be poor
    assert result["targets"] == {"operator_halves_median_steps_to_target_first_eval": True,
                                 "operator_halves_median_steps_to_target_confirmed": True,
                                 "operator_intervention_rate_falls_every_seed": True}
    # The demos variant's median run never confirmed the target: the ratio is bounded by the budget.
    per_seed[1]["demos"] = run(4000, None)
    bounded = operator_comparison_over_seeds(per_seed, steps=12_000)
    assert bounded["median_steps_to_target"]["first_step_at_target_confirmed"]["demos"] is None
    assert bounded["steps_ratio_operator_over_demos"]["first_step_at_target_confirmed"] == 2500 / 12_000
    # One seed whose operator share does not fall fails that target.
    per_seed[2]["operator"] = run(1000, 4000, 0.3, 0.3)
    assert not operator_comparison_over_seeds(per_seed, 12_000)["targets"]["operator_intervention_rate_falls_every_seed"]


def test_redraw_draws_each_seeds_curves_and_the_operator_figure(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    import cv2

    from benchmarks.learning import redraw

    def variant(*rates: float) -> dict:
        bins = [{"env_steps_until": 1000 * (i + 1), "episodes": 10, "success_rate": 0.5, "intervention_rate": rate}
                for i, rate in enumerate(rates)]
        return {"curve": [{"env_steps": 1000, "success_rate": 0.2}, {"env_steps": 3000, "success_rate": 0.9}],
                "final_eval": {"success_rate": 0.9, "episodes": 50}, "best_policy_eval": None, "train_wall_s": 60.0,
                "training_episodes": bins, "training_curve": bins}

    results = {"config": "sim_panda_pick_cube", "steps": 3000, "seeds": [0, 1],
               "per_seed": {str(seed): {"variants": {"demos": variant(0.0, 0.0), "operator": variant(0.4, 0.1, 0.0)}}
                            for seed in (0, 1)}}
    redraw(results, tmp_path / "hil.png")
    for name in ("hil_seed0.png", "hil_seed1.png", "hil_operator.png"):
        image = cv2.imread(str(tmp_path / name))
        assert image is not None and image.shape[1] == 900, name
    operator = cv2.imread(str(tmp_path / "hil_operator.png"))
    seed0_colour = np.array([160, 60, 160], np.uint8)  # BGR of the first seed's intervention line
    assert (operator == seed0_colour).all(axis=2).sum() > 200
    assert not (tmp_path / "hil.png").exists()


def test_policy_latency_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "policy_latency.py"), "--quick", "--device",
                                "cpu", "--ks", "10", "--json", str(out)],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["quick"] is True
    assert set(results["vgps"]["latency"]) == {"base", "vgps_k10"}
    for name, value in {**results["vgps"]["latency"], **results["openvla"]["latency"]}.items():
        _positive_finite(value["p50_ms"], name)
    assert set(results["openvla"]["latency"]) == {"k1", "k10", "k10_unshared", "vgps_k10"}
    assert results["openvla"]["size"] == "tiny"
    assert results["vgps"]["ratios"]["vgps_k10_over_base"] == (
        results["vgps"]["latency"]["vgps_k10"]["p50_ms"] / results["vgps"]["latency"]["base"]["p50_ms"])
    assert results["openvla"]["ratios"]["vgps_k10_over_k1"] == (
        results["openvla"]["latency"]["vgps_k10"]["p50_ms"] / results["openvla"]["latency"]["k1"]["p50_ms"])
    assert isinstance(results["targets"]["vgps_k10_latency_le_1.5x_base"], bool)
    assert isinstance(results["targets"]["openvla_vgps_k10_latency_le_1.5x_one_sample"], bool)
    # The 7B-shaped model is refused on the CPU with a message naming the option.
    refused = subprocess.run([sys.executable, str(REPO / "benchmarks" / "policy_latency.py"), "--device", "cpu"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--openvla-size" in refused.stderr


def test_policy_latency_uses_pick_cubes_observation_layout() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.policy_latency import PICK_CUBE_ACTION_DIM, PICK_CUBE_STATE_FIELDS
    from hardware_configs.schema import load_config
    from robot_server.cell import RobotCell

    config = load_config("sim_panda_pick_cube")
    cell = RobotCell(config)
    try:
        observation_space, action_space = cell.spaces.observation_space(), cell.spaces.action_space()
    finally:
        cell.close()
    assert tuple(PICK_CUBE_STATE_FIELDS) == tuple(config.learner.observation_keys)
    assert {key: observation_space[key].shape for key in PICK_CUBE_STATE_FIELDS} == {
        key: (size,) for key, size in PICK_CUBE_STATE_FIELDS.items()}
    assert action_space.shape == (PICK_CUBE_ACTION_DIM,)


def test_camera_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "cameras.json"
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cameras.py"), "--quick", "--json", str(out)],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    results = json.loads(out.read_text())
    assert results["quick"] is True
    for key in ("cpu_model", "cpu_count", "python", "numpy", "pyrealsense2", "opencv", "date"):
        assert results["machine"][key], f"machine.{key} missing"
    for section in ("frame_age", "frame_age_since_receive", "driver_latency", "assembly", "step"):
        for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "samples"):
            _positive_finite(results[section][key], f"{section}.{key}")
        assert results[section]["p50_ms"] <= results[section]["p99_ms"] <= results[section]["max_ms"]
    assert results["setup"]["steps"] >= 20 and results["frame_age"]["samples"] == 2 * results["setup"]["steps"]
    assert len(results["delivered_fps"]) == 2
    for name, fps in results["delivered_fps"].items():
        _positive_finite(fps, f"delivered_fps.{name}")
    assert set(results["targets"]) == {"frame_age_p99_le_38.3ms", "assembly_p99_le_2ms"}
    assert all(isinstance(flag, bool) for flag in results["targets"].values())
    assert "PASS" in completed.stdout or "FAIL" in completed.stdout


def test_sac_sweep_quick(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sac_sweep.py"), "--quick", "--json", str(out),
         "learner.sac.utd_ratio=2", "robot.task.dense_reward_weight=0.3"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    results = json.loads(out.read_text())
    assert results["overrides"] == ["learner.sac.utd_ratio=2", "robot.task.dense_reward_weight=0.3"]
    assert [point["env_steps"] for point in results["curve"]] == [150, 300]
    assert all(0.0 <= point["success_rate"] <= 1.0 for point in results["curve"])
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sac_sweep.py"), "--quick", "learner.sac.nope=1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no field 'nope'" in bad.stderr


def test_vgps_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "vgps.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "vgps.py"), "--quick", "--json", str(out),
         "--work-dir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    results = json.loads(out.read_text())
    assert results["quick"] is True
    for key in ("cpu_model", "cpu_count", "python", "numpy", "torch", "date"):
        assert results["machine"][key], f"machine.{key} missing"
    data = results["data"]
    assert data["episodes"] == sum(level["episodes"] for level in data["levels"]) >= 4
    assert 0 <= data["successes"] <= data["episodes"] and data["steps"] > 0
    assert set(results["arms"]) == {"base", "vgps_k10", "vgps_k50", "random_k10", "oracle_k10", "ddpm20"}
    for name, arm in results["arms"].items():
        assert arm["episodes"] == 3 and len(arm["per_episode_success"]) == 3, name
        assert 0.0 <= arm["success_rate"] <= 1.0 and arm["ci95"][0] <= arm["success_rate"] <= arm["ci95"][1], name
        _positive_finite(arm["ms_per_action_p50"], f"{name}.ms_per_action_p50")
        if name != "base":
            assert 0.0 <= arm["vs_base"]["p_better_one_sided"] <= 1.0, name
    assert results["arms"]["vgps_k50"]["k"] == 50 and results["arms"]["random_k10"]["random_control"] is True
    for name in ("base", "vgps_k10", "vgps_k50", "ddpm20"):
        _positive_finite(results["latency"][name]["p50_ms"], f"latency.{name}")
    for name in ("vgps_k10_over_base", "vgps_k50_over_base", "ddpm20_over_base"):
        _positive_finite(results["latency_ratios"][name], name)
    by_threads = results["latency_by_torch_threads"]
    assert by_threads["1"]["latency_ratios"] == results["latency_ratios"] and len(by_threads) >= 1
    for threads, measured in by_threads.items():
        assert set(measured["latency"]) == set(results["latency"]), threads
    assert set(results["targets"]) == {"vgps_k10_ge_base_plus_15pts", "vgps_k50_ge_base_plus_15pts",
                                       "random_control_not_better_than_base", "vgps_k10_latency_le_1.5x_base",
                                       "ddim_matches_ddpm_success", "ddim_ge_8x_faster_than_ddpm"}
    assert all(isinstance(flag, bool) for flag in results["targets"].values())
    assert "PASS" in completed.stdout or "FAIL" in completed.stdout
    # The saved data, policy and critic evaluate again without retraining.
    again = tmp_path / "again.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "vgps.py"), "--quick", "--skip-ddpm", "--ks", "10",
         "--load-from", str(tmp_path / "work"), "--json", str(again)], cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    reloaded = json.loads(again.read_text())
    assert set(reloaded["arms"]) == {"base", "vgps_k10", "random_k10", "oracle_k10"} and reloaded["data"] == data
    # Latency alone, on the saved policy and critic: no episodes, only the latency targets.
    latency_only = tmp_path / "latency.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "vgps.py"), "--quick", "--latency-only", "--load-from",
         str(tmp_path / "work"), "--json", str(latency_only)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    measured = json.loads(latency_only.read_text())
    assert measured["arms"] == {} and set(measured["latency"]) == {"base", "vgps_k10", "vgps_k50", "ddpm20"}
    assert set(measured["targets"]) == {"vgps_k10_latency_le_1.5x_base", "ddim_ge_8x_faster_than_ddpm"}


def test_scale_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--quick", "--modes", "collect", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["machine"]["cpu_count"] >= 1
    runs = {run["actors"]: run for run in results["runs"]}
    assert set(runs) == {1, 2}
    for run in runs.values():
        assert run["steps_per_s"] > 0 and run["updates_per_s"] == 0  # collect: the learner only ingests
        assert run["missing"] == 0 and run["weights_bytes"] > 0 and 100 < run["bytes_per_transition"] < 10_000
    assert results["ratios"]["collect_2_over_1"] == runs[2]["steps_per_s"] / runs[1]["steps_per_s"]
    assert "no missing transition in any run" in results["targets"]


def test_parl_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "parl.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "parl.py"), "--quick", "--work-dir", str(tmp_path / "work"),
         "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["parl"]["env_steps"] >= 300
    for key in ("before", "before_zero_noise", "after", "after_distilled_base"):
        assert results[key]["episodes"] == 3 and 0.0 <= results[key]["success_rate"] <= 1.0
    assert results["critic_gain"]["logged"] >= 1 and results["critic_gain"]["mean"] >= 0.0  # >= 0 by construction
    assert results["success_gain"] == results["after"]["success_rate"] - results["before"]["success_rate"]
    assert len(results["targets"]) == 2


def test_dashboard_benchmark_quick(tmp_path: Path) -> None:
    from conftest import chromium_or_skip

    chromium_or_skip()
    out = tmp_path / "dashboard.json"
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dashboard.py"), "--quick", "--json", str(out)],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True and set(results["arms"]) == {"off", "page"}
    for arm in ("off", "page"):
        assert results["arms"][arm]["periods"] >= 50
        _positive_finite(results["arms"][arm]["period_median_ms"], f"{arm}.period_median_ms")
    _positive_finite(results["arms"]["page"]["publish_median_us"], "publish_median_us")
    assert results["frame_to_screen_ms"]["frames_drawn"] > 10
    _positive_finite(results["frame_to_screen_ms"]["median"], "frame_to_screen_ms.median")
    assert all(isinstance(met, bool) for met in results["targets"].values())

