"""The OpenVLA adapter against a tiny random OpenVLA-shaped checkpoint (tests/tiny_vla.py).

The checkpoint is real transformers code loaded the way openvla-7b is (remote code named by
``auto_map``, ``AutoProcessor``), with openvla-7b's vocabulary layout (action bins 31744..31999,
``"▁"`` at 29871, ``<PAD>`` at 32000, embeddings padded to 32064) and OpenVLA-layout statistics.
Hand-computed values below use ``edges = linspace(-1, 1, 256)`` (step 2/255), so the bin centres are
``-1 + (2 i + 1) / 255``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from policies.base import load_policy
from policies.openvla import (
    ActionMapping,
    ActionStats,
    ActionTokenLayout,
    OpenVLAConfig,
    OpenVLAPolicy,
    build_prompt,
    check_checkpoint,
)
from tiny_vla import TinyVLASpec, build_tiny_vla, default_norm_stats

# A large init makes the random model's outputs depend visibly on image and instruction, and its
# greedy choices far from ties.
SPEC = TinyVLASpec(initializer_range=0.5)
BRIDGE = default_norm_stats()["bridge_orig"]["action"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_vla(tmp_path_factory.mktemp("openvla") / "tiny-openvla", SPEC)


@pytest.fixture(scope="module")
def policy(checkpoint) -> OpenVLAPolicy:
    return OpenVLAPolicy(OpenVLAConfig(checkpoint=str(checkpoint), unnorm_key="bridge_orig", device="cpu"))


def images(count: int, seed: int = 0, size: tuple[int, int] = (24, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *size, 3), dtype=np.uint8)


def observations(instructions: list[str], seed: int = 0) -> dict:
    return {"image": images(len(instructions), seed), "instruction": instructions}


def copy_checkpoint(source: Path, target: Path, drop: tuple[str, ...] = ()) -> Path:
    """A checkpoint directory of symlinks to ``source``'s files, less ``drop``."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in drop:
            (target / path.name).symlink_to(path)
    return target


def rewrite_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.unlink()  # a symlink into the shared checkpoint: replace it, do not write through it
    path.write_text(json.dumps(content))


# --- prompt, tokens, statistics (pure) ------------------------------------------------------------


def test_prompt_is_openvlas_with_the_instruction_lower_cased():
    prompt = build_prompt(" Pick Up the Red Cube ")
    assert prompt == "In: What action should the robot take to pick up the red cube?\nOut:"
    with pytest.raises(ValueError, match="instruction is empty"):
        build_prompt("  ")


def test_prompt_tokens_start_with_bos_and_end_with_the_empty_token(policy):
    prompt = build_prompt("pick up the red cube")
    (ids,) = policy.prompt_token_ids([prompt])
    expected = policy.processor.tokenizer(prompt)["input_ids"]
    assert expected[0] == 1 and expected[-2:] == [policy.processor.tokenizer.convert_tokens_to_ids("Out"),
                                                  policy.processor.tokenizer.convert_tokens_to_ids(":")]
    assert ids.tolist() == expected + [29871]
    keep = torch.ones(1, 3, dtype=torch.long)  # a prompt that already ends with the empty token keeps one
    assert policy._token_rows({"input_ids": torch.tensor([[1, 5, 29871]]), "attention_mask": keep})[0].tolist() == [
        1, 5, 29871]
    with pytest.raises(ValueError, match="did not start the prompt with <s>"):
        policy._token_rows({"input_ids": torch.tensor([[5, 5, 5]]), "attention_mask": keep})


def test_action_tokens_are_the_last_256_ids_of_the_unpadded_vocabulary(policy):
    layout = policy.layout
    assert layout == ActionTokenLayout(vocab_size=32000, n_bins=256)  # 32064 - 64
    assert (layout.first_token_id, layout.token_ids[-1]) == (31744, 31999)


