"""Metric definitions of the load generator (vllm bench serve's) on hand-made timings."""

from __future__ import annotations

import json
import math

import pytest

from bench.loadgen import _finish, _handle_event
from bench.metrics import RequestResult, percentile, summarize, summarize_turns


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def _result(index: int, start: float, ttft: float, e2e: float, tokens: int, chunks: list[float]) -> RequestResult:
    return RequestResult(index=index, start_s=start, is_success=True, ttft_s=ttft, e2e_s=e2e,
                         chunk_times_s=chunks, prompt_tokens=100, output_tokens=tokens, is_usage_reported=True)


def test_tpot_and_itl_follow_their_definitions() -> None:
    result = _result(0, 0.0, ttft=0.2, e2e=1.0, tokens=5, chunks=[0.2, 0.4, 0.5, 0.8, 1.0])
    assert result.tpot_s == pytest.approx((1.0 - 0.2) / 4)
    assert result.itls_s == pytest.approx([0.2, 0.1, 0.3, 0.2])
    one_token = _result(1, 0.0, ttft=0.2, e2e=0.2, tokens=1, chunks=[0.2])
    assert one_token.tpot_s is None


def test_summary_counts_only_successes_and_divides_by_duration() -> None:
    ok = [_result(0, 0.0, 0.1, 1.0, 10, [0.1, 1.0]), _result(1, 0.5, 0.3, 1.5, 20, [0.8, 2.0])]
    failed = RequestResult(index=2, start_s=0.0, error="HTTP 500: boom")
    cancelled = RequestResult(index=3, start_s=0.0, error="cancelled")
    summary = summarize([*ok, failed, cancelled], duration_s=2.0)
    assert (summary["completed"], summary["failed"], summary["cancelled"]) == (2, 1, 1)
    assert summary["output_throughput"] == pytest.approx(15.0)
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert summary["itl_ms"]["count"] == 2
    assert summary["tpot_ms"]["mean"] == pytest.approx(((0.9 / 9) + (1.2 / 19)) / 2 * 1000)


def test_turn_summary_groups_by_turn() -> None:
    results = [_result(i, 0.0, 0.1 * (i + 1), 1.0, 4, [0.1]) for i in range(4)]
    for i, r in enumerate(results):
        r.turn, r.conversation = i % 2 + 1, i // 2
    rows = summarize_turns(results)
    assert [row["turn"] for row in rows] == [1, 2]
    assert rows[0]["ttft_ms"]["p50"] == pytest.approx(200.0)


def test_sse_events_fill_a_result() -> None:
    result = RequestResult(index=0, start_s=1.0)
    role = {"choices": [{"delta": {"role": "assistant", "content": ""}}]}
    assert _handle_event(json.dumps(role), result, 1.1)
    assert result.ttft_s is None  # a role-only chunk carries no content
    assert _handle_event(json.dumps({"choices": [{"delta": {"content": "Hi"}}]}), result, 1.3)
    assert _handle_event(json.dumps({"choices": [{"delta": {"content": " there"}}]}), result, 1.4)
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    assert _handle_event(json.dumps(usage), result, 1.5)
    assert not _handle_event("[DONE]", result, 1.6)
    _finish(result, 1.6)
    assert result.is_success and result.ttft_s == pytest.approx(0.3)
    assert (result.text, result.output_tokens, result.prompt_tokens) == ("Hi there", 3, 7)
    assert result.chunk_times_s == [1.3, 1.4]


def test_stream_without_usage_counts_chunks_and_errors_raise() -> None:
    result = RequestResult(index=0, start_s=0.0)
    _handle_event(json.dumps({"choices": [{"delta": {"content": "a"}}]}), result, 0.5)
    _finish(result, 0.6)
    assert result.output_tokens == 1 and not result.is_usage_reported
    with pytest.raises(RuntimeError, match="boom"):
        _handle_event(json.dumps({"error": "boom"}), RequestResult(index=1, start_s=0.0), 0.1)
    empty = RequestResult(index=2, start_s=0.0)
    _finish(empty, 0.2)
    assert not empty.is_success and empty.error
