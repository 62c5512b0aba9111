"""Build a randomly initialised, OpenVLA-shaped checkpoint directory, offline, with any sizes.

The directory this module writes loads exactly like ``openvla/openvla-7b`` does: ``config.json``
carries an ``auto_map`` that names *remote code* shipped in the directory (here
``configuration_tiny_openvla.py``, ``modeling_tiny_openvla.py``, ``processing_tiny_openvla.py``,
standing in for the checkpoint's ``*_prismatic.py``), so ``policies.openvla`` loads it through
``trust_remote_code`` and the checkpoint's own auto-map keys (``AutoConfig`` and the
``AutoModelForVision2Seq`` key that transformers 5 no longer has as a class), and the processor
through ``AutoProcessor`` (``preprocessor_config.json``'s ``auto_map``).

What is the same as the real checkpoint (``openvla/openvla-7b``, files ``config.json``,
``configuration_prismatic.py``, ``modeling_prismatic.py``, ``processing_prismatic.py``):

* the layout of the model: ``vision_backbone`` (one or two fused towers; pixel values stacked
  along channels, three per tower; features of each tower's *second-to-last* layer, concatenated
  along the feature axis), ``projector`` (the Prismatic MLP, 3 layers when fused), and
  ``language_model`` (a ``LlamaForCausalLM``); the forward pass inserts the projected patches right
  after ``<s>``;
* the config fields the adapter reads: ``norm_stats[key]["action"]`` with ``q01``/``q99``/``mask``,
  ``n_action_bins``, ``pad_to_multiple_of`` and ``text_config.vocab_size`` (the padded size);
* the vocabulary layout: 32000 un-padded ids (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``"▁"`` at 29871,
  the 256 action bins at 31744..31999), ``<PAD>`` at 32000, embeddings padded to a multiple of 64.

What differs (a test double, not a port): the towers are ``SiglipVisionModel`` built from a config
(not timm DINOv2/SigLIP), the tokenizer is word-level (not SentencePiece), the image processor does a
plain resize and normalise with PIL and numpy, and the model has no generation code of its own (the
adapter drives ``language_model.generate`` itself; see ``policies/openvla.py``).

:class:`TinyVLASpec` holds every size; :meth:`TinyVLASpec.openvla_7b` gives the real model's shapes
(random weights) for benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

TOKENIZER_WORDS = (
    "In", "Out", ":", "?", "What", "action", "should", "the", "robot", "take", "to", "pick", "up",
    "place", "put", "push", "open", "close", "drawer", "cube", "red", "blue", "green", "block", "on",
    "in", "of", "a", "and", "left", "right", "move", "grasp", "lift", "towards", "ball", "cup", "bowl",
    ".", ",", "'",
)
EMPTY_TOKEN = "\u2581"  # SentencePiece's word-boundary piece, id 29871 in Llama 2's vocabulary

MODULE_CONFIGURATION = "configuration_tiny_openvla"
MODULE_MODELING = "modeling_tiny_openvla"
MODULE_PROCESSING = "processing_tiny_openvla"


@dataclass(frozen=True)
class VisionTowerSpec:
    """One ViT tower (a ``SiglipVisionModel``); the model reads its second-to-last layer."""

    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 64


@dataclass(frozen=True)
class TinyVLASpec:
    """Every size of the model, the tokenizer and the statistics :func:`build_tiny_vla` writes."""

    vocab_size: int = 32000  # un-padded (Llama 2); the last n_action_bins ids are the action bins
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    empty_token_id: int = 29871
    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 1
    num_heads: int = 2
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    image_size: int = 32
    patch_size: int = 8
    vision_towers: tuple[VisionTowerSpec, ...] = (VisionTowerSpec(), VisionTowerSpec())
    initializer_range: float = 0.02
    # norm_stats[dataset]["action"]: q01 / q99 / mask per action dimension (7 = xyz, rpy, gripper)
    norm_stats: Mapping[str, Any] = field(default_factory=lambda: default_norm_stats())

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.pad_to_multiple_of
        return -(-(self.vocab_size + 1) // multiple) * multiple  # + 1: <PAD>

    @classmethod
    def openvla_7b(cls, **changes: Any) -> "TinyVLASpec":
        """The shapes of ``openvla/openvla-7b`` (Llama-2-7B, DINOv2 ViT-L/14 + SigLIP SO400M/14 at
        224 px), with random weights; ``changes`` override fields."""
        spec = cls(
            hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
            image_size=224, patch_size=14,
            vision_towers=(VisionTowerSpec(1024, 24, 16, 4096), VisionTowerSpec(1152, 27, 16, 4304)),
        )
        return dataclasses.replace(spec, **changes)


def default_norm_stats() -> dict[str, Any]:
    """Two datasets of 7-D statistics in OpenVLA's layout (a gripper left un-normalised by the mask)."""
    return {
        "bridge_orig": {
            "action": {
                "q01": [-0.03, -0.04, -0.03, -0.15, -0.16, -0.2, 0.0],
                "q99": [0.03, 0.04, 0.035, 0.15, 0.16, 0.2, 1.0],
                "mask": [True, True, True, True, True, True, False],
            }
        },
        "fractal20220817_data": {
            "action": {
                "q01": [-0.2, -0.2, -0.2, -0.3, -0.3, -0.4, 0.0],
                "q99": [0.2, 0.2, 0.2, 0.3, 0.3, 0.4, 1.0],
                "mask": [True, True, True, True, True, True, False],
            }
        },
    }


