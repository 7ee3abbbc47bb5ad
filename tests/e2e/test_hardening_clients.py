"""Hostile connections and bodies (issue 11, classes 4, 8 and 10), through a real server: clients that never finish
their headers or body, more connections than the cap, browser-style text/plain POSTs and rebound Host names, and
malformed values that used to give a 500 with tracebacks. Each gets a clear answer (an OpenAI error body where HTTP
allows one), the server keeps answering others quickly, and the log stays short."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.e2e.hardening_support import (
    HEADERS,
    ROUND2_MAX_CONNECTIONS,
    ROUND2_TIMEOUT_S,
    HealthProbe,
    assert_openai_error,
    assert_serves,
    chat_body,
    log_tail,
    parse_raw,
    post_chat,
    round2_server,
)

MAX_HEALTH_S = 2.0


@pytest.fixture(scope="module")
def server(start_server: type[ServerProcess], tiny_qwen2_vl: Path) -> ServerProcess:
    return round2_server(start_server, tiny_qwen2_vl)


@contextlib.contextmanager
def sockets(server: ServerProcess, count: int, first_bytes: bytes) -> Iterator[list[socket.socket]]:
    opened = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if first_bytes:
                sock.sendall(first_bytes)
            opened.append(sock)
        yield opened
    finally:
        for sock in opened:
            sock.close()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_slow_headers_and_bodies_are_cut_off_while_others_are_served(server: ServerProcess) -> None:
    start = len(server.log())
    auth = f"Authorization: {HEADERS['Authorization']}\r\n".encode()
    partial_headers = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    partial_body = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth
                    + b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"model\": ")
    with HealthProbe(server) as probe, sockets(server, 20, partial_headers) as slow_headers, \
            sockets(server, 10, partial_body) as slow_bodies:
        for sock in slow_headers[:5]:  # dribbling more header bytes does not extend the deadline
            sock.sendall(b"a")
        assert_serves(server)
        answers_headers = [read_all(sock) for sock in slow_headers]
        answers_bodies = [read_all(sock) for sock in slow_bodies]
    assert probe.worst_s < MAX_HEALTH_S, probe.worst_s
    for answer in answers_headers:
        status, _, body = parse_raw(answer)
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    for answer in answers_bodies:
        status, _, body = parse_raw(answer)
        error = json.loads(body)["error"]
        assert status == 408 and error["code"] == "request_timeout" and "--body-timeout-s" in error["message"]
    time.sleep(0.2)
    added = log_tail(server, start)
    assert "Traceback" not in added
    assert len(added) < 30 * 1024, len(added)  # a few lines, not one traceback per slow client


def test_connections_beyond_the_cap_get_503_and_the_server_recovers(server: ServerProcess) -> None:
    with sockets(server, ROUND2_MAX_CONNECTIONS, b"") as idle:
        time.sleep(0.3)  # the server has accepted them all
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
            status, _, body = parse_raw(read_all(extra))
        assert len(idle) == ROUND2_MAX_CONNECTIONS
    error = json.loads(body)["error"]
    assert status == 503 and error["code"] == "too_many_connections" and "--max-connections" in error["message"]
    time.sleep(0.3)
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert_serves(server)


def test_idle_keep_alive_and_header_deadlines_free_the_slots(server: ServerProcess) -> None:
    with sockets(server, ROUND2_MAX_CONNECTIONS, b"") as idle:
        time.sleep(ROUND2_TIMEOUT_S + 1)  # the header deadline closes every silent connection
        answers = [read_all(sock) for sock in idle]
    assert all(parse_raw(answer)[0] == 408 for answer in answers)
    assert_serves(server)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_a_body_that_is_not_declared_json_is_415(server: ServerProcess, content_type: str | None) -> None:
    headers = dict(HEADERS) | ({"Content-Type": content_type} if content_type else {})
    response = httpx.post(f"{server.base_url}/v1/chat/completions", content=json.dumps(chat_body()).encode(),
                          headers=headers, timeout=30)
    error = assert_openai_error(response, 415, code="unsupported_media_type")
    assert "application/json" in error["message"]
    charset = httpx.post(f"{server.base_url}/v1/chat/completions", content=json.dumps(chat_body()).encode(),
                         headers={**HEADERS, "Content-Type": "application/json; charset=utf-8"}, timeout=30)
    assert charset.status_code == 200, charset.text


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:{port}", "127.0.0.1.nip.io:{port}",
                                  "localhost:1", "[::2]:{port}"])
def test_a_rebound_host_name_is_refused_on_a_loopback_server(server: ServerProcess, host: str) -> None:
    response = httpx.get(f"{server.base_url}/v1/models", headers={**HEADERS, "Host": host.format(port=server.port)})
    error = assert_openai_error(response, 400, code="host_not_allowed")
    assert "--allowed-hosts" in error["message"]
    for good in ("localhost:{port}", "127.0.0.1:{port}", "LOCALHOST", "[::1]:{port}"):
        answer = httpx.get(f"{server.base_url}/v1/models", headers={**HEADERS, "Host": good.format(port=server.port)})
        assert answer.status_code == 200, (good, answer.text)


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": ' + b"[" * 200_000
     + b"]" * 200_000 + b"}", None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [' + b'{"a":' * 500
     + b"1" + b"}" * 500 + b"]}", None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"9" * 5000 + b"}", None),
    (json.dumps(chat_body(logit_bias={"\u00b2": 1})).encode(), "logit_bias"),
    (json.dumps(chat_body(logit_bias={"\u0661\u0662": 1})).encode(), "logit_bias"),
    (json.dumps(chat_body(logit_bias={"1" * 400: 1})).encode(), "logit_bias"),
], ids=["deep-arrays", "deep-objects", "huge-integer", "superscript-digit", "arabic-indic-digits", "long-key"])
def test_malformed_values_are_a_400_without_tracebacks(server: ServerProcess, raw: bytes, param: str | None) -> None:
    start = len(server.log())
    assert_openai_error(post_chat(server, raw), 400, param=param)
    time.sleep(0.1)
    assert "Traceback" not in log_tail(server, start)
    assert_serves(server)


def test_a_temperature_that_is_zero_in_float32_samples_greedily(server: ServerProcess) -> None:
    greedy = post_chat(server, chat_body("Count with me", max_tokens=6, temperature=0))
    tiny = post_chat(server, chat_body("Count with me", max_tokens=6, temperature=1e-45))
    assert greedy.status_code == tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]


def test_sampling_fields_are_checked_before_any_image_is_fetched(server: ServerProcess) -> None:
    # the image URL would be refused too (and cost a fetch); the bad logit_bias key is found first
    body = chat_body(image="http://127.0.0.1:9/never.png", logit_bias={"x": 1})
    assert_openai_error(post_chat(server, body), 400, param="logit_bias")
