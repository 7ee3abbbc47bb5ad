"""GLM-4V-9B at full size with random bf16 weights, laid out like THUDM/glm-4v-9b, for the native port.

Files as the original repository has them (the layout `vlmserve.models.glm4v_9b` loads unchanged):
config.json (the published keys, `GLM4V_9B_CONFIG`), sharded safetensors with the original tensor names and
index, tokenizer.model (base64 token + rank lines: the 256 bytes, then 151,073 multi-character ASCII tokens from
bench/vocab.py, 151,329 ranks as GLM-4 has) and tokenizer_config.json with GLM-4's 14 special tokens after them.

    python3 -m bench.models glm-4v-9b /tmp/glm4v9b --device cuda
"""

from __future__ import annotations

import base64
import copy
import json
import time
from pathlib import Path
from typing import Any

from bench.vocab import _byte_to_unicode, _regular_tokens

NUM_RANKS = 151_329  # GLM-4's tokenizer.model
NUM_SHARDS = 6
_TINY_OVERRIDES: dict[str, Any] = {
    "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "kv_channels": 16, "num_attention_heads": 4,
    "multi_query_group_num": 2, "torch_dtype": "bfloat16",
}
_TINY_VISION: dict[str, Any] = {"num_hidden_layers": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                                "image_size": 112, "num_positions": (112 // 14) ** 2 + 1}


def glm_ranks() -> dict[bytes, int]:
    """tiktoken-style ranks: every byte, then ASCII tokens each made of two lower-ranked ones."""
    to_byte = {symbol: b for b, symbol in _byte_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    tokens, _ = _regular_tokens(NUM_RANKS - 256 + 97)  # its first 97 are single characters, already here
    for token in tokens[97:]:
        ranks[bytes(to_byte[symbol] for symbol in token)] = len(ranks)
    assert len(ranks) == NUM_RANKS
    return ranks


def glm_config(scale: str) -> dict[str, Any]:
    from vlmserve.models.glm4v_9b.config import GLM4V_9B_CONFIG

    config = copy.deepcopy(GLM4V_9B_CONFIG)
    config["auto_map"] = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                          "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    if scale == "tiny":
        config.update(_TINY_OVERRIDES)
        config["vision_config"].update(_TINY_VISION)
    elif scale != "full":
        raise ValueError(f"unknown scale {scale!r}")
    return config


def write_glm_tokenizer(out: Path, ranks: dict[bytes, int], image_size: int) -> dict[str, int]:
    from vlmserve.models.glm4v_9b.tokenizer import GLM4_SPECIAL_TOKENS

    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    specials = {name: len(ranks) + i for i, name in enumerate(GLM4_SPECIAL_TOKENS)}
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    settings = {
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "added_tokens_decoder": {str(token_id): {"content": name, **entry} for name, token_id in specials.items()},
        "additional_special_tokens": list(GLM4_SPECIAL_TOKENS), "clean_up_tokenization_spaces": False,
        "do_lower_case": False, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "model_max_length": 8192, "padding_side": "left", "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer", "image_size": image_size,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return specials


def suppress_outputs(model: Any, token_ids: list[int]) -> None:
    """Make the random model (practically) never emit `token_ids` (lone bytes >= 0x80, padded rows).

    NOTE: a tiktoken vocabulary must hold all 256 bytes, and a random model could stream bytes that are not
    UTF-8, or the 209 padded embedding rows that decode to nothing. Hidden coordinate 0 is held at a constant
    through the residual stream and those output rows read it with a large negative weight (the tiny test
    checkpoint uses this too); everything else stays random.
    """
    import torch

    with torch.no_grad():
        model.transformer.embedding.word_embeddings.weight[:, 0] = 0.1
        for layer in model.transformer.encoder.layers:
            layer.self_attention.dense.weight[0].zero_()
            layer.mlp.dense_4h_to_h.weight[0].zero_()
        output = model.transformer.output_layer.weight
        rows = torch.tensor(token_ids, device=output.device)
        output[rows] = 0
        output[rows, 0] = -50.0


def write_shards(out: Path, model: Any, kv_channels: int, num_shards: int = NUM_SHARDS) -> None:
    """The state dict as the original lays it out: sharded safetensors, an index, and the rotary `inv_freq`
    buffer the original keeps in its state dict."""
    import torch
    from safetensors.torch import save_file

    dim = kv_channels // 2  # the original's RotaryEmbedding(kv_channels // 2) buffer, kept in its state dict
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    tensors = {"transformer.rotary_pos_emb.inv_freq": inv_freq, **model.state_dict()}
    names = list(tensors)
    bounds = [round(i * len(names) / num_shards) for i in range(num_shards + 1)]
    weight_map, total = {}, 0
    for shard in range(num_shards):
        filename = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name].detach().contiguous().cpu() for name in names[bounds[shard]:bounds[shard + 1]]}
        save_file(part, str(out / filename), metadata={"format": "pt"})
        for name, tensor in part.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def build_glm4v_9b(out: Path, *, scale: str = "full", device: str = "cuda", seed: int = 0) -> dict[str, Any]:
    """Write the checkpoint to `out`; returns (and saves as bench_meta.json) its sizes."""
    import torch

    from vlmserve.models.glm4v_9b.config import ChatGLMConfig
    from vlmserve.models.glm4v_9b.modeling import ChatGLMForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = glm_config(scale)
    ranks = glm_ranks()
    specials = write_glm_tokenizer(out, ranks, config["vision_config"]["image_size"])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    with torch.device(device):
        model = ChatGLMForConditionalGeneration._from_config(ChatGLMConfig(**config), dtype=torch.bfloat16).eval()
    padded = range(len(ranks) + len(specials), config["padded_vocab_size"])
    suppress_outputs(model, [*range(0x80, 0x100), *padded])
    built = time.perf_counter()
    write_shards(out, model, config["kv_channels"])
    meta = _decode_meta(model, config)
    meta.update(model="glm-4v-9b", name="GLM-4V-9B (random bf16)" if scale == "full" else "GLM-4V-9B (tiny layers)", scale=scale,
                init_s=round(built - started, 2), save_s=round(time.perf_counter() - built, 2))
    (out / "bench_meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _decode_meta(model: Any, config: dict[str, Any]) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if ".vision." in f".{n}")
    embed = model.get_input_embeddings().weight.numel()
    kv_per_token = 2 * config["num_layers"] * config["multi_query_group_num"] * config["kv_channels"] * 2
    return {"num_params": total, "num_vision_params": vision, "num_embedding_params": embed,
            "decode_weight_bytes": (total - vision - embed) * 2, "kv_bytes_per_token": kv_per_token}