def test_token_to_bin_centre_decoding_by_hand():
    layout = ActionTokenLayout(32000, 256)
    tokens = torch.tensor([31999, 31872, 31808, 31745, 31744, 0, 32010])
    expected = [-1 + 1 / 255,  # V - 1 -> centre 0
                0.0,  # V - 128 -> centre 127, between edges 127 and 128
                -1 + 383 / 255,  # V - 192 -> centre 191
                1 - 1 / 255, 1 - 1 / 255,  # V - 255 and V - 256 both -> the last centre, 254
                1 - 1 / 255, -1 + 1 / 255]  # out of range ids clip to the extreme centres
    assert torch.allclose(layout.decode(tokens), torch.tensor(expected), atol=1e-6)


def test_encoding_matches_numpy_digitize_and_round_trips_within_half_a_bin():
    layout = ActionTokenLayout(32000, 256)
    actions = np.array([-1.0, -0.3, 0.0, 0.5, 0.999, 1.0, 1.7])
    edges = np.linspace(-1, 1, 256)
    expected = 32000 - np.digitize(np.clip(actions, -1, 1), edges)  # prismatic ActionTokenizer.__call__
    tokens = layout.encode(torch.tensor(actions))
    assert tokens.tolist() == expected.tolist()
    assert tokens.tolist()[:4] == [31999, 31910, 31872, 31808]  # d = floor((a + 1) * 127.5) + 1
    decoded = layout.decode(tokens).double()
    assert torch.all((decoded - torch.tensor(np.clip(actions, -1, 1))).abs() <= 1 / 255 + 1e-9)


def test_unnormalisation_uses_q01_q99_where_masked_and_passes_the_gripper_through():
    key, stats = ActionStats.from_norm_stats(default_norm_stats(), "bridge_orig")
    assert key == "bridge_orig" and stats.mask == (True,) * 6 + (False,)
    normalised = torch.tensor([-1.0, 0.0, 1.0, 0.5, -0.5, 0.25, 0.7])
    expected = torch.tensor([-0.03, 0.0, 0.035, 0.075, -0.08, 0.05, 0.7])  # 0.5 (n + 1)(q99 - q01) + q01
    assert torch.allclose(stats.unnormalize(normalised), expected, atol=1e-7)
    assert torch.allclose(stats.normalize(stats.unnormalize(normalised)), normalised, atol=1e-5)
    no_mask = {"d": {"action": {"q01": [0.0, -2.0], "q99": [1.0, 2.0]}}}  # absent mask: all dims normalised
    assert torch.allclose(ActionStats.from_norm_stats(no_mask, None)[1].unnormalize(torch.tensor([0.0, 0.5])),
                          torch.tensor([0.5, 1.0]))


def test_decode_raw_by_hand(policy):
    tokens = torch.tensor([31999, 31872, 31744, 31808, 31999, 31872, 31872])
    centre_low, centre_high, centre_191 = -1 + 1 / 255, 1 - 1 / 255, -1 + 383 / 255
    expected = [0.5 * (centre_low + 1) * 0.06 - 0.03,  # x: q01 -0.03, q99 0.03
                0.0,  # y: centre 0 -> the middle of [-0.04, 0.04]
                0.5 * (centre_high + 1) * 0.065 - 0.03,  # z: q01 -0.03, q99 0.035
                0.5 * (centre_191 + 1) * 0.3 - 0.15,
                0.5 * (centre_low + 1) * 0.32 - 0.16,
                0.0,
                0.0]  # gripper: mask false, the centre itself
    assert torch.allclose(policy.decode_raw(tokens), torch.tensor(expected), atol=1e-6)


# --- generation -----------------------------------------------------------------------------------


