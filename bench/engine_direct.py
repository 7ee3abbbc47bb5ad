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
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

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
    # A fixed pool: a profiled one takes most of the card, and the first core's would still be held when the
    # second one profiles. The 7-B part below sizes its pool by profiling.
    for name, cfg in {"graphs": EngineConfig(max_num_batched_tokens=128, max_num_seqs=8, num_kv_blocks=256),
                      "graphs-vision-graphs": EngineConfig(max_num_batched_tokens=128, max_num_seqs=8,
                                                           num_kv_blocks=256, enable_vision_graphs=True),
                      "graphs-mixed-steps": EngineConfig(max_num_batched_tokens=24, max_num_seqs=8, num_kv_blocks=256),
                      "eager-chunked": EngineConfig(max_num_batched_tokens=19, enable_cuda_graphs=False,
                                                    num_kv_blocks=256),
                      "graphs-compiled": EngineConfig(max_num_batched_tokens=24, max_num_seqs=8, num_kv_blocks=256,
                                                      compile_decoder=True)}.items():
        core = PagedEngineCore(engine_adapter, cfg)
        reqs = [GenerationRequest(f"t{i}", p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
                for i, p in enumerate(prompts)]
        got, _, _ = run_all(core, reqs)
        results[name] = sum(got[f"t{i}"] == expected[i] for i in range(8))
        del core
        torch.cuda.empty_cache()
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


class StepTimers:
    """Wall time of engine pieces, each call bracketed by CUDA synchronisation (which itself costs a little: the
    instrumented run is separate from the clean one)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            _sync()
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed

    def report(self) -> dict[str, Any]:
        return {name: {"total_ms": round(1000 * self.seconds[name], 1), "calls": self.calls[name],
                       "mean_ms": round(1000 * self.seconds[name] / self.calls[name], 3)} for name in self.seconds}


def closed_loop(core: PagedEngineCore, prompts: list[Any], concurrency: int, *, max_steps: int | None = None
                ) -> dict[str, Any]:
    """W1 through the core alone: `concurrency` requests in flight, a new one as soon as one finishes."""
    pending = list(enumerate(prompts))
    in_flight: set[str] = set()
    generated = 0
    kinds = {"graph_only": 0, "mixed": 0, "eager_only": 0}
    partition = core.runner._partition

    def counting_partition(chunks: list[Any]) -> tuple[list[Any], list[Any]]:
        graphed, eager = partition(chunks)
        kinds["mixed" if graphed and eager else "graph_only" if graphed else "eager_only"] += 1
        return graphed, eager

    def emit(outputs: list[CoreOutput]) -> None:
        nonlocal generated
        for o in outputs:
            generated += len(o.new_token_ids)
            if o.finish_reason is not None:
                in_flight.discard(o.request_id)

    def top_up() -> None:
        while pending and len(in_flight) < concurrency:
            i, prompt = pending.pop(0)
            core.add_request(GenerationRequest(f"cl-{id(prompts)}-{i}", prompt,
                                               SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)))
            in_flight.add(f"cl-{id(prompts)}-{i}")

    with mock.patch.object(core.runner, "_partition", counting_partition):
        top_up()
        _sync()
        started, steps = time.perf_counter(), 0
        while core.has_work() and (max_steps is None or steps < max_steps):
            core.step(emit)
            steps += 1
            top_up()
        _sync()
        seconds = time.perf_counter() - started
    return {"requests": len(prompts) - len(pending), "seconds": round(seconds, 2), "steps": steps,
            "output_tokens": generated, "output_tok_per_s": round(generated / seconds, 1),
            "mean_step_ms": round(1000 * seconds / steps, 2), "steps_by_kind": kinds}


def drain(core: PagedEngineCore) -> None:
    while core.has_work():
        core.step(lambda outputs: None)


def instrumented_closed_loop(core: PagedEngineCore, prompts: list[Any], concurrency: int) -> dict[str, Any]:
    """The closed loop again, with a synchronised timer around each piece of a step."""
    timers = StepTimers()
    runner, adapter = core.runner, core.runner.adapter
    pieces: list[tuple[Any, str, str]] = [
        (core, "step", "step (total)"), (core.scheduler, "schedule", "schedule"),
        (runner, "execute", "execute (all GPU work)"), (runner, "_prepare", "prepare (incl. vision + prompt embedding)"),
        (runner, "sampler", "sampler"), (adapter, "encode_image_batch", "vision tower"),
        (adapter, "embed_prompt", "prompt embedding + positions")]
    if runner._graphs is not None:
        pieces.append((runner._graphs, "run", "decode graph replay"))
    with contextlib.ExitStack() as patches:
        for owner, attribute, label in pieces:
            patches.enter_context(mock.patch.object(owner, attribute, timers.wrap(label, getattr(owner, attribute))))
        result = closed_loop(core, prompts, concurrency)
    result["timers"] = timers.report()
    return result


def profiled_steps(core: PagedEngineCore, prompts: list[Any], concurrency: int, out_dir: Path) -> str:
    """torch.profiler over a window of steady-state closed-loop steps; the top operators by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    closed_loop(core, prompts[:concurrency], concurrency, max_steps=40)  # fill the batch first
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        closed_loop(core, prompts[concurrency:], concurrency, max_steps=60)
    drain(core)
    averages = prof.key_averages()
    tables = []
    for key in ("device_time_total", "cpu_time_total"):
        try:
            tables.append(f"## sorted by {key}\n" + averages.table(sort_by=key, row_limit=30, max_name_column_width=60))
        except Exception as exc:  # sort keys differ across torch versions
            tables.append(f"## sorted by {key}: {exc!r}")
    text = "\n\n".join(tables)
    (out_dir / "profile.txt").write_text(text)
    return text[:3000]


def gil_during_gpu_wait() -> dict[str, float]:
    """How far another Python thread gets while this one waits for the GPU in `tolist()` (what the sampler does),
    against a wait that surely releases the GIL (`time.sleep` for as long). Iterations per ms of a spinning thread;
    `tolist` far below `sleep` would mean the engine thread holds the GIL while it waits."""
    import threading

    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    rates: dict[str, float] = {}
    for name in ("tolist", "sleep"):
        samples = []
        for _ in range(5):
            torch.cuda.synchronize()
            before, started = counter[0], time.perf_counter()
            if name == "tolist":
                y = x
                for _ in range(30):
                    y = x @ x
                y.argmax(-1).tolist()
            else:
                time.sleep(0.05)
            samples.append((counter[0] - before) / (1000 * (time.perf_counter() - started)))
        rates[name] = round(sorted(samples)[2], 1)
    stop.set()
    thread.join()
    return rates


def compile_trial(adapter: Any, renderer: PromptRenderer, reference_tokens: dict[str, list[int]]) -> dict[str, Any]:
    """Decode step times with the decoder `torch.compile`d before graph capture (a fixed pool: the profiled
    core is gone), and how many greedy requests give the same tokens as without compile."""
    from vlmserve.engine.cuda_graphs import DecodeGraphs

    core = PagedEngineCore(adapter, EngineConfig(enable_cuda_graphs=False, num_kv_blocks=8192))
    started = time.perf_counter()
    core.runner._graphs = DecodeGraphs(adapter, core.runner.cache, max_batch=64, max_model_len=core.max_model_len,
                                       compile_decoder=True)
    report: dict[str, Any] = {"compile_and_capture_s": round(time.perf_counter() - started, 1)}
    report["decode_step_ms"] = {b: round(decode_step_ms(core, renderer, b, 1000 * b), 3) for b in (1, 8, 64)}
    reqs = [GenerationRequest(f"eq{i}", render(renderer, 1000 + i),
                              SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)) for i in range(8)]
    got, _, _ = run_all(core, reqs)
    report["greedy_equal_of_8"] = sum(got[f"eq{i}"] == reference_tokens.get(f"eq{i}") for i in range(8))
    return report


