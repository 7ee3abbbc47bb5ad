"""Isolation between clients (issue 11, classes 5, 6 and 9), through a real server with two API keys: one key's
long streams cannot starve the other, its quota answers 429, the prefix cache tells no key what another sent, and
huge prompts are refused from their size without holding up anyone else."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.e2e.hardening_support import (
    KEYS,
    MODEL,
    HealthProbe,
    assert_openai_error,
    assert_serves,
    chat_body,
    post_chat,
    round2_server,
)

HOG = {"Authorization": f"Bearer {KEYS[0]}"}
OTHER = {"Authorization": f"Bearer {KEYS[1]}"}


@pytest.fixture(scope="module")
def server(start_server: type[ServerProcess], tiny_qwen2_vl: Path) -> ServerProcess:
    return round2_server(start_server, tiny_qwen2_vl)


class Stream:
    """A streamed completion read in a thread until it ends or `stop()` is called."""

    def __init__(self, server: ServerProcess, body: dict[str, object], headers: dict[str, str]) -> None:
        self.status = 0
        self.done = False
        self.num_chunks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server, body, headers), daemon=True)
        self._thread.start()

    def _run(self, server: ServerProcess, body: dict[str, object], headers: dict[str, str]) -> None:
        with httpx.Client(timeout=120) as client, client.stream(
                "POST", f"{server.base_url}/v1/chat/completions", json={**body, "stream": True},
                headers=headers) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    self.num_chunks += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def test_one_keys_long_streams_do_not_starve_another_key(server: ServerProcess) -> None:
    hog_body = chat_body("Tell me everything.", n=2, max_tokens=3000, ignore_eos=True, temperature=1.0)
    hogs = [Stream(server, hog_body, HOG) for _ in range(2)]  # 4 sequences: every running slot
    try:
        deadline = time.monotonic() + 30
        while min(h.num_chunks for h in hogs) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(h.status == 200 for h in hogs)
        # the hog's share (capacity 8 / 2 keys) is used up: more from it is refused at once
        refused = post_chat(server, hog_body, HOG)
        error = assert_openai_error(refused, 429, code="quota_exceeded")
        assert "--max-sequences-per-client" in error["message"] and int(refused.headers["retry-after"]) >= 1
        started = time.monotonic()
        with HealthProbe(server) as probe:
            other = post_chat(server, chat_body("Quick question", max_tokens=4), OTHER)
        waited = time.monotonic() - started
        assert other.status_code == 200, other.text
        assert not any(h.done for h in hogs), "the other key was only served after the hog's streams ended"
        assert waited < 10, waited  # generous: the hog's streams last far longer on any machine
        assert probe.worst_s < 2.0, probe.worst_s
    finally:
        for hog in hogs:
            hog.stop()
    assert_serves(server, OTHER)


def cached_tokens(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_the_prefix_cache_is_per_key(server: ServerProcess) -> None:
    secret = "The launch code is " + " ".join(f"word{i}" for i in range(120))
    body = chat_body(secret, max_tokens=1)
    # the template's system prompt may already be cached for either key; the secret's blocks are what matter
    first, again = cached_tokens(post_chat(server, body, HOG)), cached_tokens(post_chat(server, body, HOG))
    assert again >= first + 64  # a key's own repeats still hit its cache
    other_first = cached_tokens(post_chat(server, body, OTHER))
    assert other_first < again - 32  # the other key learns nothing of what the hog sent
    assert cached_tokens(post_chat(server, body, OTHER)) >= other_first + 64


def test_completions_share_the_prefix_cache_per_key_only(server: ServerProcess) -> None:
    """/v1/completions is salted like chat: a key's repeat hits its own blocks, another key finds none of them."""
    body = {"model": MODEL, "prompt": "The vault code is " + " ".join(f"item{i}" for i in range(120)),
            "max_tokens": 1}

    def post(headers: dict[str, str]) -> int:
        return cached_tokens(httpx.post(f"{server.base_url}/v1/completions", json=body, headers=headers,
                                        timeout=60))

    first, again = post(HOG), post(HOG)
    assert first == 0 and again >= 64  # a plain prompt (no template): nothing cached before its first run
    assert post(OTHER) == 0  # the same tokens under another key share no block
    assert post(OTHER) >= 64


def test_huge_prompts_are_refused_from_their_size_while_others_are_served(server: ServerProcess) -> None:
    huge = chat_body("lorem ipsum " * 300_000)  # 3.6 MB of text: beyond the context at any tokenisation
    large = chat_body("lorem ipsum " * 5_000)  # tokenised, then over the 4096-token context
    with HealthProbe(server) as probe, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post_chat, server, body, headers) for body, headers in
                   ((huge, HOG), (huge, OTHER), (large, HOG), (large, OTHER))]
        small = post_chat(server, chat_body("hi", max_tokens=2), OTHER)
        answers = [f.result() for f in futures]
    assert small.status_code == 200, small.text
    for answer in answers:
        error = assert_openai_error(answer, 400, param="messages", code="context_length_exceeded")
        assert "--max-model-len" in error["message"]
    assert "characters" in json.loads(answers[0].text)["error"]["message"]  # refused before tokenising
    assert probe.worst_s < 2.0, probe.worst_s


def test_no_endpoint_reports_cached_tokens_when_told_not_to(start_server: type[ServerProcess],
                                                            tiny_qwen2_vl: Path) -> None:
    """--no-report-cached-tokens: chat, completions and responses all say 0, though their repeats hit the cache."""
    quiet = start_server([str(tiny_qwen2_vl), "--served-model-name", MODEL, "--no-report-cached-tokens"])
    text = "The vault code is " + " ".join(f"item{i}" for i in range(120))
    requests = [("/v1/chat/completions", chat_body(text, max_tokens=1)),
                ("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}),
                ("/v1/responses", {"model": MODEL, "input": text, "max_output_tokens": 1})]
    for path, body in requests:
        for _ in range(2):
            response = httpx.post(f"{quiet.base_url}{path}", json=body, timeout=60)
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            details = usage.get("prompt_tokens_details") or usage["input_tokens_details"]
            assert details["cached_tokens"] == 0, (path, usage)
    hits = httpx.get(f"{quiet.base_url}/metrics", timeout=10).text
    assert any(line.startswith("vllm:prefix_cache_hits") and not line.endswith(" 0.0")
               for line in hits.splitlines() if not line.startswith("#")), "the repeats did hit the prefix cache"