def test_every_generated_token_is_an_action_token_even_at_high_temperature(policy):
    hot = dataclasses.replace(policy.config, temperature=50.0)
    policy.config, saved = hot, policy.config
    try:
        tokens = policy.generate_action_tokens(observations(["pick up the cube", "open the drawer"]), 32)
    finally:
        policy.config = saved
    assert tokens.shape == (2, 32, 7)
    assert int(tokens.min()) >= 31744 and int(tokens.max()) <= 31999
    assert len(torch.unique(tokens)) > 100  # nearly uniform over the 256 bins, so not a lucky draw
    # Without the mask, the random model's favourite token is a word or filler, not an action bin.
    embeddings, mask = policy.prefix_embeddings(policy.prompts(observations(["pick up the cube"]), 1), policy.images(
        observations(["pick up the cube"])))
    logits = policy.model.language_model(inputs_embeds=embeddings, attention_mask=mask).logits[0, -1]
    assert int(logits.argmax()) not in policy.layout.token_ids


def test_k_samples_come_from_one_generate_call_and_one_vision_pass(policy, monkeypatch):
    calls, vision_batches = [], []
    original = policy.model.language_model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(policy.model.language_model, "generate", counting_generate)
    hook = policy.model.vision_backbone.register_forward_hook(lambda m, i, o: vision_batches.append(i[0].shape[0]))
    try:
        actions = policy.sample(observations(["pick up the cube", "put the red block in the bowl"]), 5)
    finally:
        hook.remove()
    assert actions.shape == (2, 5, 4) and actions.dtype == torch.float32 and actions.device == policy.device
    assert torch.all(actions.abs() <= 1.0)
    assert len(calls) == 1 and vision_batches == [2]
    rows = calls[0]["inputs_embeds"]
    assert rows.shape[0] == 10  # B * K rows, each observation's K rows together
    assert torch.equal(rows[0], rows[4]) and not torch.equal(rows[4], rows[5])


def test_k_samples_share_one_prefill_of_the_prefix(policy):
    """The decoder runs over the prefix once per observation; every later call runs B * K rows of
    one new position each (the last prefix position, then the action tokens)."""
    decoder_inputs = []

    def record(module, args, kwargs):  # the prefix arrives as embeddings, generated tokens as ids
        inputs = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        decoder_inputs.append(tuple(inputs.shape[:2]))

    hook = policy.model.language_model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        batch = observations(["pick up the cube", "put the red block in the bowl"])
        prefix_length = policy.prefix_embeddings(policy.prompts(batch, 2), policy.images(batch))[0].shape[1]
        decoder_inputs.clear()
        policy.generate_action_tokens(batch, 5)
    finally:
        hook.remove()
    assert decoder_inputs == [(2, prefix_length - 1)] + [(10, 1)] * policy.raw_action_dim


def test_shared_prefill_samples_what_k_separate_prefixes_sample(policy):
    """The same seed gives the same tokens as generate over K copies of each (left-padded) prefix
    without a cache: sharing the prefill changes the cost, not the distribution."""
    from benchmarks.policy_latency import sample_tokens_without_shared_prefill

    batch = observations(["push the cube", "put the red block on the blue block and move left"], seed=4)
    torch.manual_seed(11)
    reference = sample_tokens_without_shared_prefill(policy, batch, 4)
    torch.manual_seed(11)
    shared = policy.generate_action_tokens(batch, 4)
    assert shared.shape == (2, 4, policy.raw_action_dim) and torch.equal(shared, reference)
    assert len({tuple(row.tolist()) for row in shared[1]}) > 1


