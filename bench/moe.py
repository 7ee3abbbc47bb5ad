"""MoE expert layers and the Qwen3-VL paged engine on the GPU, one process, every number on one card (issue 14).

(a) A Qwen3-VL-30B-A3B-shaped MoE VLM, random bf16 weights: the published text layer (hidden 2048, 32/4 heads of
    128, 128 experts of 768, top 8, vocabulary 151,936) and vision tower (27 blocks of 1152, deepstack at 8/16/24),
    but `--moe-layers` decoder layers (default 8) instead of 48, so it builds in seconds.
    NOTE: tokens/s here are for that shortened stack; the expert and attention cost per step grows with the layer
    count (x6 for the full model), the vision tower and lm_head do not. The per-layer expert timings are exact.
    1. one expert layer: transformers' loop ("eager"), transformers' grouped_mm and vlmserve's grouped GEMM on the
       same random routing: largest difference to the loop, and ms per call at 64 tokens (decode at c=64), 1 token
       and 4096 tokens (prefill);
    2. W1-like requests (one 448x448 image + text, 128 output tokens, greedy, ignore_eos) through the paged engine
       core, no HTTP (as bench/engine_direct.py): c=1 and c=64 for each expert implementation. The loop cannot be
       captured in CUDA graphs (a host sync per expert), so it runs eager; vlmserve's grouped GEMM runs both ways.
(b) Qwen3-VL-8B architecture, random bf16 weights (36 layers of 4096, 32/8 heads, MLP 12288; the same tower with
    out 4096): W1 at c=64 through the generate engine (vlmserve/engine/generate_core.py, batches of 64) and the paged
    engine, same requests' shape, same process.

    PYTHONPATH=. python3 -m bench.moe --out $OUT               # on the GPU (bench/moe_call.sh)
    BENCH_MOE_TINY=1 PYTHONPATH=. python3 -m bench.moe --out /tmp/moe-smoke   # CPU smoke, tiny layers
Writes $OUT/moe.json and $OUT/moe.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from bench.closed_loop import closed_loop
from bench.engine_direct import render
from vlmserve.config import EngineConfig, ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.generate_core import GenerateEngineCore
from vlmserve.models import hf_compat, moe_experts
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import SamplingParams

TINY = os.environ.get("BENCH_MOE_TINY") == "1"
DEVICE = "cpu" if TINY else "cuda"
DTYPE = torch.float32 if TINY else torch.bfloat16
MAX_TOKENS = 8 if TINY else 128
OURS = moe_experts.EXPERTS_NAME
LABELS = {"eager": "transformers loop", "grouped_mm": "transformers grouped_mm", OURS: "vlmserve grouped GEMM"}

_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
               temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
_TEXT = dict(vocab_size=151936, max_position_embeddings=32768, head_dim=128, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                              "mrope_interleaved": True}, tie_word_embeddings=False)
_MOE_TEXT = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, intermediate_size=6144,
                 moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                 norm_topk_prob=True)
_DENSE_TEXT = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=12288,
                   num_hidden_layers=36)
_TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0])
_TINY_TEXT = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True})
_TINY_MOE = dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _randomise(model: torch.nn.Module) -> None:
    """Weights as a trained model's scale, drawn on the device: norms 1, everything else N(0, 0.02)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and "norm" in name:
                parameter.fill_(1.0)
            elif parameter.dim() == 1:
                parameter.zero_()
            else:
                parameter.normal_(0.0, 0.02)


