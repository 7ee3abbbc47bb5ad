"""Full-size benchmark checkpoints with random bf16 weights, built from published configs (no download).

Speed does not depend on weight values, so a checkpoint with the published architecture, the published
vocabulary size and a working tokenizer/processor/chat template measures a server exactly as the real one would.
Weights are initialised on the GPU (seconds for 8B parameters) and saved as safetensors on local disk.

    python3 -m bench.models qwen2.5-vl-7b /tmp/qwen25vl7b --device cuda
    python3 -m bench.models qwen2.5-vl-7b /tmp/qwen25vl-small --scale tiny --device cpu   # CPU validation
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

from bench.vocab import build_full_vocab_tokenizer

# Qwen/Qwen2.5-VL-7B-Instruct config.json as published (checked against published configs and the module
# printout of the released model: vision qkv 1280->3840, mlp 3420, merger 5120->3584; text q 3584, k/v 512).
QWEN25_VL_7B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}

# Shrinks only the layer sizes for CPU validation; vocabulary, tokenizer, processor and ids stay full-size.
_TINY_OVERRIDES: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
}
_TINY_VISION_OVERRIDES: dict[str, Any] = {
    "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
    "fullatt_block_indexes": [1],
}

QWEN25_VL_PREPROCESSOR: dict[str, Any] = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

# The published Qwen2.5 special tokens, in id order from 151643.
QWEN25_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
QWEN25_FIRST_SPECIAL_ID = 151643

def qwen25_vl_config(scale: str = "full") -> dict[str, Any]:
    """The published config, or (scale="tiny") the same with small layers for CPU runs."""
    config = copy.deepcopy(QWEN25_VL_7B_CONFIG)
    if scale == "tiny":
        config.update(copy.deepcopy(_TINY_OVERRIDES))
        config["vision_config"].update(_TINY_VISION_OVERRIDES)
    elif scale != "full":
        raise ValueError(f"unknown scale {scale!r}")
    return config


def write_qwen25_tokenizer_and_processor(out: Path) -> None:
    """Tokenizer (full 152,064-id ASCII vocabulary), chat template and image-processor config, as published."""
    from transformers import Qwen2TokenizerFast

    from tests.fixtures.tiny.qwen2_vl import QWEN2_VL_CHAT_TEMPLATE

    specials = {tok: QWEN25_FIRST_SPECIAL_ID + i for i, tok in enumerate(QWEN25_SPECIAL_TOKENS)}
    raw = build_full_vocab_tokenizer(vocab_size=QWEN25_VL_7B_CONFIG["vocab_size"], special_tokens=specials)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, model_max_length=131072)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(QWEN25_VL_PREPROCESSOR, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2))


def _greedy_generation_config(config: dict[str, Any]) -> dict[str, Any]:
    # NOTE: the published generation_config samples (top_k=1, repetition_penalty 1.05); every server here gets
    # plain greedy defaults instead so that none pays for a logits processor the others skip.
    return {"bos_token_id": config["bos_token_id"], "pad_token_id": config["bos_token_id"],
            "eos_token_id": [config["eos_token_id"], config["bos_token_id"]], "do_sample": False}


def build_qwen25_vl(out: Path, *, scale: str = "full", device: str = "cuda", seed: int = 0) -> dict[str, Any]:
    """Write a random-weight Qwen2.5-VL checkpoint to `out`; returns (and saves as bench_meta.json) its sizes."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config_dict = qwen25_vl_config(scale)
    config = Qwen2_5_VLConfig.from_dict(config_dict)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    meta = decode_bytes_meta(model, config_dict)
    built = time.perf_counter()
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    # The published config.json goes on disk verbatim, so servers load it through the same compatibility path
    # as the real checkpoint.
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    (out / "generation_config.json").write_text(json.dumps(_greedy_generation_config(config_dict), indent=2))
    write_qwen25_tokenizer_and_processor(out)
    meta.update(model="qwen2.5-vl-7b", name="Qwen2.5-VL-7B-Instruct (random bf16)" if scale == "full" else "Qwen2.5-VL (tiny layers)",
                scale=scale, init_s=round(built - started, 2), save_s=round(time.perf_counter() - built, 2))
    (out / "bench_meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def decode_bytes_meta(model: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Parameter counts and the bytes one decode step must read at least (weights + KV per context token).

    Every text weight is read once per step except the embedding table (only the rows of the step's tokens);
    the vision tower does not run during decode.
    """
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    embed = model.get_input_embeddings().weight.numel()
    text_read = total - vision - embed
    element = 2  # bf16
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    kv_per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * element
    return {"num_params": total, "num_vision_params": vision, "num_embedding_params": embed,
            "decode_weight_bytes": text_read * element, "kv_bytes_per_token": kv_per_token}


# Qwen/Qwen2.5-VL-72B-Instruct: the 7B config with the published 72B sizes (the vision tower is the same but
# for its output width).
QWEN25_VL_72B_OVERRIDES: dict[str, Any] = {
    "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "max_window_layers": 80,
}


def build_qwen25_vl_72b(out: Path) -> dict[str, Any]:
    """The 72B architecture WITHOUT weights (config, tokenizer, processor, bench_meta.json): 144 GB of random bf16
    is not worth writing; the server fills them itself with `--load-format dummy` (tensor-parallel only)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    config_dict = copy.deepcopy(QWEN25_VL_7B_CONFIG)
    config_dict.update(QWEN25_VL_72B_OVERRIDES)
    config_dict["vision_config"]["out_hidden_size"] = 8192
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig.from_dict(config_dict),
                                                                dtype=torch.bfloat16)
    meta = decode_bytes_meta(model, config_dict)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    (out / "generation_config.json").write_text(json.dumps(_greedy_generation_config(config_dict), indent=2))
    write_qwen25_tokenizer_and_processor(out)
    meta.update(model="qwen2.5-vl-72b", name="Qwen2.5-VL-72B-Instruct architecture (random bf16, --load-format dummy)",
                scale="full", weights="none: serve with --load-format dummy")
    (out / "bench_meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def build_glm4v_9b(out: Path, *, scale: str = "full", device: str = "cuda", seed: int = 0) -> dict[str, Any]:
    """GLM-4V-9B (for the native port `vlmserve.models.glm4v_9b`): see bench/glm4v.py."""
    from bench.glm4v import build_glm4v_9b as build

    return build(out, scale=scale, device=device, seed=seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["qwen2.5-vl-7b", "qwen2.5-vl-72b", "glm-4v-9b"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--scale", default="full", choices=["full", "tiny"])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.model == "qwen2.5-vl-7b":
        meta = build_qwen25_vl(args.out, scale=args.scale, device=args.device)
    elif args.model == "qwen2.5-vl-72b":
        meta = build_qwen25_vl_72b(args.out)
    else:
        meta = build_glm4v_9b(args.out, scale=args.scale, device=args.device)
    print(json.dumps(meta))  # one line: run_all reads the last stdout line


if __name__ == "__main__":
    main()