def test_action_token_sampler_draws_from_the_tempered_softmax_over_action_tokens():
    """Gumbel-max: argmax of the processed scores is distributed as softmax(logits / T) restricted to
    the action tokens; no other token is ever chosen; without a temperature it is the argmax."""
    from policies.openvla import action_token_sampler

    layout = ActionTokenLayout(vocab_size=40, n_bins=4)  # action tokens 36..39; 40.. is padding
    logits = torch.zeros(1, 48)
    logits[0, 36:40] = torch.tensor([0.0, 1.0, 2.0, -1.0])
    logits[0, 5] = logits[0, 44] = 10.0  # a text token and a padded row that would win unmasked
    torch.manual_seed(0)
    draws = 40_000
    chosen = action_token_sampler(layout, 0.5)(None, logits.expand(draws, -1).clone()).argmax(-1)
    assert chosen.min() >= 36 and chosen.max() <= 39
    frequencies = torch.bincount(chosen - 36, minlength=4).float() / draws
    expected = torch.softmax(logits[0, 36:40] / 0.5, dim=0)
    assert torch.allclose(frequencies, expected, atol=0.01), (frequencies, expected)
    greedy = action_token_sampler(layout, None)(None, logits.clone())
    assert greedy.argmax(-1).item() == 38 and torch.isinf(greedy[0, :36]).all() and torch.isinf(greedy[0, 40:]).all()


def test_greedy_decoding_is_deterministic_and_fills_all_k_slots(policy):
    batch = observations(["pick up the cube", "open the drawer"])
    torch.manual_seed(1)
    first = policy.predict_raw(batch, 3, deterministic=True)
    torch.manual_seed(2)
    second = policy.predict_raw(batch, 3, deterministic=True)
    assert first.shape == (2, 3, 7) and torch.equal(first, second)
    assert torch.equal(first[:, 0], first[:, 2])
    sampled = policy.predict_raw(batch, 8)
    assert len({tuple(row.tolist()) for row in sampled[0]}) > 1


def test_padding_a_batch_does_not_change_greedy_actions(policy):
    short, long = "push the cube", "put the red block on the blue block and move left"
    batch = {"image": images(2, seed=3), "instruction": [short, long]}
    together = policy.generate_action_tokens(batch, 1, deterministic=True)
    alone = [policy.generate_action_tokens({"image": batch["image"][i:i + 1], "instruction": [text]}, 1, True)
             for i, text in enumerate([short, long])]
    assert torch.equal(together, torch.cat(alone))


def test_image_and_instruction_change_the_actions(policy):
    """Guards against the failure of openvla/openvla issue 346: an image the model never sees."""
    black_and_white = np.stack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)])
    tokens = policy.generate_action_tokens({"image": black_and_white, "instruction": ["pick up the cube"] * 2}, 1, True)
    assert not torch.equal(tokens[0], tokens[1])
    same_image = np.repeat(black_and_white[:1], 2, axis=0)
    two_tasks = {"image": same_image, "instruction": ["pick up the cube", "open the drawer"]}
    tokens = policy.generate_action_tokens(two_tasks, 1, True)
    assert not torch.equal(tokens[0], tokens[1])


def test_prefix_matches_the_checkpoints_own_multimodal_forward(policy):
    batch = observations(["pick up the red cube"], seed=5)
    prompts, pil_images = policy.prompts(batch, 1), policy.images(batch)
    embeddings, mask = policy.prefix_embeddings(prompts, pil_images)
    ours = policy.model.language_model(inputs_embeds=embeddings, attention_mask=mask).logits[:, -1]
    pixel_values = policy.processor(text=prompts, images=pil_images, return_tensors="pt")["pixel_values"]
    theirs = policy.model(input_ids=policy.prompt_token_ids(prompts)[0][None], pixel_values=pixel_values).logits[:, -1]
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_sample_is_predict_raw_through_the_mapping(policy):
    batch = observations(["pick up the cube", "open the drawer"])
    torch.manual_seed(7)
    raw = policy.predict_raw(batch, 4)
    torch.manual_seed(7)
    actions = policy.sample(batch, 4)
    assert torch.equal(actions, policy.config.mapping(raw))
    assert policy.action_dim == 4 and policy.raw_action_dim == 7


