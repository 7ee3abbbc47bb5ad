"""uvicorn, configured against slow and numerous clients.

uvicorn alone keeps a connection that never finishes its headers for ever (its keep-alive timer stops at the first
byte of a request), and has no cap on open connections that answers in our error format. `guarded_protocol`
returns its HTTP/1.1 protocol with both:
- a header deadline: a request line and headers must arrive within `--header-timeout-s` of the connection opening
  (or of the previous response), else the client gets a 408 and the connection is closed;
- a connection cap: beyond `--max-connections` open connections, a new one gets a 503 with an OpenAI error body
  and is closed at once.
The body deadline is ASGI middleware (`vlmserve.api.guards`), idle keep-alive connections close after
`--keep-alive-timeout-s`, and h11 bounds the header block's size (16 KiB). Log lines from uvicorn are rate-limited
per message, so a crowd of broken clients cannot grow the log without bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from vlmserve.config import ServerConfig

logger = logging.getLogger(__name__)


def _raw_error(status: int, reason: str, message: str, code: str, type_: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


def guarded_protocol(config: ServerConfig) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline and a connection cap from `config`."""
    header_timeout_s = config.header_timeout_s
    max_connections = config.max_connections
    timed_out = _raw_error(408, "Request Timeout", f"the request headers did not arrive within {header_timeout_s:g} s "
                           "(--header-timeout-s)", "request_timeout", "invalid_request_error")
    too_many = _raw_error(503, "Service Unavailable", f"the server has {max_connections} open connections "
                          "(--max-connections); retry shortly", "too_many_connections", "service_unavailable_error")

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                logger.debug("refusing a connection: %d open", len(self.connections))
                transport.write(too_many)
                transport.close()
                return
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            if self.conn.their_state is h11.SEND_BODY:
                # answered before the body was all in (a 408, 413 or 415): the rest is not worth waiting for
                self.transport.close()
                return
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_header_timer()  # the next request on this keep-alive connection has the same deadline

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_timed_out)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.write(timed_out)
                self.transport.close()

    return GuardedH11Protocol


class RepeatLimitFilter(logging.Filter):
    """Lets each distinct message through `burst` times per `window_s` seconds, then one summary line."""

    def __init__(self, burst: int = 5, window_s: float = 60.0) -> None:
        super().__init__()
        self._burst = burst
        self._window_s = window_s
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = f"{record.name}:{record.msg}"
        started, count = self._seen.get(key, (now, 0))
        if now - started > self._window_s:
            started, count = now, 0
        count += 1
        if len(self._seen) > 1000:
            self._seen.clear()  # a bound on the filter's own memory
        self._seen[key] = (started, count)
        if count == self._burst + 1:
            record.msg = f"{record.msg} (repeated; further copies suppressed for {self._window_s:g} s)"
            record.exc_info = None
            return True
        return count <= self._burst


def uvicorn_config(app: Any, config: ServerConfig) -> Any:
    """The uvicorn.Config serving `app` under `config`'s limits."""
    import uvicorn

    logging.getLogger("uvicorn.error").addFilter(RepeatLimitFilter())
    return uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=5, timeout_keep_alive=max(1, round(config.keep_alive_timeout_s)),
                          http=guarded_protocol(config))
