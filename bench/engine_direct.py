"""The paged engine driven directly (no HTTP) on the GPU: correctness on CUDA, then raw engine speed.

1. Tiny Qwen2-VL in float32 on CUDA: 8 requests through the paged engine (Triton kernels, CUDA graphs) equal
   plain `model.generate` alone, token for token.
2. Qwen2.5-VL-7B (random bf16, built by bench/models.py): decode step time at batch 1 / 8 / 64 (graph replay),
   prefill throughput of W1-like requests, and a W1-like run of 64 concurrent requests through the core.

Usage on the device: PYTHONPATH=. python3 -m bench.engine_direct --out $OUT
Writes $OUT/engine_direct.json. Speed here excludes HTTP, media decoding and detokenisation (see run_all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmserve.config import EngineConfig, ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.protocol import CoreOutput
from vlmserve.models.loader import load_model
from vlmserve.multimodal.decode import image_hash
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import ChatMessage, GenerationRequest, ImagePart, SamplingParams, TextPart

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def noise_image(seed: int, size: int = 448) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (3, size // 16, size // 16), generator=generator, dtype=torch.uint8)
    pixels = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels, "RGB")


def render(renderer: PromptRenderer, seed: int, words: int = 60) -> Any:
    image = noise_image(seed)
    text = " ".join(f"word{(seed * 31 + i) % 997}" for i in range(words)) + " Describe the image."
    return renderer.render([ChatMessage("user", (ImagePart(image, image_hash(image)), TextPart(text)))])


def run_all(core: PagedEngineCore, requests: list[GenerationRequest]) -> tuple[dict[str, list[int]], float, int]:
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}

    def emit(outputs: list[CoreOutput]) -> None:
        for o in outputs:
            if o.error:
                raise RuntimeError(o.error)
            tokens[o.request_id].extend(o.new_token_ids)

    for r in requests:
        core.add_request(r)
    _sync()
    started, steps = time.perf_counter(), 0
    while core.has_work():
        core.step(emit)
        steps += 1
    _sync()
    return tokens, time.perf_counter() - started, steps


def check_tiny_on_cuda() -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.fixtures.tiny.qwen2_vl import build_qwen2_vl

    path = build_qwen2_vl(Path(tempfile.mkdtemp()) / "tiny")
    config = ModelConfig(model=str(path), device=DEVICE, dtype="float32")
    engine_adapter, reference = load_model(config), load_model(config)
    renderer = PromptRenderer(engine_adapter.processor, image_token_id=engine_adapter.image_token_id,
                              max_model_len=engine_adapter.max_model_len)
    prompts = [render(renderer, i, words=3 + 5 * i) for i in range(8)]
    expected = []
    for prompt in prompts:
        inputs = reference.collate([prompt])
        out = reference.model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)
        expected.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    results = {}
    for name, cfg in {"graphs": EngineConfig(max_num_batched_tokens=128, max_num_seqs=8),
                      "eager-chunked": EngineConfig(max_num_batched_tokens=19, enable_cuda_graphs=False)}.items():
        core = PagedEngineCore(engine_adapter, cfg)
        reqs = [GenerationRequest(f"t{i}", p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
                for i, p in enumerate(prompts)]
        got, _, _ = run_all(core, reqs)
        results[name] = sum(got[f"t{i}"] == expected[i] for i in range(8))
    return {"tiny_fp32_cuda_matches_of_8": results}


def decode_step_ms(core: PagedEngineCore, renderer: PromptRenderer, batch: int, seed: int) -> float:
    """Median decode step time with `batch` sequences ~400 tokens deep (prefill excluded)."""
    reqs = [GenerationRequest(f"d{batch}-{i}", render(renderer, seed + i),
                              SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)) for i in range(batch)]
    for r in reqs:
        core.add_request(r)
    times = []
    while core.has_work():
        _sync()
        started = time.perf_counter()
        core.step(lambda outputs: None)
        _sync()
        times.append(time.perf_counter() - started)
    decode = sorted(times[-30:])  # the last steps are pure decode
    return decode[len(decode) // 2] * 1000


def bench_7b(out_dir: Path) -> dict[str, Any]:
    from bench.models import build_qwen25_vl

    path = Path("/tmp/bench-qwen2.5-vl-7b")
    if not (path / "bench_meta.json").exists():
        build_qwen25_vl(path)
    meta = json.loads((path / "bench_meta.json").read_text())
    adapter = load_model(ModelConfig(model=str(path), device="cuda", dtype="bfloat16", max_model_len=4096))
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id, max_model_len=4096)
    started = time.perf_counter()
    core = PagedEngineCore(adapter, EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096))
    report: dict[str, Any] = {"engine_init_s": time.perf_counter() - started, "meta": meta,
                              "prompt_tokens": render(renderer, 0).num_tokens}
    report["decode_step_ms"] = {b: decode_step_ms(core, renderer, b, 1000 * b) for b in (1, 8, 64)}
    for concurrency in (64,):
        reqs = [GenerationRequest(f"w1-{i}", render(renderer, 5000 + i),
                                  SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True))
                for i in range(concurrency)]
        tokens, seconds, steps = run_all(core, reqs)
        generated = sum(len(t) for t in tokens.values())
        report[f"w1_core_c{concurrency}"] = {"seconds": seconds, "steps": steps, "output_tokens": generated,
                                             "output_tok_per_s": generated / seconds}
    report["stats"] = core.stats().__dict__
    return report


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    parser.add_argument("--skip-7b", action="store_true")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__}
    report.update(check_tiny_on_cuda())
    print(json.dumps(report), flush=True)
    if not args.skip_7b:
        report.update(bench_7b(args.out))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_direct.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
