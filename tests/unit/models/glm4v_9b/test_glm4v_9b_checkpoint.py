"""Our GLM-4V-9B has the original checkpoint's tensor names and shapes, and loads the tiny original-layout files.

Reference list, and where it comes from:
- module names, nesting and the sizes of every Linear / Conv2d / Embedding / norm: the module tree of
  THUDM/glm-4v-9b printed with `print(model)` in a published article on serving GLM-4V with FastAPI
  (kept in the project's seed material, /work/shared/seed);
- the full tensor list, including raw parameters that `print(model)` does not show (`patch_embedding.cls_embedding`,
  `vision.boi`, `vision.eoi`) and which modules have biases: the GLM-4V converter of li-plus/chatglm.cpp
  (`chatglm_cpp/convert.py`, `ChatGLM4VConverter.dump_model`), checked against the original `visual.py`
  (cls_embedding (1, 1792), boi/eoi (1, 1, 4096)).
The published full-size numbers are below; `sizes(config)` states how each depends on config.json, so the same
table checks the full model (on the meta device) and the tiny checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlmserve.models.glm4v_9b import ChatGLMConfig, ChatGLMForConditionalGeneration, matches
from vlmserve.models.glm4v_9b.config import GLM4V_9B_CONFIG

# name template -> shape in symbols; {i} is a decoder layer, {j} a vision layer
REFERENCE: list[tuple[str, tuple[str, ...]]] = [
    ("transformer.embedding.word_embeddings.weight", ("V", "H")),  # Embedding(151552, 4096)
    ("transformer.encoder.layers.{i}.input_layernorm.weight", ("H",)),  # RMSNorm()
    ("transformer.encoder.layers.{i}.self_attention.query_key_value.weight", ("QKV", "H")),  # 4096 -> 4608
    ("transformer.encoder.layers.{i}.self_attention.query_key_value.bias", ("QKV",)),  # bias=True
    ("transformer.encoder.layers.{i}.self_attention.dense.weight", ("H", "H")),  # bias=False
    ("transformer.encoder.layers.{i}.post_attention_layernorm.weight", ("H",)),
    ("transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight", ("F2", "H")),  # 4096 -> 27392, bias=False
    ("transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight", ("H", "F")),  # 13696 -> 4096, bias=False
    ("transformer.encoder.final_layernorm.weight", ("H",)),
    ("transformer.output_layer.weight", ("V", "H")),  # Linear(4096, 151552, bias=False)
    ("transformer.vision.patch_embedding.proj.weight", ("VH", "C", "P", "P")),  # Conv2d(3, 1792, 14, 14)
    ("transformer.vision.patch_embedding.proj.bias", ("VH",)),
    ("transformer.vision.patch_embedding.cls_embedding", ("1", "VH")),
    ("transformer.vision.patch_embedding.position_embedding.weight", ("NPOS", "VH")),  # Embedding(6401, 1792)
    ("transformer.vision.transformer.layers.{j}.input_layernorm.weight", ("VH",)),  # LayerNorm((1792,))
    ("transformer.vision.transformer.layers.{j}.input_layernorm.bias", ("VH",)),
    ("transformer.vision.transformer.layers.{j}.attention.query_key_value.weight", ("VQKV", "VH")),  # -> 5376
    ("transformer.vision.transformer.layers.{j}.attention.query_key_value.bias", ("VQKV",)),
    ("transformer.vision.transformer.layers.{j}.attention.dense.weight", ("VH", "VH")),
    ("transformer.vision.transformer.layers.{j}.attention.dense.bias", ("VH",)),
    ("transformer.vision.transformer.layers.{j}.mlp.fc1.weight", ("VF", "VH")),  # 1792 -> 15360
    ("transformer.vision.transformer.layers.{j}.mlp.fc1.bias", ("VF",)),
    ("transformer.vision.transformer.layers.{j}.mlp.fc2.weight", ("VH", "VF")),
    ("transformer.vision.transformer.layers.{j}.mlp.fc2.bias", ("VH",)),
    ("transformer.vision.transformer.layers.{j}.post_attention_layernorm.weight", ("VH",)),
    ("transformer.vision.transformer.layers.{j}.post_attention_layernorm.bias", ("VH",)),
    ("transformer.vision.linear_proj.linear_proj.weight", ("H", "H")),  # GLU: Linear(4096, 4096, bias=False)
    ("transformer.vision.linear_proj.norm1.weight", ("H",)),  # LayerNorm((4096,), eps=1e-05)
    ("transformer.vision.linear_proj.norm1.bias", ("H",)),
    ("transformer.vision.linear_proj.dense_h_to_4h.weight", ("F", "H")),  # 4096 -> 13696
    ("transformer.vision.linear_proj.gate_proj.weight", ("F", "H")),
    ("transformer.vision.linear_proj.dense_4h_to_h.weight", ("H", "F")),
    ("transformer.vision.conv.weight", ("H", "VH", "2", "2")),  # Conv2d(1792, 4096, 2, stride 2)
    ("transformer.vision.conv.bias", ("H",)),
    ("transformer.vision.boi", ("1", "1", "H")),
    ("transformer.vision.eoi", ("1", "1", "H")),
]

#: the numbers printed in the published module tree (40 x GLMBlock, 63 x TransformerLayer)
PUBLISHED = {"V": 151552, "H": 4096, "QKV": 4608, "F2": 27392, "F": 13696, "VH": 1792, "C": 3, "P": 14,
             "NPOS": 6401, "VQKV": 5376, "VF": 15360, "layers": 40, "vision_layers": 63}


def sizes(config: dict) -> dict[str, int]:
    """How each published number follows from config.json."""
    vision = config["vision_config"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else config["num_attention_heads"]
    return {
        "V": config["padded_vocab_size"], "H": config["hidden_size"],
        "QKV": (config["num_attention_heads"] + 2 * groups) * config["kv_channels"],
        "F2": 2 * config["ffn_hidden_size"], "F": config["ffn_hidden_size"], "VH": vision["hidden_size"],
        "C": vision["in_channels"], "P": vision["patch_size"], "NPOS": vision["num_positions"],
        "VQKV": 3 * vision["hidden_size"], "VF": vision["intermediate_size"],
        "layers": config["num_layers"], "vision_layers": vision["num_hidden_layers"],
    }


def expected_tensors(size: dict[str, int]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for template, dims in REFERENCE:
        shape = tuple(int(d) if d.isdigit() else size[d] for d in dims)
        if "{i}" in template:
            out.update({template.format(i=i): shape for i in range(size["layers"])})
        elif "{j}" in template:
            out.update({template.format(j=j): shape for j in range(size["vision_layers"])})
        else:
            out[template] = shape
    return out


def test_config_formulas_reproduce_the_published_numbers() -> None:
    assert sizes(GLM4V_9B_CONFIG) == PUBLISHED
    vision = GLM4V_9B_CONFIG["vision_config"]
    assert (vision["image_size"] // vision["patch_size"]) ** 2 + 1 == vision["num_positions"] == 6401
    assert ChatGLMConfig(**GLM4V_9B_CONFIG).num_image_tokens == 1600  # 80 x 80 patches -> 40 x 40 after the conv


def test_full_size_model_has_the_original_names_and_shapes() -> None:
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(ChatGLMConfig(**GLM4V_9B_CONFIG))
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert ours == expected_tensors(PUBLISHED)
    # the model card's "13.9B parameters" (and ~28 GB in bf16, the seed article's measured 28.35 GB)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(13.9e9, rel=0.005)


def test_tiny_checkpoint_is_laid_out_like_the_original(glm_checkpoint: Path) -> None:
    config = json.loads((glm_checkpoint / "config.json").read_text())
    assert set(config) == set(GLM4V_9B_CONFIG) | {"auto_map"}
    assert set(config["vision_config"]) == set(GLM4V_9B_CONFIG["vision_config"])
    index = json.loads((glm_checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    stored: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        with safe_open(str(glm_checkpoint / shard), framework="pt") as f:
            stored.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})  # noqa: SIM118
    assert set(stored) == set(index["weight_map"])
    assert stored.pop("transformer.rotary_pos_emb.inv_freq") == (config["kv_channels"] // 4,)
    assert stored == expected_tensors(sizes(config))


def test_loader_takes_every_tensor_of_the_checkpoint(glm_checkpoint: Path) -> None:
    model, info = ChatGLMForConditionalGeneration.from_pretrained(glm_checkpoint, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    assert set(info["unexpected_keys"]) <= {"transformer.rotary_pos_emb.inv_freq"}
    config = model.config
    assert (config.num_hidden_layers, config.vocab_size) == (config.num_layers, config.padded_vocab_size)
    assert config.eos_token_id == json.loads((glm_checkpoint / "config.json").read_text())["eos_token_id"]


def test_matches_only_the_glm4v_9b_layout() -> None:
    assert matches(GLM4V_9B_CONFIG)
    text_only = {k: v for k, v in GLM4V_9B_CONFIG.items() if k not in ("vision_config", "boi_token_id",
                                                                      "eoi_token_id")}
    assert not matches(text_only)  # e.g. glm-4-9b-chat: same model_type, no vision tower
    assert not matches({"model_type": "qwen2_vl", "vision_config": {}})