def bench_7b(out_dir: Path, *, quick: bool = False, compile_decoder: bool = False) -> dict[str, Any]:
    from bench.models import build_qwen25_vl

    path = Path("/tmp/bench-qwen2.5-vl-7b")
    if not (path / "bench_meta.json").exists():
        build_qwen25_vl(path)
    meta = json.loads((path / "bench_meta.json").read_text())
    adapter = load_model(ModelConfig(model=str(path), device="cuda", dtype="bfloat16", max_model_len=4096))
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id, max_model_len=4096)
    from vlmserve.engine.memory import profile_vision_bytes

    geometry = getattr(adapter, "vision_geometry", None)
    vision_bytes = profile_vision_bytes(adapter)
    tower = {"patch_budget": geometry.patch_budget if geometry else None,
             "peak_gib": round(vision_bytes / 2**30, 2) if vision_bytes is not None else None}
    print(json.dumps({"vision_tower_at_budget": tower}), flush=True)
    started = time.perf_counter()
    core = PagedEngineCore(adapter, EngineConfig())  # the server's defaults
    report: dict[str, Any] = {"engine_init_s": round(time.perf_counter() - started, 1), "meta": meta,
                              "vision_tower_at_budget": tower,
                              "prompt_tokens": render(renderer, 0).num_tokens}
    if not quick:
        report["gil_spin_iterations_per_ms"] = gil_during_gpu_wait()
    print(json.dumps(report, default=str), flush=True)
    report["decode_step_ms"] = {b: round(decode_step_ms(core, renderer, b, 1000 * b), 3) for b in (1, 8, 64)}
    print(json.dumps(report["decode_step_ms"]), flush=True)
    # Fresh images in each phase: a repeated one would hit the image and prefix caches.
    prompts = [render(renderer, 5000 + i) for i in range(64 * 9)]
    if not quick:
        report["w1_core_closed_loop_c64"] = closed_loop(core, prompts[:256], 64)
        print(json.dumps(report["w1_core_closed_loop_c64"]), flush=True)
    report["w1_core_closed_loop_c64_timed"] = instrumented_closed_loop(core, prompts[256:448], 64)
    print(json.dumps(report["w1_core_closed_loop_c64_timed"]), flush=True)
    report["profile_head"] = profiled_steps(core, prompts[448:], 64, out_dir)
    report["stats"] = core.stats().__dict__
    if compile_decoder:
        reqs = [GenerationRequest(f"eq{i}", render(renderer, 1000 + i),
                                  SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)) for i in range(8)]
        reference, _, _ = run_all(core, reqs)
        del core
        torch.cuda.empty_cache()
        (out_dir / "engine_direct.json").write_text(json.dumps(report, indent=2, default=str))
        try:
            report["compiled_decoder"] = compile_trial(adapter, renderer, reference)
        except Exception as exc:  # a result too: what broke
            report["compiled_decoder"] = {"error": f"{type(exc).__name__}: {str(exc)[:1500]}"}
        print(json.dumps(report["compiled_decoder"]), flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--quick", action="store_true", help="skip the GIL check and the untimed closed loop")
    parser.add_argument("--compile-decoder", action="store_true", help="then decode steps with a compiled decoder")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__}
    report.update(check_tiny_on_cuda())
    print(json.dumps(report), flush=True)
    if not args.skip_7b:
        args.out.mkdir(parents=True, exist_ok=True)
        report.update(bench_7b(args.out, quick=args.quick, compile_decoder=args.compile_decoder))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_direct.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
