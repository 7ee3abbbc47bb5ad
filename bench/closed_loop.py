"""The engine core driven without HTTP in a closed loop: `concurrency` requests in flight, a new one as soon as one
finishes; what bench/structured_overhead.py and bench/moe.py time."""

from __future__ import annotations

import time
from typing import Any

import torch

from vlmserve.engine.protocol import CoreOutput
from vlmserve.types import GenerationRequest, SamplingParams


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def closed_loop(core: Any, prompts: list[Any], concurrency: int, params: SamplingParams, tag: str,
                device: str) -> dict[str, Any]:
    """Every prompt through `core` with `params`; output tokens per second over the whole run (device-synchronised
    at both ends), steps and finish reasons. A request that fails raises."""
    pending = list(enumerate(prompts))
    in_flight: set[str] = set()
    finishes: dict[str, int] = {}
    generated = 0

    def emit(outputs: list[CoreOutput]) -> None:
        nonlocal generated
        for o in outputs:
            if o.error:
                raise RuntimeError(o.error)
            generated += len(o.new_token_ids)
            if o.finish_reason is not None:
                in_flight.discard(o.request_id)
                finishes[o.finish_reason.value] = finishes.get(o.finish_reason.value, 0) + 1

    def top_up() -> None:
        while pending and len(in_flight) < concurrency:
            i, prompt = pending.pop(0)
            core.add_request(GenerationRequest(f"{tag}-{i}", prompt, params))
            in_flight.add(f"{tag}-{i}")

    top_up()
    sync(device)
    started, steps = time.perf_counter(), 0
    while core.has_work():
        core.step(emit)
        steps += 1
        top_up()
    sync(device)
    seconds = time.perf_counter() - started
    return {"requests": len(prompts), "concurrency": concurrency, "seconds": round(seconds, 3), "steps": steps,
            "output_tokens": generated, "output_tok_per_s": round(generated / seconds, 1),
            "mean_step_ms": round(1000 * seconds / steps, 3), "finish_reasons": finishes}
