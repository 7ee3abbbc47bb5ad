"""The plain-transformers baselines without HTTP, on the benchmark checkpoint and card (issue 12).

1. Static-batched `model.generate`: B W1 requests (448x448 image + ~100 text tokens, 128 output tokens forced)
   left-padded into one `generate` call, as a user writes after the one-at-a-time server. Throughput counts the
   processor (CPU) and the generate call.
2. One-at-a-time `generate`, and the same with each thing the seed-style server adds (a text streamer read by
   another thread, a stopping criterion, the asyncio structure of the server): TTFT and TPOT of each, to find
   where the seed server's time goes.

    python3 -m bench.baselines_direct /tmp/bench-qwen2.5-vl-7b --out "$OUT"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.seed_server import _StopWhen, _to_hf_messages
from bench.workloads import data_uri, image_message, noise_image_png, prompt_text

MAX_TOKENS = 128
DEVICE = {"name": "cuda"}  # --device cpu: the CPU harness check


def _sync() -> None:
    if DEVICE["name"] == "cuda":
        torch.cuda.synchronize()


def load(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText

    from bench.seed_server import _load_processor

    processor = _load_processor(path)
    processor.tokenizer.padding_side = "left"
    # As the seed server loads it (device_map needs accelerate, present on the GPU machine).
    device_map = None if DEVICE["name"] == "cpu" else DEVICE["name"]
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, device_map=device_map).eval()
    return model, processor


def messages(processor: Any, count: int, seed: int) -> list[list[dict[str, Any]]]:
    return [[image_message(data_uri(noise_image_png(seed * 1_000_003 + i)),
                           prompt_text(seed * 1_000_003 + i, 100, processor.tokenizer))] for i in range(count)]


def prepare(processor: Any, batch: list[list[dict[str, Any]]], device: Any) -> Any:
    texts, images = [], []
    for request_messages in batch:
        hf_messages, request_images = _to_hf_messages(request_messages)
        texts.append(processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False))
        images.extend(request_images)
    return processor(text=texts, images=images, padding=True, return_tensors="pt").to(device)


def greedy(num_tokens: int) -> dict[str, Any]:
    return {"max_new_tokens": num_tokens, "min_new_tokens": num_tokens, "do_sample": False}


def static_batch(model: Any, processor: Any, batch_size: int) -> dict[str, Any]:
    """One padded `generate` call over `batch_size` requests (a warm-up batch of 2 first)."""
    model.generate(**prepare(processor, messages(processor, 2, seed=900 + batch_size), model.device), **greedy(4))
    batch = messages(processor, batch_size, seed=batch_size)
    _sync()
    started = time.perf_counter()
    inputs = prepare(processor, batch, model.device)
    prepared = time.perf_counter()
    out = model.generate(**inputs, **greedy(MAX_TOKENS))
    _sync()
    done = time.perf_counter()
    generated = (out.shape[1] - inputs["input_ids"].shape[1]) * batch_size
    return {"batch": batch_size, "padded_prompt_tokens": int(inputs["input_ids"].shape[1]),
            "prepare_s": round(prepared - started, 3), "generate_s": round(done - prepared, 3),
            "output_tokens": generated, "output_tok_per_s": round(generated / (done - started), 1),
            "output_tok_per_s_generate_only": round(generated / (done - prepared), 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEVICE["name"] == "cuda" else None}


def _timed(fn: Any) -> float:
    _sync()
    started = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - started


def one_at_a_time(model: Any, processor: Any, variant: str, num_requests: int) -> dict[str, Any]:
    """TTFT (a 1-token generate) and TPOT ((128-token time - TTFT) / 127) per request, medians."""
    ttfts, tpots = [], []
    for request_messages in messages(processor, num_requests, seed=7):
        inputs = prepare(processor, [request_messages], model.device)
        ttft = _timed(lambda inputs=inputs: model.generate(**inputs, **greedy(1)))
        total = _timed(lambda inputs=inputs: run_variant(model, processor, inputs, variant))
        ttfts.append(ttft)
        tpots.append((total - ttft) / (MAX_TOKENS - 1))
    return {"variant": variant, "requests": num_requests, "ttft_ms": round(1000 * statistics.median(ttfts), 1),
            "tpot_ms": round(1000 * statistics.median(tpots), 2),
            "tok_per_s": round(1 / statistics.median(tpots), 1)}


def run_variant(model: Any, processor: Any, inputs: Any, variant: str) -> None:
    from transformers import AsyncTextIteratorStreamer, StoppingCriteriaList, TextIteratorStreamer

    kwargs = greedy(MAX_TOKENS)
    if variant == "plain":
        model.generate(**inputs, **kwargs)
    elif variant == "stop_criterion":
        model.generate(**inputs, **kwargs, stopping_criteria=StoppingCriteriaList([_StopWhen(threading.Event())]))
    elif variant == "streamer_thread":
        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        reader = threading.Thread(target=lambda: [None for _ in streamer], daemon=True)
        reader.start()
        model.generate(**inputs, **kwargs, streamer=streamer)
        reader.join()
    elif variant == "seed_structure":  # the seed server's stream() without HTTP: loop here, generate in a thread
        async def main() -> None:
            streamer = AsyncTextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            worker = threading.Thread(target=lambda: model.generate(
                **inputs, **kwargs, streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_StopWhen(threading.Event())])), daemon=True)
            worker.start()
            async for _ in streamer:
                pass
            await asyncio.to_thread(worker.join)

        asyncio.run(main())
    else:
        raise ValueError(variant)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", default="8,64")
    parser.add_argument("--variants", default="plain,stop_criterion,streamer_thread,seed_structure")
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    DEVICE["name"] = args.device
    started = time.perf_counter()
    model, processor = load(args.model_dir)
    hooks = sum(1 for m in model.modules() if hasattr(m, "_hf_hook"))
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "load_s": round(time.perf_counter() - started, 1),
                              "accelerate_hooks": hooks, "attn_implementation": model.config._attn_implementation,
                              "one_at_a_time": [], "static_batch": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for variant in (v for v in args.variants.split(",") if v):
        report["one_at_a_time"].append(one_at_a_time(model, processor, variant, args.requests))
        print(json.dumps(report["one_at_a_time"][-1]), flush=True)
    for batch_size in (int(b) for b in args.batches.split(",") if b):
        report["static_batch"].append(static_batch(model, processor, batch_size))
        print(json.dumps(report["static_batch"][-1]), flush=True)
        (args.out / "baselines_direct.json").write_text(json.dumps(report, indent=1))
    (args.out / "baselines_direct.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
