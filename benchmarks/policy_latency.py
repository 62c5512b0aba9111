"""Per-action latency of the generalist policies at benchmark size, on any device (a GPU when lent).

Two groups, each measured as the median wall time of one action selection for one observation
(batch of one, after warm-up), the action copied back to the CPU as the actor needs it:

1. **V-GPS over the diffusion policy** (the V-GPS benchmark's networks: an MLP-ResNet denoiser of
   width 256 and 3 blocks over an 8-step chunk, 2 observations of history, DDIM with 10 steps; a
   [128, 128] critic ensemble with the gripper critic) on pick_cube's state observation: the base
   policy's one sample, and V-GPS with K = 10 and K = 50 candidates sampled and scored in one batch.
   Target (the V-GPS issue): K = 10 costs at most 1.5x one sample.
2. **OpenVLA** through the adapter's own loading path (``policies/openvla.py``: a checkpoint
   directory with remote code, ``AutoProcessor``, one prefill of the multimodal prefix shared by the
   K samples, one batched ``generate`` with the action-token sampler): a random-init model with
   openvla-7b's shapes (Llama-2-7B, DINOv2 ViT-L + SigLIP SO400M at 224 px; ``tests/tiny_vla.py``)
   in bf16, K = 1 and K = 10 samples per action; V-GPS over it (K = 10 candidates scored by the
   same critic as in 1, the default action mapping ``[dx, dy, dz, gripper]``); and, as the baseline
   the shared prefill replaced, K = 10 samples from ``generate`` over K copies of the prefix
   (:func:`sample_tokens_without_shared_prefill`). Target: V-GPS K = 10 at most 1.5x one sample
   here too. ``--openvla-size small`` is a CPU-sized model with the real one's prefix (two ViT
   towers at 224 px, 256 patches, the same prompt; an 8-layer Llama of width 1024, 0.18 B
   parameters); ``--quick`` and ``--openvla-size tiny`` use the tiny test model.

Weights are random: latency depends on the shapes, not the values. The 7B model needs a GPU with
about 30 GB free (it is built there in fp32, saved in bf16: about 15 GB of disk under --work-dir).

    python benchmarks/policy_latency.py --json benchmarks/results/policy_latency_gpu.json
    python benchmarks/policy_latency.py --quick --json /tmp/latency.json      # CPU smoke run

On a lent GPU machine (its python3 has torch, transformers, safetensors and peft, but no network),
the pure-Python packages it lacks travel as wheels: here, once,
``echo /.whl/ >> .git/info/exclude`` and ``python3 -m pip download --no-deps --only-binary=:all:
--python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl gymnasium==1.4.0
farama-notifications==0.0.4 diffusers==0.42.1 importlib_metadata==8.7.0``; there, with ``.whl``
carried: ``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/policy_latency.py --work-dir /tmp/vla
--json $OUT/policy_latency.json`` (about 5 minutes, most of it writing and reading the 7B checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from gymnasium import spaces

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tiny_vla: the random OpenVLA-shaped checkpoint writer

from benchmarks.history_base import HISTORY_PREFIX, HistoryBase  # noqa: E402
from benchmarks.machine import latency_ms, machine_info, print_targets, write_json  # noqa: E402
from hardware_configs.schema import GripperCriticConfig, SACConfig  # noqa: E402
from policies.diffusion import DiffusionPolicy, DiffusionPolicyConfig  # noqa: E402
from policies.vgps import QCritic, VGPSConfig, VGPSPolicy  # noqa: E402

#: pick_cube's state fields the learner observes (``learner.observation_keys`` of
#: sim_panda_pick_cube) and their sizes; tests/test_benchmarks_quick.py checks them against the cell.
PICK_CUBE_STATE_FIELDS = {"tcp_pose": 7, "tcp_velocity": 6, "gripper_width": 1, "task/cube_pose": 7,
                          "task/cube_offset": 3}
PICK_CUBE_ACTION_DIM = 4
INSTRUCTION = "pick up the red cube"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_cube_spaces() -> tuple[spaces.Dict, spaces.Box]:
    observation_space = spaces.Dict({key: spaces.Box(-2.0, 2.0, (size,), np.float32)
                                     for key, size in PICK_CUBE_STATE_FIELDS.items()})
    return observation_space, spaces.Box(-1.0, 1.0, (PICK_CUBE_ACTION_DIM,), np.float32)


def pick_cube_critic(device: torch.device, width: int) -> QCritic:
    """The V-GPS benchmark's critic shape (random weights): two [width, width] critics and the gripper critic."""
    observation_space, action_space = pick_cube_spaces()
    config = SACConfig(hidden_dims=(width, width), gripper_critic=GripperCriticConfig(enabled=True))
    return QCritic(config, observation_space, action_space, tuple(PICK_CUBE_STATE_FIELDS)).to(device)