def test_fixed_instruction_and_single_observation_act(policy):
    fixed = dataclasses.replace(policy.config, instruction="Pick up the cube")
    policy.config, saved = fixed, policy.config
    try:
        without_key = policy.generate_action_tokens({"image": images(2)}, 1, True)
        with_key = policy.generate_action_tokens({"image": images(2), "instruction": ["pick up the cube"] * 2}, 1, True)
        other = policy.generate_action_tokens({"image": images(2), "instruction": ["open the drawer"] * 2}, 1, True)
        action = policy.act({"image": images(1)[0]}, deterministic=True)
    finally:
        policy.config = saved
    assert torch.equal(without_key, with_key) and not torch.equal(with_key, other)  # the batch's key wins
    assert action.shape == (4,) and action.dtype == np.float32


def test_center_crop_keeps_the_middle():
    from PIL import Image

    from policies.openvla import _center_crop

    frame = np.zeros((40, 40, 3), np.uint8)
    frame[10:30, 10:30] = 255  # the central half of each side = a quarter of the area
    cropped = np.asarray(_center_crop(Image.fromarray(frame), 0.25))
    assert cropped.shape == (40, 40, 3) and cropped[2:-2, 2:-2].min() > 200


# --- mapping into steerl's action space -----------------------------------------------------------


def test_default_mapping_scales_xyz_drops_rotation_and_flips_the_gripper():
    mapping = ActionMapping()
    assert mapping == ActionMapping.for_robot() and mapping.dim == 4 and mapping.raw_dim == 7
    raw = torch.tensor([[0.015, -0.03, 0.0, 0.3, 0.2, 0.1, 1.0],  # gripper 1 = open (RLDS)
                        [0.06, 0.0, -0.009, 0.0, 0.0, 0.0, 0.0]])  # 0 = closed; x beyond the scale clips
    expected = torch.tensor([[0.5, -1.0, 0.0, -1.0],  # steerl: -1 open
                             [1.0, 0.0, -0.3, 1.0]])  # +1 closed
    assert torch.allclose(mapping(raw), expected, atol=1e-6)


def test_mapping_round_trip_and_yaw():
    mapping = ActionMapping.for_robot(xyz_scale_m=0.05, use_yaw=True, yaw_scale_rad=0.2)
    assert mapping.source_dims == (0, 1, 2, 5, 6) and mapping.dim == 5
    normalised = torch.rand(3, 5) * 2 - 1
    assert torch.allclose(mapping(mapping.inverse(normalised)), normalised, atol=1e-6)
    raw = torch.tensor([[0.01, -0.02, 0.04, 0.5, -0.5, 0.1, 0.25]])
    back = mapping.inverse(mapping(raw))
    kept = list(mapping.source_dims)
    assert torch.allclose(back[:, kept], raw[:, kept], atol=1e-6) and torch.equal(back[:, [3, 4]], torch.zeros(1, 2))
    from hardware_configs.schema import ActionConfig

    assert ActionMapping.from_action_config(ActionConfig(use_yaw=True, xyz_scale_m=0.05, yaw_scale_rad=0.2)) == mapping
    assert ActionMapping.from_dict(mapping.to_dict()) == mapping
    from_numpy = ActionMapping(source_dims=np.array([0, 6]), scales=[np.float32(0.5), -0.5], offsets=[0, 0.5])
    assert from_numpy.source_dims == (0, 6) and type(from_numpy.scales[0]) is float


@pytest.mark.parametrize("fields, message", [
    ({"source_dims": (0, 1, 7), "scales": (1, 1, 1), "offsets": (0, 0, 0)}, r"source_dims\[2\] = 7"),
    ({"source_dims": (0, 1), "scales": (1.0, 0.0), "offsets": (0, 0)}, r"scales\[1\]"),
    ({"source_dims": (0, 1), "scales": (1.0,), "offsets": (0, 0)}, "one entry per output dimension"),
    ({"raw_dim": 0}, "raw_dim"),
])
def test_bad_mapping_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        ActionMapping(**fields)
    with pytest.raises(ValueError, match="unknown ActionMapping field"):
        ActionMapping.from_dict({"scale": 1})