# --- remote code written into the checkpoint directory -------------------------------------------

CONFIGURATION_SOURCE = '''"""Configuration of the tiny OpenVLA stand-in (written by tests/tiny_vla.py)."""

from transformers import LlamaConfig, PretrainedConfig


class TinyOpenVLAConfig(PretrainedConfig):
    model_type = "openvla"

    def __init__(self, norm_stats=None, n_action_bins=256, text_config=None, vision_towers=None,
                 image_size=32, patch_size=8, pad_to_multiple_of=64, pad_token_id=32000, **kwargs):
        self.norm_stats = norm_stats
        self.n_action_bins = n_action_bins
        self.vision_towers = [dict(tower) for tower in (vision_towers or [])]
        self.image_size = image_size
        self.patch_size = patch_size
        self.pad_to_multiple_of = pad_to_multiple_of
        if isinstance(text_config, LlamaConfig):
            self.text_config = text_config
        else:
            self.text_config = LlamaConfig(**(text_config or {}))
        super().__init__(pad_token_id=pad_token_id, **kwargs)
'''

MODELING_SOURCE = '''"""Prismatic-layout model of the tiny OpenVLA stand-in (written by tests/tiny_vla.py)."""

import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedModel, SiglipVisionConfig, SiglipVisionModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tiny_openvla import TinyOpenVLAConfig


class TinyVisionBackbone(nn.Module):
    """One ViT per tower; pixel values stacked along channels (3 per tower); features of each
    tower's second-to-last layer, concatenated along the feature axis."""

    def __init__(self, config):
        super().__init__()
        self.towers = nn.ModuleList(
            SiglipVisionModel(SiglipVisionConfig(
                hidden_size=tower["hidden_size"], num_hidden_layers=tower["num_layers"],
                num_attention_heads=tower["num_heads"], intermediate_size=tower["intermediate_size"],
                image_size=config.image_size, patch_size=config.patch_size, num_channels=3))
            for tower in config.vision_towers
        )
        self.embed_dim = sum(tower["hidden_size"] for tower in config.vision_towers)

    def forward(self, pixel_values):
        chunks = torch.split(pixel_values, 3, dim=1)
        features = [tower(pixel_values=chunk, output_hidden_states=True).hidden_states[-2]
                    for tower, chunk in zip(self.towers, chunks)]
        return torch.cat(features, dim=2)


class TinyProjector(nn.Module):
    def __init__(self, fused, vision_dim, llm_dim):
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
        self.act = nn.GELU()

    def forward(self, patches):
        hidden = self.fc2(self.act(self.fc1(patches)))
        return self.fc3(self.act(hidden)) if self.fused else hidden


class TinyOpenVLAForActionPrediction(PreTrainedModel):
    config_class = TinyOpenVLAConfig
    base_model_prefix = "model"
    _no_split_modules = ["TinyProjector"]

    def __init__(self, config):
        super().__init__(config)
        self.vision_backbone = TinyVisionBackbone(config)
        self.projector = TinyProjector(len(config.vision_towers) > 1, self.vision_backbone.embed_dim,
                                       config.text_config.hidden_size)
        self.language_model = LlamaForCausalLM(config.text_config)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.text_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif hasattr(module, "position_embedding") and isinstance(module.position_embedding, nn.Embedding):
            nn.init.normal_(module.position_embedding.weight, mean=0.0, std=std)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, **kwargs):
        """Full (uncached) multimodal forward: patches inserted after <s>, as Prismatic does."""
        embeddings = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            patches = self.projector(self.vision_backbone(pixel_values.to(embeddings.dtype)))
            embeddings = torch.cat([embeddings[:, :1], patches, embeddings[:, 1:]], dim=1)
            if attention_mask is not None:
                ones = attention_mask.new_ones(patches.shape[:2])
                attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
            if labels is not None:
                ignore = labels.new_full(patches.shape[:2], -100)
                labels = torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1)
        output = self.language_model(inputs_embeds=embeddings, attention_mask=attention_mask, labels=labels,
                                     use_cache=False)
        return CausalLMOutputWithPast(loss=output.loss, logits=output.logits)
'''

