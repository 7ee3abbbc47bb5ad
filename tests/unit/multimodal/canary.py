"""A threaded HTTP server on 127.0.0.1 that records every request it receives.

SSRF tests point refused URLs at it and assert it saw nothing; other tests use its routes to misbehave on demand:

    /image?name=X          a small PNG (X only makes distinct URLs; the colour is derived from X)
    /slow?delay=S&name=X   waits S seconds, then the PNG of X
    /redirect?to=URL       302 to URL
    /chain/N               302 to /chain/N-1; /chain/0 is the PNG
    /length?size=N         N bytes with an honest Content-Length
    /nolength?size=N       N bytes, no Content-Length, connection closed at the end
    /chunked?size=N        N bytes in chunked transfer encoding
    /trickle?seconds=S     a PNG header, then one byte every 50 ms for S seconds
    /status?code=C         an empty answer with status C
    /text                  a text/plain body that is not an image
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image


def colour_of(name: str) -> tuple[int, int, int]:
    r, g, b = hashlib.sha256(name.encode()).digest()[:3]
    return r, g, b


def png_of(name: str, size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour_of(name)).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Visit:
    path: str
    host: str | None
    started: float
    finished: float | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _CanaryHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        visit = Visit(self.path, self.headers.get("Host"), time.monotonic())
        self.server.canary.record(visit)
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        route = parts.path.split("/")[1]
        try:
            getattr(self, f"_route_{route}", self._route_missing)(parts.path, query)
        finally:
            visit.finished = time.monotonic()

    def _send(self, status: int, body: bytes, content_type: str = "image/png",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _route_missing(self, path: str, query: dict[str, str]) -> None:
        self._send(404, b"")

    def _route_image(self, path: str, query: dict[str, str]) -> None:
        self._send(200, png_of(query.get("name", "")))

    def _route_slow(self, path: str, query: dict[str, str]) -> None:
        self.server.canary.stopping.wait(float(query["delay"]))
        self._send(200, png_of(query.get("name", "")))

    def _route_redirect(self, path: str, query: dict[str, str]) -> None:
        self._send(302, b"", headers={"Location": query["to"]})

    def _route_chain(self, path: str, query: dict[str, str]) -> None:
        remaining = int(path.split("/")[2])
        if remaining == 0:
            self._send(200, png_of("chain"))
        else:
            self._send(302, b"", headers={"Location": f"/chain/{remaining - 1}"})

    def _route_length(self, path: str, query: dict[str, str]) -> None:
        self._send(200, b"x" * int(query["size"]), "application/octet-stream")

    def _route_nolength(self, path: str, query: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self._write_quietly(b"x" * int(query["size"]))
        self.close_connection = True

    def _route_chunked(self, path: str, query: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        remaining = int(query["size"])
        while remaining > 0:
            size = min(remaining, 16384)
            if not self._write_quietly(b"%x\r\n" % size + b"x" * size + b"\r\n"):
                return
            remaining -= size
        self._write_quietly(b"0\r\n\r\n")

    def _route_trickle(self, path: str, query: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        deadline = time.monotonic() + float(query["seconds"])
        while time.monotonic() < deadline and not self.server.canary.stopping.is_set():
            if not self._write_quietly(b"x"):
                return
            self.server.canary.stopping.wait(0.05)
        self.close_connection = True

    def _route_status(self, path: str, query: dict[str, str]) -> None:
        self._send(int(query["code"]), b"")

    def _route_text(self, path: str, query: dict[str, str]) -> None:
        self._send(200, b"hello, this is not an image", "text/plain")

    def _write_quietly(self, data: bytes) -> bool:
        """Write, returning False once the client has gone (expected when a cap or deadline hits)."""
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return False
        return True


class _CanaryHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    canary: Canary

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-answer are part of the tests


class Canary:
    """The server's address and what it has seen. Use as a context manager."""

    def __init__(self) -> None:
        self._server = _CanaryHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.canary = self
        self.port = self._server.server_address[1]
        self.visits: list[Visit] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> Canary:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def record(self, visit: Visit) -> None:
        with self._lock:
            self.visits.append(visit)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    @property
    def hits(self) -> Counter[str]:
        with self._lock:
            return Counter(visit.path for visit in self.visits)

    @property
    def num_hits(self) -> int:
        with self._lock:
            return len(self.visits)