def pick_cube_state() -> dict[str, np.ndarray]:
    """One pick_cube state observation (batch of one), fixed."""
    rng = np.random.default_rng(0)
    return {key: rng.uniform(-1, 1, (1, size)).astype(np.float32) for key, size in PICK_CUBE_STATE_FIELDS.items()}


def vgps_latency(device: torch.device, ks: list[int], warmup: int, repeats: int, quick: bool) -> dict[str, Any]:
    """Base diffusion policy (one sample) against V-GPS with each K, on one pick_cube observation."""
    observation_space, action_space = pick_cube_spaces()
    keys = tuple(PICK_CUBE_STATE_FIELDS)
    width, blocks, critic_width = (32, 1, 32) if quick else (256, 3, 128)
    diffusion = DiffusionPolicy(DiffusionPolicyConfig(
        horizon=8, n_obs=2, action_steps=1, observation_keys=keys, hidden_dim=width, num_blocks=blocks,
        train_timesteps=100, inference_steps=10, sampler="ddim"), observation_space, action_space, seed=0)
    diffusion.network.eval()
    base = HistoryBase(diffusion).to(device)
    critic = pick_cube_critic(device, critic_width)

    current = pick_cube_state()
    probe = {**current, **{HISTORY_PREFIX + key: np.repeat(value[:, None], 2, axis=1) for key, value in current.items()}}
    arms: dict[str, Any] = {"base": base}
    for k in ks:
        arms[f"vgps_k{k}"] = VGPSPolicy(base, critic, VGPSConfig(num_samples=k, temperature=0.0))
    latency = {}
    for name, policy in arms.items():
        def select(policy: Any = policy) -> np.ndarray:
            with torch.inference_mode():
                return policy.sample(probe, 1)[0, 0].float().cpu().numpy()

        latency[name] = latency_ms(select, warmup, repeats)
        print(f"  {name:<10} p50 {latency[name]['p50_ms']:8.2f} ms", flush=True)
    base_ms = latency["base"]["p50_ms"]
    return {"denoiser": {"hidden_dim": width, "num_blocks": blocks, "horizon": 8, "n_obs": 2, "sampler": "ddim",
                         "inference_steps": 10},
            "critic_hidden": [critic_width, critic_width], "latency": latency,
            "ratios": {f"{name}_over_base": value["p50_ms"] / base_ms for name, value in latency.items()
                       if name != "base"}}


def small_openvla_spec() -> Any:
    """A CPU-sized OpenVLA-shaped model whose multimodal prefix is as long as openvla-7b's: two ViT
    towers at 224 px with 14 px patches (256 patches), the real vocabulary and prompt; an 8-layer
    Llama of width 1024 (0.18 B parameters)."""
    from tiny_vla import TinyVLASpec, VisionTowerSpec

    return TinyVLASpec(hidden_size=1024, intermediate_size=2752, num_layers=8, num_heads=16, num_kv_heads=16,
                       image_size=224, patch_size=14,
                       vision_towers=(VisionTowerSpec(256, 4, 4, 1024), VisionTowerSpec(256, 4, 4, 1024)))


def sample_tokens_without_shared_prefill(policy: Any, observations: Mapping[str, Any], num_samples: int) -> torch.Tensor:
    """``[B, K, A_raw]`` action tokens sampled as the adapter did before it shared the prefill: one
    ``generate`` over K copies of each observation's multimodal prefix, no cache given, so the
    language model runs over the whole prefix B * K times (the same decoding otherwise). The
    baseline of the OpenVLA group, and the reference the adapter's tests compare the shared prefill
    with (same seed, same tokens)."""
    images = policy.images(observations)
    embeddings, attention_mask = policy.prefix_embeddings(policy.prompts(observations, len(images)), images)
    with torch.inference_mode():
        tokens = policy.decode_action_tokens(embeddings.repeat_interleave(num_samples, dim=0),
                                             attention_mask.repeat_interleave(num_samples, dim=0), cache=None)
    return tokens.reshape(len(images), num_samples, policy.raw_action_dim)