PROCESSING_SOURCE = '''"""Image processor and processor of the tiny OpenVLA stand-in (written by tests/tiny_vla.py)."""

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BatchFeature, ImageProcessingMixin
from transformers.processing_utils import ProcessorMixin


class TinyOpenVLAImageProcessor(ImageProcessingMixin):
    """Resize (bicubic) to image_size, scale to [0, 1], normalise once per tower, stack along channels."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size=32, means=None, stds=None, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.means = [list(mean) for mean in (means or [[0.5, 0.5, 0.5]])]
        self.stds = [list(std) for std in (stds or [[0.5, 0.5, 0.5]])]

    def __call__(self, images, return_tensors=None, **kwargs):
        if not isinstance(images, (list, tuple)):
            images = [images]
        batch = []
        for image in images:
            image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
            towers = [(pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
                      for mean, std in zip(self.means, self.stds)]
            batch.append(np.concatenate(towers, axis=2).transpose(2, 0, 1))
        return BatchFeature(data={"pixel_values": np.stack(batch)}, tensor_type=return_tensors)


class TinyOpenVLAProcessor(ProcessorMixin):
    """Text to the tokenizer, images to the image processor (PrismaticProcessor's call signature)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, text=None, images=None, padding=False, truncation=None, max_length=None,
                 return_tensors="pt", **kwargs):
        pixel_values = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        text_inputs = self.tokenizer(text, return_tensors=return_tensors, padding=padding,
                                     truncation=truncation, max_length=max_length)
        if pixel_values.shape[0] != text_inputs["input_ids"].shape[0]:
            raise ValueError("Batch is malformed; expected same number of images and text inputs!")
        return BatchFeature(data={**text_inputs, "pixel_values": pixel_values})
'''


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True))


def build_tokenizer(spec: TinyVLASpec):
    """A word-level fast tokenizer with Llama 2's id layout (see the module docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    first_action = spec.vocab_size - spec.n_action_bins
    if not len(TOKENIZER_WORDS) + 3 <= spec.empty_token_id < first_action:
        raise ValueError(f"empty_token_id {spec.empty_token_id} must lie between the words and the action bins")
    tokens = ["<unk>", "<s>", "</s>", *TOKENIZER_WORDS]
    tokens += [f"<filler_{index}>" for index in range(len(tokens), spec.empty_token_id)]
    tokens.append(EMPTY_TOKEN)
    tokens += [f"<filler_{index}>" for index in range(len(tokens), first_action)]
    tokens += [f"<action_bin_{spec.vocab_size - index}>" for index in range(first_action, spec.vocab_size)]
    vocab = {token: index for index, token in enumerate(tokens)}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 1)])
    backend.add_special_tokens(["<unk>", "<s>", "</s>", "<PAD>"])  # <PAD> gets id vocab_size
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<PAD>", model_max_length=2048,
                                   padding_side="right")


def build_tiny_vla(directory: str | Path, spec: TinyVLASpec = TinyVLASpec(), *, seed: int = 0,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   auto_map_model_key: str = "AutoModelForVision2Seq") -> Path:
    """Write a random OpenVLA-shaped checkpoint into ``directory`` (created) and return it.

    ``device``/``dtype``: where the random weights are built (``"cuda"`` and ``torch.bfloat16`` for a
    7B-shaped model); they are saved as safetensors either way.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for module, source in ((MODULE_CONFIGURATION, CONFIGURATION_SOURCE), (MODULE_MODELING, MODELING_SOURCE),
                           (MODULE_PROCESSING, PROCESSING_SOURCE)):
        (directory / f"{module}.py").write_text(source)
    config_ref = f"{MODULE_CONFIGURATION}.TinyOpenVLAConfig"
    model_ref = f"{MODULE_MODELING}.TinyOpenVLAForActionPrediction"
    config_class = get_class_from_dynamic_module(config_ref, directory, local_files_only=True)
    model_class = get_class_from_dynamic_module(model_ref, directory, local_files_only=True)

    text_config = dict(
        vocab_size=spec.padded_vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings, initializer_range=spec.initializer_range,
        bos_token_id=1, eos_token_id=2, pad_token_id=spec.vocab_size, tie_word_embeddings=False,
    )
    config = config_class(
        norm_stats=json.loads(json.dumps(spec.norm_stats)), n_action_bins=spec.n_action_bins,
        text_config=text_config, vision_towers=[dataclasses.asdict(tower) for tower in spec.vision_towers],
        image_size=spec.image_size, patch_size=spec.patch_size, pad_to_multiple_of=spec.pad_to_multiple_of,
        pad_token_id=spec.vocab_size,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config)
    model.to(dtype).save_pretrained(directory)
    del model

    config_path = directory / "config.json"
    saved = json.loads(config_path.read_text())
    saved["auto_map"] = {"AutoConfig": config_ref, auto_map_model_key: model_ref}
    _write_json(config_path, saved)

    build_tokenizer(spec).save_pretrained(directory)
    towers = len(spec.vision_towers)
    _write_json(directory / "preprocessor_config.json", {
        "auto_map": {"AutoImageProcessor": f"{MODULE_PROCESSING}.TinyOpenVLAImageProcessor",
                     "AutoProcessor": f"{MODULE_PROCESSING}.TinyOpenVLAProcessor"},
        "image_processor_type": "TinyOpenVLAImageProcessor",
        "processor_class": "TinyOpenVLAProcessor",
        "image_size": spec.image_size,
        "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]][:towers] + [[0.5, 0.5, 0.5]] * max(0, towers - 2),
        "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]][:towers] + [[0.5, 0.5, 0.5]] * max(0, towers - 2),
    })
    return directory
