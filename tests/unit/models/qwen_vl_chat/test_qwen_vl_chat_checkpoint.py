"""Our parameters against the published Qwen-VL-Chat checkpoint, and the loader's strictness.

Sources of the expected layout:
- names: Qwen/Qwen-VL-Chat's `model.safetensors.index.json` as published for Qwen-VL-Chat-Int4 (mirrored on GitHub
  as x1ngzai/Qwen-VL-Chat-Int4). Its `transformer.visual.*`, `transformer.wte`, `ln_1`/`ln_2`, `ln_f` and
  `lm_head` names are the float checkpoint's; its language-model linears are GPTQ-packed (qweight, scales, ...),
  so their float names come from the module tree in `modeling_qwen.py`: nn.Linear -> `.weight`, plus `.bias`
  for `c_attn` always and for the others only when `no_bias` is false;
- shapes: the constructors in `modeling_qwen.py` and `visual.py` (e.g. the 256-row `positional_embedding`,
  `mlp_width = int(width * mlp_ratio)`, `kv_proj` only when width != output_dim, intermediate_size // 2);
- sizes: the published config.json and the Qwen-VL paper's Table 1 (LLM 7.7B, total 9.6B parameters).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmserve.errors import ModelLoadError
from vlmserve.models.qwen_vl_chat.adapter import matches
from vlmserve.models.qwen_vl_chat.checkpoint import load_checkpoint
from vlmserve.models.qwen_vl_chat.config import QwenVLChatConfig
from vlmserve.models.qwen_vl_chat.modeling import QwenVLChatForCausalLM

#: Qwen/Qwen-VL-Chat config.json as published
PUBLISHED_CONFIG: dict[str, Any] = {
    "architectures": ["QWenLMHeadModel"], "attn_dropout_prob": 0.0,
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                 "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False, "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 22016, "kv_channels": 128, "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 8192, "model_type": "qwen", "no_bias": True, "num_attention_heads": 32,
    "num_hidden_layers": 32, "onnx_safe": None, "rotary_emb_base": 10000, "rotary_pct": 1.0,
    "scale_attn_weights": True, "seq_length": 2048, "tie_word_embeddings": False, "tokenizer_type": "QWenTokenizer",
    "torch_dtype": "bfloat16", "transformers_version": "4.31.0", "use_cache": True, "use_dynamic_ntk": True,
    "use_flash_attn": False, "use_logn_attn": True,
    "visual": {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48, "mlp_ratio": 4.9231,
               "output_dim": 4096, "patch_size": 14, "width": 1664},
    "vocab_size": 151936,
}


def published_layout(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the published checkpoint with its shape, for a config.json dict."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    projection = config["kv_channels"] * config["num_attention_heads"]
    ffn = config["intermediate_size"] // 2
    layout: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (vocab, hidden),
                                          "transformer.ln_f.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for n in range(config["num_hidden_layers"]):
        p = f"transformer.h.{n}."
        layout.update({p + "ln_1.weight": (hidden,), p + "ln_2.weight": (hidden,),
                       p + "attn.c_attn.weight": (3 * projection, hidden), p + "attn.c_attn.bias": (3 * projection,),
                       p + "attn.c_proj.weight": (hidden, projection), p + "mlp.w1.weight": (ffn, hidden),
                       p + "mlp.w2.weight": (ffn, hidden), p + "mlp.c_proj.weight": (hidden, ffn)})
        if not config["no_bias"]:
            layout.update({p + "attn.c_proj.bias": (hidden,), p + "mlp.w1.bias": (ffn,), p + "mlp.w2.bias": (ffn,),
                           p + "mlp.c_proj.bias": (hidden,)})
    layout.update(_visual_layout(config["visual"]))
    return layout


def _visual_layout(visual: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    width, out, patch = visual["width"], visual["output_dim"], visual["patch_size"]
    mlp = int(width * visual["mlp_ratio"])
    queries = visual.get("n_queries", 256)
    v = "transformer.visual."
    layout: dict[str, tuple[int, ...]] = {
        v + "conv1.weight": (width, 3, patch, patch), v + "positional_embedding": (256, width),
        v + "ln_pre.weight": (width,), v + "ln_pre.bias": (width,), v + "ln_post.weight": (out,),
        v + "ln_post.bias": (out,), v + "proj": (out, out),
        v + "attn_pool.query": (queries, out), v + "attn_pool.pos_embed": (queries, out),
        v + "attn_pool.attn.in_proj_weight": (3 * out, out), v + "attn_pool.attn.in_proj_bias": (3 * out,),
        v + "attn_pool.attn.out_proj.weight": (out, out), v + "attn_pool.attn.out_proj.bias": (out,),
        v + "attn_pool.ln_q.weight": (out,), v + "attn_pool.ln_q.bias": (out,),
        v + "attn_pool.ln_kv.weight": (out,), v + "attn_pool.ln_kv.bias": (out,),
    }
    if width != out:
        layout[v + "attn_pool.kv_proj.weight"] = (out, width)
    for n in range(visual["layers"]):
        p = f"{v}transformer.resblocks.{n}."
        layout.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,), p + "ln_2.weight": (width,),
                       p + "ln_2.bias": (width,), p + "attn.in_proj.weight": (3 * width, width),
                       p + "attn.in_proj.bias": (3 * width,), p + "attn.out_proj.weight": (width, width),
                       p + "attn.out_proj.bias": (width,), p + "mlp.c_fc.weight": (mlp, width),
                       p + "mlp.c_fc.bias": (mlp,), p + "mlp.c_proj.weight": (width, mlp),
                       p + "mlp.c_proj.bias": (width,)})
    return layout


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def test_full_size_model_has_the_published_names_shapes_and_size() -> None:
    with torch.device("meta"):
        model = QwenVLChatForCausalLM(QwenVLChatConfig(**PUBLISHED_CONFIG))
    assert _shapes(model) == published_layout(PUBLISHED_CONFIG)
    assert model.transformer.visual.transformer.resblocks[0].mlp.c_fc.weight.shape == (8192, 1664)
    total = sum(p.numel() for p in model.parameters())
    language = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("transformer.visual."))
    assert 9.6e9 <= total < 9.7e9  # the paper's 9.6B
    assert 7.7e9 <= language < 7.75e9  # the paper's 7.7B LLM


def test_tiny_checkpoint_is_laid_out_like_the_published_one(qwen_vl_chat_dir: Path) -> None:
    config = json.loads((qwen_vl_chat_dir / "config.json").read_text())
    assert set(config) == set(PUBLISHED_CONFIG)
    assert set(config["visual"]) == set(PUBLISHED_CONFIG["visual"])
    index = json.loads((qwen_vl_chat_dir / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 2
    stored = {}
    for file in files:
        stored.update({name: tuple(t.shape) for name, t in load_file(qwen_vl_chat_dir / file).items()})
    assert stored == published_layout(config)
    assert set(index["weight_map"]) == set(stored)
    for name in ("qwen.tiktoken", "tokenizer_config.json", "generation_config.json"):
        assert (qwen_vl_chat_dir / name).is_file()


def test_loaded_model_holds_the_checkpoint_tensors(qwen_vl_chat_adapter: Any,
                                                  qwen_vl_chat_state: dict[str, torch.Tensor]) -> None:
    loaded = qwen_vl_chat_adapter.model.state_dict()
    assert loaded.keys() == qwen_vl_chat_state.keys()
    for name, tensor in qwen_vl_chat_state.items():
        assert torch.equal(loaded[name], tensor), name


def test_pytorch_bin_shards_load_the_same(tmp_path: Path, qwen_vl_chat_dir: Path,
                                         qwen_vl_chat_state: dict[str, torch.Tensor]) -> None:
    _copy_without_weights(qwen_vl_chat_dir, tmp_path)
    names = sorted(qwen_vl_chat_state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, chunk in halves.items():
        torch.save({n: qwen_vl_chat_state[n] for n in chunk}, tmp_path / file)
    weight_map = {n: file for file, chunk in halves.items() for n in chunk}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_checkpoint(tmp_path, device="cpu", dtype=torch.float32)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in qwen_vl_chat_state.items())


@pytest.mark.parametrize("change", ["rename", "reshape"])
def test_checkpoint_of_another_layout_is_refused(tmp_path: Path, qwen_vl_chat_dir: Path,
                                                 qwen_vl_chat_state: dict[str, torch.Tensor], change: str) -> None:
    _copy_without_weights(qwen_vl_chat_dir, tmp_path)
    state = dict(qwen_vl_chat_state)
    if change == "rename":
        state["transformer.h.0.mlp.gate.weight"] = state.pop("transformer.h.0.mlp.w2.weight")
    else:
        state["transformer.visual.proj"] = state["transformer.visual.proj"][:, :-1].contiguous()
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"mlp\.w2\.weight|visual\.proj"):
        load_checkpoint(tmp_path, device="cpu", dtype=torch.float32)


def test_matches_the_published_config_only() -> None:
    assert matches(PUBLISHED_CONFIG)
    int4 = dict(PUBLISHED_CONFIG, quantization_config={"bits": 4, "quant_method": "gptq"})
    text_only = {k: v for k, v in PUBLISHED_CONFIG.items() if k != "visual"}  # Qwen-7B-Chat
    assert not matches(int4)
    assert not matches(text_only)
    assert not matches({"model_type": "qwen2_vl", "vision_config": {}})


def _copy_without_weights(source: Path, target: Path) -> None:
    for file in source.iterdir():
        if not file.name.startswith("model"):
            shutil.copy(file, target / file.name)
