"""Helpers of the issue-6 hardening tests: servers shared across modules, raw HTTP, error-body checks.

Starting a server costs ~20 s on a 2-core machine, so each configuration starts once per session: `shared()` keeps
it in a module-level cache and the session's `start_server` fixture stops it at the end.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ServerProcess, data_uri, png_bytes

KEYS = ("sk-hard-one", "sk-hard-two")
FILE_KEY = "sk-hard-from-file"
ORIGIN = "https://app.example"
MODEL = "tiny"
MAX_MODEL_LEN = 64
MAX_REQUEST_BYTES = 65536
HEADERS = {"Authorization": f"Bearer {KEYS[0]}"}

#: what must never reach a client: tracebacks, source paths, object addresses, library module names
LEAK_MARKERS = ("Traceback", 'File "', "site-packages", " object at 0x", "jinja2.", "torch.", "PIL.", "httpx.")

_servers: dict[str, ServerProcess] = {}


def shared(name: str, start: Callable[[], ServerProcess]) -> ServerProcess:
    """The server `name`, started by `start()` the first time (or again if it has exited)."""
    server = _servers.get(name)
    if server is None or server.process.poll() is not None:
        server = _servers[name] = start()
    return server


def hardened_server(start_server: type[ServerProcess], tiny_qwen2_vl: Path, key_dir: Path) -> ServerProcess:
    """Tiny Qwen2-VL with small limits, two keys plus a key file, CORS for one origin, request templates trusted
    and --log-requests (the default-configuration server of tests/e2e/conftest.py covers the opposite)."""

    def start() -> ServerProcess:
        key_file = key_dir / "keys.txt"
        key_file.write_text(f"# comment lines are ignored\n{FILE_KEY}\n")
        return start_server([
            str(tiny_qwen2_vl), "--served-model-name", MODEL, "--api-key", *KEYS, "--api-key-file", str(key_file),
            "--allowed-origins", ORIGIN, "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-messages", "4",
            "--max-stop-sequences", "2", "--max-n", "2", "--max-model-len", str(MAX_MODEL_LEN),
            "--trust-request-chat-template", "--low-detail-pixels", str(56 * 56), "--log-requests"])

    return shared("hardened", start)


def chat_body(text: str = "Hi", *, image: str | None = None, **overrides: Any) -> dict[str, Any]:
    content: Any = text
    if image is not None:
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]
    return {"model": MODEL, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": content}],
            **overrides}


def small_image() -> str:
    return data_uri(png_bytes((200, 40, 90), (48, 40)))


def post_chat(server: ServerProcess, body: Any, headers: dict[str, str] | None = None,
              timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.base_url}/v1/chat/completions", content=content, timeout=timeout,
                      headers={"Content-Type": "application/json", **(HEADERS if headers is None else headers)})


def assert_no_leak(text: str) -> None:
    for marker in LEAK_MARKERS:
        assert marker not in text, f"{marker!r} leaked: {text[:500]}"


def assert_openai_error(response: httpx.Response, status: int, *, param: str | None = None,
                        code: str | None = None) -> dict[str, Any]:
    """`response` is `status` with exactly OpenAI's error shape; returns the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    data = response.json()
    assert set(data) == {"error"}, data
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert_no_leak(response.text)
    return dict(error)


def assert_serves(server: ServerProcess, headers: dict[str, str] | None = None, *, model: str = MODEL) -> None:
    """The next ordinary request is answered normally."""
    response = post_chat(server, chat_body("Still there?", model=model), headers)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def raw_http(server: ServerProcess, request: bytes, timeout_s: float = 10.0) -> bytes:
    """Send `request` bytes as they are (no client normalisation of paths or headers); the whole answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout_s) as sock:
        # the server may answer and close before reading everything we send
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


def raw_request(method: str, path: str, headers: list[str] | tuple[str, ...] = (), body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse_raw(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of a raw HTTP/1.1 answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


DEMO_WEIGHTS = Path(__file__).resolve().parents[2] / "vlmserve" / "demo" / "weights" / "model.safetensors"
LOAD_KEY = "sk-load"
MAX_NUM_SEQS = 4
MAX_WAITING = 8


def load_server(start_server: type[ServerProcess], tiny_qwen2_vl: Path) -> tuple[ServerProcess, str]:
    """(server, model name) with a small queue: 4 running + 8 waiting. The bundled demo model when its weights are
    present (`vlmserve serve` with no MODEL), else the tiny Qwen2-VL."""
    is_demo = DEMO_WEIGHTS.is_file()
    model_args = [] if is_demo else [str(tiny_qwen2_vl), "--served-model-name", MODEL]

    def start() -> ServerProcess:
        return start_server([*model_args, "--api-key", LOAD_KEY, "--max-num-seqs", str(MAX_NUM_SEQS),
                             "--max-waiting-requests", str(MAX_WAITING)])

    return shared("load", start), "vlmserve-demo" if is_demo else MODEL


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# --- issue 11: one server for the resource-exhaustion and isolation tests -----------------------------------------

ROUND2_MAX_CONNECTIONS = 48
ROUND2_PREPARING_BYTES = 16 * 2**20
ROUND2_TIMEOUT_S = 2


def round2_server(start_server: type[ServerProcess], tiny_qwen2_vl: Path) -> ServerProcess:
    """Tiny Qwen2-VL with two keys, 4 running + 4 waiting sequences (so 4 per key), short header and body
    deadlines, a small connection cap and a 16 MiB preparation budget; 127.0.0.1 allowed as an image host."""

    def start() -> ServerProcess:
        return start_server([
            str(tiny_qwen2_vl), "--served-model-name", MODEL, "--api-key", *KEYS, "--max-num-seqs", "4",
            "--max-waiting-requests", "4", "--max-n", "4", "--header-timeout-s", str(ROUND2_TIMEOUT_S),
            "--body-timeout-s", str(ROUND2_TIMEOUT_S), "--max-connections", str(ROUND2_MAX_CONNECTIONS),
            "--max-preparing-bytes", str(ROUND2_PREPARING_BYTES), "--allowed-media-hosts", "127.0.0.1"])

    return shared("round2", start)


class HealthProbe:
    """Polls /health every 0.1 s in a thread while an attack runs; `worst_s` is the slowest answer (a refused or
    failed probe counts as infinitely slow)."""

    def __init__(self, server: ServerProcess) -> None:
        import threading

        self._url = f"{server.base_url}/health"
        self._stop = threading.Event()
        self.latencies: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import time

        with httpx.Client(timeout=30) as client:
            while True:  # at least one probe, even when the block under watch ends before the thread gets going
                started = time.monotonic()
                try:
                    ok = client.get(self._url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.monotonic() - started if ok else float("inf"))
                if self._stop.wait(0.1):
                    return

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def worst_s(self) -> float:
        assert self.latencies, "the probe never ran"
        return max(self.latencies)


def log_tail(server: ServerProcess, since: int) -> str:
    """What the server logged after the first `since` characters."""
    return server.log()[since:]