def openvla_latency(device: torch.device, size: str, ks: list[int], warmup: int, repeats: int,
                    work: Path) -> dict[str, Any]:
    """Ms per action of the OpenVLA adapter on a random checkpoint of ``size`` ("7b", "small" or "tiny"):
    K samples for each K, K samples without the shared prefill for each K > 1, and V-GPS over it for
    each K > 1 (the critic of :func:`vgps_latency`)."""
    from policies.openvla import OpenVLAConfig, OpenVLAPolicy
    from tiny_vla import TinyVLASpec, build_tiny_vla

    spec = {"7b": TinyVLASpec.openvla_7b, "small": small_openvla_spec, "tiny": TinyVLASpec}[size]()
    build_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.monotonic()
    checkpoint = build_tiny_vla(work / f"openvla-{size}", spec, dtype=build_dtype, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    build_s = time.monotonic() - started
    started = time.monotonic()
    policy = OpenVLAPolicy(OpenVLAConfig(checkpoint=str(checkpoint), unnorm_key="bridge_orig", device=str(device)))
    load_s = time.monotonic() - started
    parameters = sum(p.numel() for p in policy.model.parameters())
    print(f"  OpenVLA-shaped model ({size}): {parameters / 1e9:.2f} B parameters, {policy.dtype}, "
          f"built in {build_s:.0f} s, loaded in {load_s:.0f} s", flush=True)
    image = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    observations = {"image": image, "instruction": [INSTRUCTION], **pick_cube_state()}
    critic = pick_cube_critic(device, 128)
    arms: dict[str, Callable[[], Any]] = {}
    for k in ks:
        arms[f"k{k}"] = lambda k=k: policy.sample(observations, k)[0]
        if k > 1:
            arms[f"k{k}_unshared"] = lambda k=k: sample_tokens_without_shared_prefill(policy, observations, k)
            steered = VGPSPolicy(policy, critic, VGPSConfig(num_samples=k, temperature=0.0))
            arms[f"vgps_k{k}"] = lambda steered=steered: steered.sample(observations, 1)[0, 0]
    latency = {}
    for name, arm in arms.items():
        def select(arm: Callable[[], Any] = arm) -> np.ndarray:
            with torch.inference_mode():
                return arm().float().cpu().numpy()

        latency[name] = latency_ms(select, warmup, repeats)
        print(f"  OpenVLA {name:<14} p50 {latency[name]['p50_ms']:8.1f} ms", flush=True)
    one_sample = latency[f"k{min(ks)}"]["p50_ms"] if min(ks) == 1 else None
    result = {"size": size, "parameters": parameters, "dtype": str(policy.dtype), "build_s": round(build_s, 1),
              "load_s": round(load_s, 1), "latency": latency,
              "ratios": {} if one_sample is None else {f"{name}_over_k1": value["p50_ms"] / one_sample
                                                      for name, value in latency.items() if name != "k1"}}
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="torch device (auto: cuda when there is one)")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 50], help="V-GPS K values")
    parser.add_argument("--openvla-ks", type=int, nargs="+", default=[1, 10], help="OpenVLA samples per action")
    parser.add_argument("--openvla-size", choices=("7b", "small", "tiny", "none"), default="7b",
                        help="the OpenVLA-shaped model (small: CPU-sized with the real prefix; none: skip the group)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--openvla-repeats", type=int, default=20)
    parser.add_argument("--work-dir", type=Path, help="where the random checkpoint goes (default: a temp dir)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small networks, the tiny OpenVLA")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.ks + args.openvla_ks) or args.repeats < 1 or args.openvla_repeats < 1:
        parser.error("K values and repeats must be >= 1")
    device = resolve_device(args.device)
    if args.quick:
        args.openvla_size = "tiny" if args.openvla_size == "7b" else args.openvla_size
        args.warmup, args.repeats, args.openvla_repeats = 1, 3, 2
    if args.openvla_size == "7b" and device.type != "cuda":
        parser.error("the 7B-shaped OpenVLA needs a GPU: --openvla-size small, tiny or none on the CPU")
    torch.manual_seed(0)
    machine = machine_info(torch=torch.__version__, torch_threads=torch.get_num_threads(), device=str(device),
                           gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    print(f"1. V-GPS over the diffusion policy on {device}", flush=True)
    results: dict[str, Any] = {"machine": machine, "quick": args.quick, "device": str(device),
                               "vgps": vgps_latency(device, args.ks, args.warmup, args.repeats, args.quick)}
    targets = {}
    if 10 in args.ks:
        targets["vgps_k10_latency_le_1.5x_base"] = results["vgps"]["ratios"]["vgps_k10_over_base"] <= 1.5
    if args.openvla_size != "none":
        print(f"2. OpenVLA ({args.openvla_size}) on {device}", flush=True)
        with tempfile.TemporaryDirectory(prefix="steerl-openvla-") as scratch:
            work = args.work_dir or Path(scratch)
            results["openvla"] = openvla_latency(device, args.openvla_size, args.openvla_ks, args.warmup,
                                                 args.openvla_repeats, work)
        if "vgps_k10_over_k1" in results["openvla"]["ratios"]:
            targets["openvla_vgps_k10_latency_le_1.5x_one_sample"] = results["openvla"]["ratios"]["vgps_k10_over_k1"] <= 1.5
    results["targets"] = targets
    print_targets(targets)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