# --- config, save and load ------------------------------------------------------------------------


@pytest.mark.parametrize("changes, field_name", [
    ({"temperature": 0.0}, "temperature"),
    ({"dtype": "int8"}, "dtype"),
    ({"image_key": ""}, "image_key"),
    ({"instruction": "  "}, "instruction"),
    ({"center_crop_scale": 1.5}, "center_crop_scale"),
    ({"device": "warp-drive"}, "device"),
    ({"empty_token_id": -1}, "empty_token_id"),
    ({"checkpoint": ""}, "checkpoint"),
])
def test_config_errors_name_the_field(changes, field_name):
    with pytest.raises(ValueError, match=f"OpenVLAConfig.{field_name}"):
        OpenVLAConfig(**{"checkpoint": "/models/openvla-7b", **changes})


def test_config_from_dict_rejects_unknown_fields_and_builds_the_mapping():
    config = OpenVLAConfig.from_dict({"checkpoint": "ckpt", "mapping": ActionMapping.for_robot(use_yaw=True).to_dict()})
    assert config.mapping.dim == 5
    assert OpenVLAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown OpenVLAConfig field.*temprature"):
        OpenVLAConfig.from_dict({"checkpoint": "ckpt", "temprature": 1.0})
    config = OpenVLAConfig(checkpoint="ckpt", device="cpu")
    assert config.resolved_dtype(config.resolved_device()) == torch.float32
    assert config.resolved_dtype(torch.device("cuda")) == torch.bfloat16


def test_save_writes_policy_json_and_load_policy_restores_it(policy, checkpoint, tmp_path):
    policy.save(tmp_path / "saved")
    content = json.loads((tmp_path / "saved" / "policy.json").read_text())
    assert content["kind"] == "openvla" and content["config"]["checkpoint"] == str(checkpoint.resolve())
    assert content["config"]["unnorm_key"] == "bridge_orig" and content["config"]["mapping"]["raw_dim"] == 7
    assert sorted(path.name for path in (tmp_path / "saved").iterdir()) == ["policy.json"]

    loaded = load_policy(tmp_path / "saved")
    assert isinstance(loaded, OpenVLAPolicy) and loaded.device == torch.device("cpu")
    batch = observations(["pick up the cube", "open the drawer"])
    assert torch.equal(loaded.sample(batch, 2, deterministic=True), policy.sample(batch, 2, deterministic=True))

    # A hand-written policy.json may give the checkpoint relative to the policy directory.
    relative = tmp_path / "relative"
    relative.mkdir()
    (relative / "model").symlink_to(checkpoint, target_is_directory=True)
    config = {**content["config"], "checkpoint": "model", "unnorm_key": "fractal20220817_data"}
    (relative / "policy.json").write_text(json.dumps({"kind": "openvla", "config": config}))
    assert load_policy(relative).unnorm_key == "fractal20220817_data"


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop, message", [
    (("config.json",), r"config\.json: missing"),
    (("model.safetensors",), r"no weights, expected model\.safetensors"),
    (("tokenizer.json",), r"no tokenizer vocabulary, expected tokenizer\.json or tokenizer\.model"),
    (("tokenizer_config.json",), r"tokenizer_config\.json: missing"),
    (("preprocessor_config.json",), r"preprocessor_config\.json: missing"),
    (("modeling_tiny_openvla.py",),
     r"modeling_tiny_openvla\.py: missing \(named by auto_map\['AutoModelForVision2Seq'\]"),
])
def test_missing_checkpoint_files_are_named(checkpoint, tmp_path, drop, message):
    broken = copy_checkpoint(checkpoint, tmp_path / "broken", drop)
    with pytest.raises(FileNotFoundError, match=message):
        OpenVLAPolicy(OpenVLAConfig(checkpoint=str(broken), unnorm_key="bridge_orig"))