def build(out: Path, *, moe: bool, layers: int) -> tuple[Path, torch.nn.Module, dict[str, Any]]:
    """Config, processor and template on disk (what the loader reads); the random weights stay in memory."""
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    from tests.fixtures.tiny.qwen3_vl import _token_config, save_qwen3_vl_processor

    ids = save_qwen3_vl_processor(out, max_pixels=448 * 448)
    text: dict[str, Any] = {**_TEXT, **(_MOE_TEXT if moe else _DENSE_TEXT), "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"]}
    vision = {**_VISION, "out_hidden_size": text["hidden_size"]}
    if TINY:
        text.update(_TINY_TEXT, **(_TINY_MOE if moe else {}))
        vision.update(_TINY_VISION, out_hidden_size=text["hidden_size"])
    if moe or TINY:
        text["num_hidden_layers"] = layers
    config_cls, model_cls = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe
                             else (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    config = config_cls(text_config=text, vision_config=vision, **_token_config(ids))
    started = time.perf_counter()
    with torch.device(DEVICE):
        model = model_cls._from_config(config, dtype=DTYPE).eval()
    _randomise(model)
    _sync()
    model.config.save_pretrained(out)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.save_pretrained(out)
    meta = {"decoder_layers": text["num_hidden_layers"], "params_b": round(sum(p.numel() for p in model.parameters())
                                                                          / 1e9, 3),
            "build_s": round(time.perf_counter() - started, 1), "text_config": {k: v for k, v in text.items()
                                                                               if k != "rope_parameters"}}
    return out, model, meta


def load(path: Path, model: torch.nn.Module) -> Any:
    """The serving loader on `path`, handed the in-memory model instead of reading weights (the load-time hooks,
    grouped experts included, run as they do for a real checkpoint)."""
    from transformers import AutoModelForImageTextToText

    with mock.patch.object(AutoModelForImageTextToText, "from_pretrained", return_value=model):
        return load_model(ModelConfig(model=str(path), device=DEVICE, dtype=str(DTYPE).removeprefix("torch."),
                                      max_model_len=4096))


_ids = iter(range(10**9))


def drive(core: Any, prompts: list[Any], concurrency: int, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """`prompts` through `core` with at most `concurrency` in flight, a new one as soon as one finishes."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return closed_loop(core, prompts, concurrency, params, f"moe-{next(_ids)}", DEVICE)


def time_call(fn: Callable[[], Any], repeats: int = 10) -> float:
    fn()
    _sync()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - started)
    return round(1000 * sorted(samples)[len(samples) // 2], 3)


def _bound(experts: Any, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> Callable[[], Any]:
    return lambda: experts(hidden, index, weights)


def expert_layer(model: torch.nn.Module) -> dict[str, Any]:
    """One decoder layer's experts on random routing: each implementation's error against the loop and its time."""
    block: Any = next(m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate"))
    experts, hidden_size = block.experts, block.experts.gate_up_proj.shape[-1]
    report: dict[str, Any] = {}
    for tokens in (1, 64, 4096 if not TINY else 256):
        generator = torch.Generator(device=DEVICE).manual_seed(tokens)
        hidden = torch.randn(tokens, hidden_size, device=DEVICE, dtype=DTYPE, generator=generator)
        with torch.no_grad():
            _, weights, index = block.gate(hidden)
            outputs, times = {}, {}
            for name in ("eager", "grouped_mm", OURS):
                experts.config._experts_implementation = name
                outputs[name] = experts(hidden, index, weights)
                times[name] = time_call(_bound(experts, hidden, index, weights), repeats=3 if TINY else 10)
        scale = outputs["eager"].float().abs().max().item()
        report[f"tokens_{tokens}"] = {
            "ms": times, "experts_hit": int(index.unique().numel()), "loop_max_abs": round(scale, 6),
            "max_rel_diff_to_loop": {n: round((o.float() - outputs["eager"].float()).abs().max().item() / scale, 5)
                                     for n, o in outputs.items() if n != "eager"}}
    experts.config._experts_implementation = OURS
    return report


#: words of filler text: ~100 text tokens with the fixture tokenizer, beside the image's 196
WORDS = 16


def prompts_for(renderer: PromptRenderer, count: int, first_seed: int) -> list[Any]:
    """Fresh images and texts (no image- or prefix-cache hits between phases)."""
    return [render(renderer, first_seed + i, words=WORDS) for i in range(count)]


def bench_moe(args: argparse.Namespace, deadline: float, report: dict[str, Any], save: Callable[[], None]) -> None:
    path, model, meta = build(Path(tempfile.mkdtemp()) / "qwen3-vl-moe", moe=True, layers=args.moe_layers)
    adapter = load(path, model)
    meta["grouped_experts_installed"] = sorted({str(hf_compat.experts_name(m))
                                                for m in hf_compat.experts_modules(model)})
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id, max_model_len=4096)
    meta["prompt_tokens"] = render(renderer, 0, words=WORDS).num_tokens
    section: dict[str, Any] = {"model": meta, "expert_layer": expert_layer(model), "engine": {}}
    report["moe_qwen3_vl_30b_a3b_shape"] = section
    save()
    variants = [(OURS, True), ("eager", False), ("grouped_mm", True), (OURS, False)]
    seed = 10_000
    for implementation, graphs in variants:
        label = f"{LABELS[implementation]}{'' if graphs else ' (no CUDA graphs)'}"
        if time.monotonic() > deadline - args.moe_variant_s:
            section["engine"][label] = {"skipped": "out of time"}
            continue
        hf_compat.use_experts(model, implementation)
        started = time.perf_counter()
        try:
            core = PagedEngineCore(adapter, EngineConfig(max_num_seqs=64, num_kv_blocks=4096,
                                                         enable_cuda_graphs=graphs))
            result: dict[str, Any] = {"engine_init_s": round(time.perf_counter() - started, 1),
                                      "decode_graphs": core.runner._graphs is not None}
            drive(core, prompts_for(renderer, 2, seed), 2, max_tokens=4)  # warm-up: kernels, allocator
            result["c1"] = drive(core, prompts_for(renderer, args.c1_requests, seed + 100), 1)
            result["c64"] = drive(core, prompts_for(renderer, args.c64_requests, seed + 200), 64)
            del core
        except Exception as exc:  # a result too: what broke, and the other variants still run
            result = {"error": f"{type(exc).__name__}: {str(exc)[:800]}"}
        seed += 1000
        section["engine"][label] = result
        print(json.dumps({label: result}), flush=True)
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        save()
    del adapter, model
    gc.collect()


def bench_dense(args: argparse.Namespace, deadline: float, report: dict[str, Any], save: Callable[[], None]) -> None:
    path, model, meta = build(Path(tempfile.mkdtemp()) / "qwen3-vl-8b", moe=False, layers=2)
    adapter = load(path, model)
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id, max_model_len=4096)
    meta["prompt_tokens"] = render(renderer, 0, words=WORDS).num_tokens
    section: dict[str, Any] = {"model": meta}
    report["dense_qwen3_vl_8b_arch"] = section
    # generate first: the paged runner installs its own attention into the decoder
    for name, make in (("generate engine", lambda: GenerateEngineCore(adapter, EngineConfig(max_generate_batch=64))),
                       ("paged engine", lambda: PagedEngineCore(adapter, EngineConfig(max_num_seqs=64,
                                                                                      num_kv_blocks=4096)))):
        if time.monotonic() > deadline - args.dense_engine_s:
            section[name] = {"skipped": "out of time"}
            continue
        try:
            core = make()
            drive(core, prompts_for(renderer, 2, 50_000), 2, max_tokens=4)
            section[name] = {"c64": drive(core, prompts_for(renderer, args.dense_requests, 60_000), 64)}
            del core
        except Exception as exc:
            section[name] = {"error": f"{type(exc).__name__}: {str(exc)[:800]}"}
        print(json.dumps({name: section[name]}), flush=True)
        save()


def markdown(report: dict[str, Any]) -> str:
    card = report["device"]
    lines = [f"# MoE and Qwen3-VL on {card} (torch {report['torch']}, transformers {report['transformers']})", ""]
    moe = report.get("moe_qwen3_vl_30b_a3b_shape")
    if moe:
        layers = moe["model"]["decoder_layers"]
        lines += [f"## Qwen3-VL-30B-A3B shape, {layers} of 48 decoder layers, random bf16; {card}", "",
                  "One expert layer, median ms per call:", "",
                  "| tokens | experts hit | transformers loop | transformers grouped_mm | vlmserve grouped GEMM | card |",
                  "|---|---|---|---|---|---|"]
        for key, row in moe["expert_layer"].items():
            ms = row["ms"]
            lines.append(f"| {key.removeprefix('tokens_')} | {row['experts_hit']} | {ms['eager']} | "
                         f"{ms['grouped_mm']} | {ms[OURS]} | {card} |")
        lines += ["", f"W1-like through the paged engine core ({MAX_TOKENS} output tokens, "
                  f"{moe['model'].get('prompt_tokens')} prompt tokens), output tokens/s:", "",
                  "| experts | CUDA graphs | c=1 | c=64 | card |", "|---|---|---|---|---|"]
        for label, row in moe["engine"].items():
            cells = [str(row.get(c, {}).get("output_tok_per_s", row.get("error", row.get("skipped", "-"))))
                     for c in ("c1", "c64")]
            lines.append(f"| {label} | {row.get('decode_graphs', '-')} | {cells[0]} | {cells[1]} | {card} |")
    dense = report.get("dense_qwen3_vl_8b_arch")
    if dense:
        lines += ["", f"## Qwen3-VL-8B architecture, random bf16, W1 c=64; {card}", "",
                  "| engine | requests | output tokens/s | seconds | card |", "|---|---|---|---|---|"]
        for name in ("generate engine", "paged engine"):
            row = dense.get(name, {})
            c64 = row.get("c64", {})
            lines.append(f"| {name} | {c64.get('requests', '-')} | "
                         f"{c64.get('output_tok_per_s', row.get('error', row.get('skipped', '-')))} | "
                         f"{c64.get('seconds', '-')} | {card} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    import transformers

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    parser.add_argument("--budget-s", type=float, default=500.0, help="stop starting new parts after this")
    parser.add_argument("--moe-layers", type=int, default=2 if TINY else 8)
    parser.add_argument("--c1-requests", type=int, default=2)
    parser.add_argument("--c64-requests", type=int, default=4 if TINY else 64)
    parser.add_argument("--dense-requests", type=int, default=4 if TINY else 64)
    parser.add_argument("--moe-variant-s", type=float, default=5 if TINY else 60,
                        help="time an MoE engine variant is expected to take (not started with less left)")
    parser.add_argument("--dense-engine-s", type=float, default=5 if TINY else 60)
    parser.add_argument("--skip-dense", action="store_true")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (tiny smoke)",
                              "torch": torch.__version__, "transformers": transformers.__version__,
                              "grouped_method_bf16": moe_experts.grouped_method(torch.empty(1, device=DEVICE,
                                                                                            dtype=DTYPE))}

    def save() -> None:
        (args.out / "moe.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "moe.md").write_text(markdown(report))

    save()
    bench_moe(args, deadline, report, save)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_dense:
        bench_dense(args, deadline, report, save)
    save()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
