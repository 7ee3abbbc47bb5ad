"""Request limits (issue 6): body and header size, messages, stop strings, n, the context window, image detail.

Every refusal is checked for its status, the OpenAI error body (param naming the field), no leaked library text,
and the server answering the next ordinary request.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, data_uri, png_bytes
from tests.e2e.hardening_support import (
    HEADERS,
    MAX_MODEL_LEN,
    MAX_REQUEST_BYTES,
    assert_no_leak,
    assert_openai_error,
    assert_serves,
    chat_body,
    hardened_server,
    parse_raw,
    post_chat,
    raw_http,
    raw_request,
    small_image,
)


@pytest.fixture(scope="module")
def server(start_server: type[ServerProcess], tiny_qwen2_vl: Path,
           tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    return hardened_server(start_server, tiny_qwen2_vl, tmp_path_factory.mktemp("keys"))


def test_body_over_the_cap_with_content_length_is_413_before_parsing(server: ServerProcess) -> None:
    # Not even JSON: a parser running first would answer 400; the cap answers 413 from the header alone.
    response = post_chat(server, b"{" * (MAX_REQUEST_BYTES + 1))
    error = assert_openai_error(response, 413, code="payload_too_large")
    assert str(MAX_REQUEST_BYTES) in error["message"] and "--max-request-bytes" in error["message"]
    assert_serves(server)


def test_chunked_body_without_length_is_cut_off_at_the_cap(server: ServerProcess) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(16):  # twice the cap in 8 KiB pieces (small enough for socket buffers to absorb the rest)
            yield b" " * 8192

    with httpx.Client(timeout=30) as client:
        try:
            response = client.post(f"{server.base_url}/v1/chat/completions", content=chunks(),
                                   headers={**HEADERS, "Content-Type": "application/json"})
        except httpx.HTTPError:
            pytest.fail("the server cut the connection instead of answering 413")
    assert "content-length" not in response.request.headers  # it really was chunked
    assert_openai_error(response, 413, code="payload_too_large")
    assert_serves(server)


def test_body_just_under_the_cap_is_parsed(server: ServerProcess) -> None:
    body = chat_body("x", user="u" * (MAX_REQUEST_BYTES - 400))  # padding in a field the server ignores
    response = post_chat(server, body)
    assert response.status_code == 200, response.text


def test_oversized_header_gets_a_clean_4xx(server: ServerProcess) -> None:
    # h11 (uvicorn's HTTP/1.1 parser) refuses a header block over 16 KiB that arrives in pieces, answering a short
    # plain-text 400 before the application runs; nothing is buffered without bound.
    answer = raw_http(server, raw_request("GET", "/v1/models", (f"Authorization: {HEADERS['Authorization']}",
                                                                f"X-Padding: {'a' * 300_000}")))
    status, _, body = parse_raw(answer)
    assert status == 400 and body.strip() == b"Invalid HTTP request received."
    assert_no_leak(answer.decode("latin-1"))
    assert_serves(server)


def test_too_many_messages(server: ServerProcess) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 3
    error = assert_openai_error(post_chat(server, chat_body(messages=messages[:5])), 400, param="messages")
    assert "5 messages" in error["message"] and "--max-messages" in error["message"]
    assert post_chat(server, chat_body(messages=messages[:3])).status_code == 200  # within the limit
    assert_serves(server)


def test_too_many_stop_strings(server: ServerProcess) -> None:
    error = assert_openai_error(post_chat(server, chat_body(stop=["a", "b", "c"])), 400, param="stop")
    assert "--max-stop-sequences" in error["message"]
    assert post_chat(server, chat_body(stop=["a", "b"])).status_code == 200
    assert_serves(server)


def test_n_beyond_max_n(server: ServerProcess) -> None:
    error = assert_openai_error(post_chat(server, chat_body(n=3)), 400, param="n")
    assert "at most 2" in error["message"] and "--max-n" in error["message"]
    both = post_chat(server, chat_body(n=2))
    assert both.status_code == 200 and len(both.json()["choices"]) == 2
    assert_serves(server)


def test_prompt_longer_than_the_context_counting_image_tokens(server: ServerProcess) -> None:
    image = data_uri(png_bytes((5, 90, 200), (112, 112)))  # 16 image tokens (+2 vision markers)
    for words in range(1, 40):  # the longest text that still fits, with room for a 16-token image to overflow it
        text_only = post_chat(server, chat_body("hi " * words, max_tokens=1))
        assert text_only.status_code == 200, text_only.text
        if text_only.json()["usage"]["prompt_tokens"] > MAX_MODEL_LEN - 16:
            break
    # The same text with an image no longer fits: the image's tokens count.
    response = post_chat(server, chat_body("hi " * words, image=image, max_tokens=1))
    error = assert_openai_error(response, 400, param="messages", code="context_length_exceeded")
    numbers = [int(n) for n in re.findall(r"\d+", error["message"])]
    assert MAX_MODEL_LEN in numbers and "image tokens included" in error["message"]
    prompt_tokens = next(n for n in numbers if n != MAX_MODEL_LEN)
    assert prompt_tokens >= MAX_MODEL_LEN > text_only.json()["usage"]["prompt_tokens"]
    assert_serves(server)


def test_max_tokens_beyond_the_remaining_context_is_400_not_clamped(server: ServerProcess) -> None:
    # Documented behaviour: the server refuses (400) rather than silently generating fewer tokens than asked.
    prompt_tokens = post_chat(server, chat_body()).json()["usage"]["prompt_tokens"]
    room = MAX_MODEL_LEN - prompt_tokens
    response = post_chat(server, chat_body(max_tokens=room + 1))
    error = assert_openai_error(response, 400, param="max_tokens", code="context_length_exceeded")
    assert f"only {room} tokens are left" in error["message"] and str(MAX_MODEL_LEN) in error["message"]
    exact = post_chat(server, chat_body(max_tokens=room, ignore_eos=True))
    assert exact.status_code == 200 and exact.json()["usage"]["completion_tokens"] == room
    assert_serves(server)


def test_detail_low_spends_fewer_image_tokens_than_high(server: ServerProcess) -> None:
    big = data_uri(png_bytes((30, 160, 60), (1000, 1000)))
    usage = {}
    for detail in ("low", "high", "auto"):
        body = chat_body("x", image=big)
        body["messages"][0]["content"][0]["image_url"]["detail"] = detail
        response = post_chat(server, body)
        assert response.status_code == 200, response.text
        usage[detail] = response.json()["usage"]["prompt_tokens"]
    # --low-detail-pixels 3136 → 56x56 → (56/14)^2 patches / 2x2 merge = 4 tokens; high/auto stop at the tiny
    # processor's own cap of 112x112 → 16 tokens
    assert usage["low"] < usage["high"] == usage["auto"]
    assert usage["high"] - usage["low"] == 12


def test_unknown_detail_value(server: ServerProcess) -> None:
    body = chat_body("x", image=small_image())
    body["messages"][0]["content"][0]["image_url"]["detail"] = "ultra"
    assert_openai_error(post_chat(server, body), 400, param="messages[0].content[0].image_url.detail")
    assert_serves(server)
