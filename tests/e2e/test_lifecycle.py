"""Client disconnects and SIGTERM: the engine's own stats prove the work stopped."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ServerProcess, data_uri, png_bytes

KEY = "sk-lifecycle"
HEADERS = {"Authorization": f"Bearer {KEY}"}
LONG = {"model": "tiny", "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(png_bytes((30, 60, 90)))}},
            {"type": "text", "text": "Talk for a long time."}]}]}


def start(tiny_qwen2_vl: Path, start_server: type[ServerProcess], *extra: str) -> ServerProcess:
    return start_server([str(tiny_qwen2_vl), "--served-model-name", "tiny", "--api-key", KEY, *extra])


def stats(server: ServerProcess) -> dict[str, Any]:
    return httpx.get(f"{server.base_url}/stats", headers=HEADERS, timeout=10).json()


def wait_for(predicate: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_mid_stream_stops_generation(tiny_qwen2_vl: Path, start_server: type[ServerProcess]) -> None:
    server = start(tiny_qwen2_vl, start_server)
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{server.base_url}/v1/chat/completions", json=LONG, headers=HEADERS) as response:
        lines = response.iter_lines()
        content_chunks = 0
        for line in lines:
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                content_chunks += 1
            if content_chunks >= 3:
                break
        assert stats(server)["num_running"] == 1
    # the connection is closed: within a few engine steps nothing runs and the blocks are back
    assert wait_for(lambda: stats(server)["num_running"] == 0)
    after = stats(server)
    assert after["num_aborted"] == 1
    assert after["num_generated_tokens"] < 3000
    assert after["num_kv_blocks_free"] == after["num_kv_blocks_total"]
    generated = after["num_generated_tokens"]
    time.sleep(0.5)
    assert stats(server)["num_generated_tokens"] == generated  # nothing is still being generated


def test_sigterm_refuses_new_work_aborts_the_rest_and_exits_cleanly(
        tiny_qwen2_vl: Path, start_server: type[ServerProcess]) -> None:
    server = start(tiny_qwen2_vl, start_server, "--shutdown-timeout-s", "1.5")
    events: list[dict[str, Any]] = []

    def consume() -> None:
        with httpx.Client(timeout=60) as client, client.stream(
                "POST", f"{server.base_url}/v1/chat/completions", json=LONG, headers=HEADERS) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[len("data: "):]))

    reader = threading.Thread(target=consume)
    reader.start()
    assert wait_for(lambda: len(events) > 3)
    server.process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: httpx.get(f"{server.base_url}/health", timeout=5).status_code == 503, 5)
    refused = httpx.post(f"{server.base_url}/v1/chat/completions", json={**LONG, "stream": False},
                         headers=HEADERS, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
    reader.join(30)
    finishes = [c["choices"][0]["finish_reason"] for c in events if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["abort"]  # 3000 tokens cannot finish in 1.5 s: ended explicitly, not cut off
    assert server.process.wait(30) == 0
    assert "Traceback" not in server.log()
