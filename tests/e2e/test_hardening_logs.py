"""Request logs (issue 6): one line per request with its id, status, timing, image hashes and sizes; never base64
bodies, image bytes, API keys, or prompts (unless --log-requests, which logs the prompt but still no image data)."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import ServerProcess, data_uri, png_bytes
from tests.e2e.conftest import API_KEY
from tests.e2e.conftest import MODEL as DEFAULT_MODEL
from tests.e2e.hardening_support import KEYS, chat_body, hardened_server, post_chat
from vlmserve.multimodal.decode import image_hash

IMAGE = png_bytes((17, 140, 230), (72, 56))


def request_lines(server: ServerProcess, request_id: str, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """The parsed log lines of `request_id` (the line is written as the response finishes: wait for it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(line.split(" request ", 1)[1]) for line in server.log().splitlines()
                 if "vlmserve.requests: request {" in line and request_id in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def expected_image_entry(data: bytes) -> str:
    picture = Image.open(io.BytesIO(data)).convert("RGB")
    return f"{image_hash(picture)[:16]}:{picture.width}x{picture.height}"


def test_one_line_per_request_without_secrets(server: ServerProcess) -> None:
    prompt = f"PROMPT-{uuid.uuid4().hex}"
    body = chat_body(prompt, image=data_uri(IMAGE), model=DEFAULT_MODEL, max_tokens=3)
    ok = post_chat(server, body, {"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200, ok.text
    streamed = post_chat(server, {**body, "stream": True}, {"Authorization": f"Bearer {API_KEY}"})
    assert streamed.status_code == 200
    wrong_key = f"sk-wrong-{uuid.uuid4().hex}"
    refused = post_chat(server, body, {"Authorization": f"Bearer {wrong_key}"})
    invalid = post_chat(server, {**body, "temperature": 9}, {"Authorization": f"Bearer {API_KEY}"})
    assert (refused.status_code, invalid.status_code) == (401, 400)

    ids = [ok.json()["id"], streamed.headers["x-request-id"], refused.headers["x-request-id"],
           invalid.headers["x-request-id"]]
    assert ids[0] == ok.headers["x-request-id"]
    lines = {request_id: request_lines(server, request_id) for request_id in ids}
    assert all(len(found) == 1 for found in lines.values()), lines
    completed, stream_line, auth_line, invalid_line = (lines[i][0] for i in ids)
    for line in (completed, stream_line):
        assert line["status"] == 200 and line["path"] == "/v1/chat/completions"
        assert isinstance(line["ms"], int) and line["ms"] >= 0
        assert line["images"] == [expected_image_entry(IMAGE)]
        assert line["prompt_tokens"] > line["image_tokens"] > 0
    assert completed["completion_tokens"] == 3
    assert (auth_line["status"], auth_line["code"]) == (401, "invalid_api_key")
    assert (invalid_line["status"], invalid_line["param"]) == (400, "temperature")

    log = server.log()
    encoded = base64.b64encode(IMAGE).decode()
    for secret in (prompt, API_KEY, wrong_key, encoded[:40], encoded[-40:]):
        assert secret not in log, f"{secret[:20]}... is in the log"
    assert IMAGE[:16].decode("latin-1") not in log  # the PNG signature and header bytes


def test_log_requests_adds_the_prompt_but_never_image_data_or_keys(
        start_server: type[ServerProcess], tiny_qwen2_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    server = hardened_server(start_server, tiny_qwen2_vl, tmp_path_factory.mktemp("keys"))
    prompt = f"P{uuid.uuid4().hex[:6]}"  # short: this server's context is 64 tokens
    image = png_bytes((3, 3, 200), (40, 40))
    response = post_chat(server, chat_body(prompt, image=data_uri(image)))
    assert response.status_code == 200, response.text
    (line,) = request_lines(server, response.json()["id"])
    assert prompt in json.dumps(line["messages"])
    assert line["images"] == [expected_image_entry(image)]
    log = server.log()
    encoded = base64.b64encode(image).decode()
    assert encoded[:40] not in log and encoded[-40:] not in log
    assert all(key not in log for key in KEYS)
    assert httpx.get(f"{server.base_url}/health").status_code == 200
