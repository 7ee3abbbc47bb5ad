"""Overload (issue 6): beyond --max-num-seqs + --max-waiting-requests the server answers 429 with Retry-After and
an OpenAI error body, at once; every admitted request completes; afterwards the server serves normally."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.e2e.hardening_support import (
    LOAD_KEY,
    MAX_NUM_SEQS,
    MAX_WAITING,
    assert_openai_error,
    assert_serves,
    chat_body,
    load_server,
)

HEADERS = {"Authorization": f"Bearer {LOAD_KEY}"}
NUM_REQUESTS = 40
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def loaded(start_server: type[ServerProcess], tiny_qwen2_vl: Path) -> tuple[ServerProcess, str]:
    return load_server(start_server, tiny_qwen2_vl)


async def burst(server: ServerProcess, model: str, count: int) -> list[httpx.Response]:
    body = chat_body("Tell me a long story.", model=model, max_tokens=MAX_TOKENS, ignore_eos=True)
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.base_url, headers=HEADERS, timeout=120, limits=limits) as client:
        return list(await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(count))))


def test_burst_beyond_the_queue_gets_429_with_retry_after(loaded: tuple[ServerProcess, str]) -> None:
    server, model = loaded
    responses = asyncio.run(burst(server, model, NUM_REQUESTS))
    refused = [r for r in responses if r.status_code == 429]
    served = [r for r in responses if r.status_code == 200]
    assert len(refused) + len(served) == NUM_REQUESTS, sorted({r.status_code for r in responses})
    assert refused and len(served) >= MAX_NUM_SEQS + MAX_WAITING  # at least the whole queue got in
    for response in refused:
        error = assert_openai_error(response, 429, code="queue_full")
        assert error["type"] == "rate_limit_error" and "--max-waiting-requests" in error["message"]
        assert int(response.headers["retry-after"]) >= 1
    for response in served:
        assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS
    stats = httpx.get(f"{server.base_url}/stats", headers=HEADERS).json()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_kv_blocks_free"] == stats["num_kv_blocks_total"]
    assert_serves(server, HEADERS, model=model)
