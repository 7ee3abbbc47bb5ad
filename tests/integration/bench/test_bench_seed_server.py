"""The seed-style baseline and our load generator, end to end over HTTP on a tiny random Qwen2-VL (CPU)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.loadgen import LoadGenerator
from bench.workloads import RequestOptions, data_uri, image_message, noise_image_png, request_body
from tests.fixtures.tiny.qwen2_vl import build_qwen2_vl


@pytest.fixture(scope="module")
def seed_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import uvicorn

    from bench.seed_server import SeedModel, build_app

    path: Path = build_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))
    app = build_app(SeedModel(str(path), device="cpu", dtype="float32"), "bench")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_closed_loop_measures_fixed_length_streams(seed_url: str) -> None:
    options = RequestOptions(model="bench", max_tokens=6)
    bodies = [request_body([image_message(data_uri(noise_image_png(i, size=112)), f"Describe image {i}.")], options)
              for i in range(3)]

    async def run() -> dict:
        async with LoadGenerator(seed_url) as generator:
            return await generator.closed_loop(bodies, concurrency=2, max_duration_s=60)

    summary = asyncio.run(run())
    assert summary["completed"] == 3 and summary["errors"] == [] and not summary["is_truncated"]
    assert summary["usage_reported"] and summary["total_output_tokens"] == 18  # ignore_eos: exactly max_tokens
    assert summary["ttft_ms"]["count"] == 3 and summary["ttft_ms"]["p50"] > 0
    assert summary["mean_prompt_tokens"] > 16  # the 112x112 image alone is 16 tokens
    assert summary["output_throughput"] > 0


def test_conversations_resend_the_growing_history(seed_url: str) -> None:
    options = RequestOptions(model="bench", max_tokens=4)

    async def run() -> dict:
        async with LoadGenerator(seed_url) as generator:
            return await generator.conversations(num_conversations=1, num_turns=3, options=options, seed=5,
                                                 max_duration_s=60)

    summary = asyncio.run(run())
    turns = summary["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and all(t["completed"] == 1 for t in turns)
    prompts = [t["mean_prompt_tokens"] for t in turns]
    assert prompts[0] < prompts[1] < prompts[2]


def test_time_cap_cancels_and_marks_truncated(seed_url: str) -> None:
    options = RequestOptions(model="bench", max_tokens=64)
    bodies = [request_body([{"role": "user", "content": f"Count to ten, {i}."}], options) for i in range(4)]

    async def run() -> dict:
        async with LoadGenerator(seed_url) as generator:
            return await generator.closed_loop(bodies, concurrency=4, max_duration_s=0.05)

    summary = asyncio.run(run())
    assert summary["is_truncated"] and summary["completed"] < 4 and summary["cancelled"] >= 1
