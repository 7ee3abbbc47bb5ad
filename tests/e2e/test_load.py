"""Load (issue 6): 500 concurrent requests against the demo model (the tiny Qwen2-VL when the demo weights are
absent) with a 12-sequence queue. Every request gets a final status (200 with an answer, or 429), the server's
memory stays bounded, and it serves normally afterwards."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, data_uri, png_bytes
from tests.e2e.hardening_support import LOAD_KEY, assert_serves, chat_body, load_server, rss_kib

HEADERS = {"Authorization": f"Bearer {LOAD_KEY}"}
NUM_REQUESTS = 500
MAX_TOKENS = 4
#: RSS growth allowed over the burst: 500 connections, their buffers and allocator slack, not 500 requests' images
MAX_RSS_GROWTH_KIB = 200 * 1024


@pytest.fixture(scope="module")
def loaded(start_server: type[ServerProcess], tiny_qwen2_vl: Path) -> tuple[ServerProcess, str]:
    return load_server(start_server, tiny_qwen2_vl)


def bodies(model: str) -> list[dict[str, Any]]:
    """A mix: text, images (a few distinct ones, so the image cache and prefix cache are exercised) and streams."""
    images = [data_uri(png_bytes((i * 40, 255 - i * 40, 90), (64 + 8 * i, 64))) for i in range(5)]
    result = []
    for i in range(NUM_REQUESTS):
        image = images[i % 5] if i % 2 else None
        body = chat_body(f"What shape is this? #{i % 7}", image=image, model=model, max_tokens=MAX_TOKENS)
        if i % 5 == 0:
            body["stream"] = True
        result.append(body)
    return result


def outcome(response: httpx.Response, is_stream: bool) -> str:
    """'answer', 'refused' (429), or what went wrong."""
    if response.status_code == 429:
        error = response.json()["error"]
        assert error["code"] == "queue_full" and int(response.headers["retry-after"]) >= 1
        return "refused"
    if response.status_code != 200:
        return f"status {response.status_code}"
    if not is_stream:
        choice = response.json()["choices"][0]
        return "answer" if choice["finish_reason"] in ("stop", "length") else "unfinished"
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    if events[-1:] != ["[DONE]"]:
        return "stream without [DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    if any("error" in chunk for chunk in chunks):
        # NOTE: lost the race for the last slot after its 200 was sent: refused inside the stream (documented)
        assert all(c["error"]["code"] == "queue_full" for c in chunks if "error" in c)
        return "refused"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    return "answer" if finishes and finishes[0] in ("stop", "length") else "unfinished"


async def fire(server: ServerProcess, requests: list[dict[str, Any]]) -> list[str]:
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.base_url, headers=HEADERS, timeout=120, limits=limits) as client:
        async def one(body: dict[str, Any]) -> str:
            try:
                response = await client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as exc:
                return f"transport error {type(exc).__name__}"
            return outcome(response, bool(body.get("stream")))

        return list(await asyncio.gather(*(one(body) for body in requests)))


def test_500_concurrent_requests(loaded: tuple[ServerProcess, str]) -> None:
    server, model = loaded
    requests = bodies(model)
    assert_serves(server, HEADERS, model=model)  # warm: the first request pays one-off costs
    before = rss_kib(server.process.pid)
    started = time.monotonic()
    outcomes = Counter(asyncio.run(fire(server, requests)))
    duration = time.monotonic() - started
    after = rss_kib(server.process.pid)
    print(f"\nload: {dict(outcomes)} in {duration:.1f}s; RSS {before // 1024} MiB -> {after // 1024} MiB "
          f"({'demo model' if model == 'vlmserve-demo' else 'tiny Qwen2-VL'})")
    assert set(outcomes) <= {"answer", "refused"}, outcomes
    assert outcomes["answer"] >= 12 and outcomes["refused"] > 0
    assert after - before < MAX_RSS_GROWTH_KIB, (before, after)
    stats = httpx.get(f"{server.base_url}/stats", headers=HEADERS).json()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_kv_blocks_free"] == stats["num_kv_blocks_total"]
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert_serves(server, HEADERS, model=model)
