"""Pure ASGI guards against browsers and slow clients: the Host allow-list, `Content-Type: application/json` on
request bodies, and a deadline for reading a body.

- A web page cannot make a browser send `application/json` cross-origin without a CORS preflight (which we refuse
  unless `--allowed-origins` says otherwise), but it can POST `text/plain` with no preflight at all. Requiring the
  JSON media type on every body closes that door for servers without a key.
- DNS rebinding points an attacker's name at 127.0.0.1, so a page on that name becomes "same origin" with us and
  can read answers. The browser still sends the attacker's name in `Host`; the allow-list refuses it.
- A client that sends its body a byte at a time would hold a connection and a task for ever; the body deadline
  answers 408 instead.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmserve.api.middleware import send_error
from vlmserve.errors import HostNotAllowedError, RequestTimeoutError, UnsupportedMediaTypeError

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class HostAllowListMiddleware:
    """Refuses requests whose Host header names no allowed host (`allowed` empty: every host passes)."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...], port: int) -> None:
        self.app = app
        self._port = port
        self._entries = {_split_host(entry.strip().lower()) for entry in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._entries or self._allowed(_host_header(scope)):
            await self.app(scope, receive, send)
            return
        await send_error(send, HostNotAllowedError(
            "this server does not answer to the host named in the Host header (DNS rebinding guard); the operator "
            "can allow it with --allowed-hosts", param=None), scope)

    def _allowed(self, host: str | None) -> bool:
        if host is None:
            return False
        name, port = _split_host(host.strip().lower())
        if (name, port) in self._entries:
            return True
        # an entry without a port allows that name on our own port (or with none, as HTTP/1.0 clients send it)
        return (name, None) in self._entries and port in (None, self._port)


class JSONContentTypeMiddleware:
    """Refuses a request body that is not declared `application/json` (charset parameters allowed) with 415."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if _header(scope, b"transfer-encoding") is None and (length is None or length.strip() == "0"):
            await self.app(scope, receive, send)  # no body (POST /v1/responses/{id}/cancel): nothing to declare
            return
        declared = _header(scope, b"content-type")
        media_type = declared.split(";", 1)[0].strip().lower() if declared is not None else ""
        if media_type != "application/json":
            await send_error(send, UnsupportedMediaTypeError(
                "request bodies must be sent with 'Content-Type: application/json'", param=None), scope)
            return
        await self.app(scope, receive, send)


class BodyTimeoutMiddleware:
    """Ends a request whose body has not fully arrived `timeout_s` after the request started, with 408."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self._timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self._timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # afterwards receive() only waits for a disconnect, which may take as long as it likes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                raise RequestTimeoutError(f"the request body did not arrive within {self._timeout_s:g} s "
                                          "(--body-timeout-s)") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


def _split_host(host: str) -> tuple[str, int | None]:
    if host.startswith("["):
        name, _, rest = host.partition("]")
        name += "]"
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port_text = host.partition(":")
    if not port_text:
        return name, None
    return name, int(port_text) if port_text.isascii() and port_text.isdigit() and len(port_text) < 6 else -1


def _host_header(scope: Scope) -> str | None:
    values = [value for key, value in scope.get("headers", ()) if key == b"host"]
    return values[0].decode("latin-1") if len(values) == 1 else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None