def test_missing_directory_sharded_weights_and_pickled_weights(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_checkpoint(tmp_path / "nowhere")
    pickled = copy_checkpoint(checkpoint, tmp_path / "pickled", ("model.safetensors",))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin are pickle files"):
        check_checkpoint(pickled)
    sharded = copy_checkpoint(checkpoint, tmp_path / "sharded", ("model.safetensors",))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (sharded / "model-00001-of-00002.safetensors").symlink_to(checkpoint / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors: weight shard"):
        check_checkpoint(sharded)


def test_unknown_or_ambiguous_unnorm_key_lists_the_available_ones(checkpoint):
    with pytest.raises(ValueError,
                       match=r"no unnorm_key 'libero_spatial'; available: bridge_orig, fractal20220817_data"):
        OpenVLAPolicy(OpenVLAConfig(checkpoint=str(checkpoint), unnorm_key="libero_spatial"))
    with pytest.raises(ValueError, match=r"config\.json: norm_stats holds 2 datasets, set unnorm_key"):
        OpenVLAPolicy(OpenVLAConfig(checkpoint=str(checkpoint)))


def test_dataset_statistics_json_adds_fine_tuned_keys(checkpoint, tmp_path):
    tuned = copy_checkpoint(checkpoint, tmp_path / "tuned")
    stats = {"q01": [-0.01] * 6 + [0.0], "q99": [0.01] * 6 + [1.0], "mask": [True] * 6 + [False]}
    (tuned / "dataset_statistics.json").write_text(json.dumps({"libero_spatial": {"action": stats}}))
    policy = OpenVLAPolicy(OpenVLAConfig(checkpoint=str(tuned), unnorm_key="libero_spatial"))
    assert policy.stats.q99[0] == 0.01


def test_wrong_action_dimension(checkpoint, tmp_path):
    six = ActionMapping(source_dims=(0, 1, 2, 5), scales=(0.03, 0.03, 0.03, -0.5), offsets=(0, 0, 0, 0.5), raw_dim=6)
    with pytest.raises(ValueError, match=r"norm_stats\['bridge_orig'\]\['action'\] has 7 dimensions but "
                                         r"OpenVLAConfig.mapping.raw_dim is 6"):
        OpenVLAPolicy(OpenVLAConfig(checkpoint=str(checkpoint), unnorm_key="bridge_orig", mapping=six))
    uneven = copy_checkpoint(checkpoint, tmp_path / "uneven")
    rewrite_json(uneven / "config.json", lambda c: c["norm_stats"]["bridge_orig"]["action"].update(q99=[1.0] * 6))
    with pytest.raises(ValueError, match=r"config\.json: norm_stats\['bridge_orig'\]\['action'\]: q01, q99 and mask "
                                         r"have different lengths \(7, 6, 7\)"):
        OpenVLAPolicy(OpenVLAConfig(checkpoint=str(uneven), unnorm_key="bridge_orig"))
    with pytest.raises(ValueError, match="raw actions of size 7"):
        ActionMapping()(torch.zeros(1, 6))


@pytest.mark.parametrize("batch, message", [
    ({"image": images(2), "instruction": ["pick up the cube", "  "]}, r"observation 'instruction'\[1\] is empty"),
    ({"image": images(2), "instruction": ["pick up the cube"]}, "holds 1 instructions for a batch of 2"),
    ({"image": images(1), "instruction": "pick up the cube"}, "one string per observation"),
    ({"image": images(1)}, "no instruction: the observations have no key 'instruction'"),
    ({"image": images(1).astype(np.float32), "instruction": ["x"]}, r"must be uint8 \[B, H, W, 3\]"),
    ({"image": images(1)[0], "instruction": ["x"]}, r"must be uint8 \[B, H, W, 3\]"),
    ({"rgb": images(1), "instruction": ["x"]}, "no image key 'image'"),
])
def test_bad_observations(policy, batch, message):
    with pytest.raises(ValueError, match=message):
        policy.sample(batch, 2)
