"""Serving metrics with `vllm bench serve`'s definitions, computed from per-request stream timings.

- TTFT: from sending the request to the first streamed chunk that carries content.
- TPOT: per request, (E2E - TTFT) / (output_tokens - 1), for requests with more than one output token.
- ITL: every gap between consecutive content chunks (a chunk carrying several tokens is one gap).
- E2E: from sending the request to the end of its stream.
- Throughput: completed requests, and output tokens, per second of the benchmark's duration.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One request's outcome; times in seconds relative to the benchmark's start."""

    index: int
    start_s: float
    is_success: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    is_usage_reported: bool = False
    text: str = ""
    turn: int | None = None
    conversation: int | None = None

    @property
    def end_s(self) -> float:
        return self.start_s + (self.e2e_s or 0.0)

    @property
    def tpot_s(self) -> float | None:
        if not self.is_success or self.ttft_s is None or self.e2e_s is None or (self.output_tokens or 0) < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)  # type: ignore[operator]

    @property
    def itls_s(self) -> list[float]:
        times = self.chunk_times_s
        return [b - a for a, b in itertools.pairwise(times)]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without numpy."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values_s: list[float]) -> dict[str, float]:
    """mean / p50 / p90 / p99 (and count) of a list of seconds, in milliseconds."""
    values = [v * 1000.0 for v in values_s]
    summary: dict[str, float] = {"mean": sum(values) / len(values) if values else math.nan}
    for q in PERCENTILES:
        summary[f"p{q}"] = percentile(values, q)
    summary["count"] = len(values)
    return summary


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    """The aggregate metrics of one benchmark run."""
    done = [r for r in results if r.is_success]
    output_tokens = sum(r.output_tokens or 0 for r in done)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    duration = max(duration_s, 1e-9)
    return {
        "completed": len(done),
        "failed": sum(1 for r in results if not r.is_success and r.error != "cancelled"),
        "cancelled": sum(1 for r in results if r.error == "cancelled"),
        "duration_s": duration_s,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "usage_reported": all(r.is_usage_reported for r in done),
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "ttft_ms": distribution_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": distribution_ms([t for r in done if (t := r.tpot_s) is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itls_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done if r.e2e_s is not None]),
        "mean_output_tokens": output_tokens / len(done) if done else math.nan,
        "mean_prompt_tokens": prompt_tokens / len(done) if done else math.nan,
        "mean_content_chunks": sum(len(r.chunk_times_s) for r in done) / len(done) if done else math.nan,
    }


def summarize_turns(results: list[RequestResult]) -> list[dict[str, Any]]:
    """Per-turn TTFT and prompt length for multi-turn conversations (W3)."""
    turns = sorted({r.turn for r in results if r.turn is not None})
    rows = []
    for turn in turns:
        done = [r for r in results if r.turn == turn and r.is_success]
        rows.append({
            "turn": turn,
            "completed": len(done),
            "ttft_ms": distribution_ms([r.ttft_s for r in done if r.ttft_s is not None]),
            "mean_prompt_tokens": sum(r.prompt_tokens or 0 for r in done) / len(done) if done else math.nan,
        })
    return rows
