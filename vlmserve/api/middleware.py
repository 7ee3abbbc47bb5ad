"""Pure ASGI middleware: the request log, API-key authentication, the request body cap and CORS.

Authentication and the body cap run before routing and before the body is parsed. Authentication guards every path except exactly
`/health` and the playground's static paths (GET/HEAD), so no spelling of a path (`//v1/...`, `%2F`, trailing
slashes, case) can skip it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmserve.api.errors import classify
from vlmserve.errors import AuthenticationError, InvalidRequestError, PayloadTooLargeError

_OPEN_PATHS = frozenset({"/health"})
#: an incoming X-Request-Id is kept only if it looks like an id: it lands in log lines and response headers
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
request_logger = logging.getLogger("vlmserve.requests")


def log_fields(scope: Scope) -> dict[str, Any]:
    """The fields of this request's log line; routes and error handlers add to them."""
    fields: dict[str, Any] = scope.setdefault("state", {}).setdefault("log_fields", {})
    return fields


async def send_error(send: Send, exc: BaseException, scope: Scope | None = None) -> None:
    status, body, headers = classify(exc)
    if scope is not None:
        log_fields(scope).update(code=body["error"]["code"], param=body["error"]["param"])
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class RequestLogMiddleware:
    """Writes one line per HTTP request, whoever answered it: id, method, path, status, milliseconds, and what the
    route added (prompt and image summaries, error code and param). Never bodies, keys or prompts (unless the route
    adds them under --log-requests). The id is also sent back as `X-Request-Id`: the client's own when it sent a sane
    one (1-128 characters of letters, digits and `._:-`, sent once), else the response's id or a new `req-<hex>`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        fields = log_fields(scope)
        client_id = client_request_id(scope)
        fields.update(request_id=client_id or f"req-{uuid.uuid4().hex}", method=scope["method"], path=scope["path"])
        status = 500  # if nothing is sent at all

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                echoed = client_id or str(fields["request_id"])
                headers = [*message.get("headers", []), (b"x-request-id", echoed.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            line = {**fields, "status": fields.get("status", status), "ms": round((time.monotonic() - started) * 1000)}
            if client_id is not None and line["request_id"] != client_id:
                # the route named the response (chatcmpl-...); keep both, the client's id first
                line.update(request_id=client_id, response_id=fields["request_id"])
            # health probes come every few seconds from supervisors: only their failures are worth a line at INFO
            level = logging.DEBUG if scope["path"] in _OPEN_PATHS and line["status"] == 200 else logging.INFO
            request_logger.log(level, "request %s", json.dumps(line, default=str))


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` matching one of `keys`, compared in constant time.

    `public_paths` (exact paths, GET/HEAD only) are served without a key on top of `/health`: the playground's
    static files, whose page then asks the user for the key its API calls need.

    The matched key is recorded, as a digest, in the request's state (`api_key_id`): per-key quotas and prefix-cache
    isolation use it, and the key itself never travels further.
    """

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], public_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self._keys = [k.encode() for k in keys]
        self._key_ids = [api_key_id(k) for k in keys]
        self._open_paths = _OPEN_PATHS | public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or self._is_open(scope):
            await self.app(scope, receive, send)
            return
        matched = self._match(_single_header(scope, b"authorization"))
        if matched is None:
            await send_error(send, AuthenticationError(
                "missing or wrong API key: send 'Authorization: Bearer <key>' with a key given to --api-key"), scope)
            return
        scope.setdefault("state", {})["api_key_id"] = self._key_ids[matched]
        await self.app(scope, receive, send)

    def _is_open(self, scope: Scope) -> bool:
        return scope["path"] in self._open_paths and scope["method"] in ("GET", "HEAD")

    def _match(self, header: bytes | None) -> int | None:
        if header is None or header[:7].lower() != b"bearer ":
            return None
        presented = header[7:].strip()
        matched = None
        for index, key in enumerate(self._keys):  # no early exit: time does not depend on which key matched
            if hmac.compare_digest(presented, key):
                matched = index
        return matched


def api_key_id(key: str) -> str:
    """A stable, non-reversible name for an API key (what logs, quotas and cache salts may carry)."""
    return "key-" + hashlib.sha256(b"vlmserve-api-key\0" + key.encode()).hexdigest()[:32]


def client_id(scope: Scope) -> str:
    """Who sent this request, for quotas and fairness: its API key's id, else its network address."""
    state = scope.get("state", {})
    if "api_key_id" in state:
        return str(state["api_key_id"])
    client = scope.get("client")
    return f"addr-{client[0]}" if client else "addr-unknown"


class OpenAICORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with refused preflights answered by an OpenAI error body instead of plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        status, body, _ = classify(InvalidRequestError(
            "this cross-origin request is not allowed: its origin, method or headers are not permitted "
            "(--allowed-origins)", param=None, code="cors_not_allowed"))
        headers = {k: v for k, v in response.headers.items() if k.lower().startswith(("access-control-", "vary"))}
        return JSONResponse(body, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413: at once from Content-Length, else while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self._max = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        too_large = PayloadTooLargeError(f"the request body exceeds {self._max} bytes (--max-request-bytes)")
        if declared is not None and (not declared.isdigit() or int(declared) > self._max):
            await send_error(send, too_large, scope)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


def client_request_id(scope: Scope) -> str | None:
    """The client's X-Request-Id if it is sent once and is a sane id, else None (never an error: ids are a
    courtesy, and refusing a request over one would break clients that send long trace ids)."""
    value = _single_header(scope, b"x-request-id")
    if value is None or _CLIENT_REQUEST_ID.fullmatch(value) is None:
        return None
    return str(value.decode("ascii"))


def _single_header(scope: Scope, name: bytes) -> Any:
    """The value of a header sent exactly once, else None.

    NOTE: with two Authorization headers a proxy in front may check one while we would read the other; such a
    request is ambiguous and is refused rather than resolved by picking one.
    """
    values = [value for key, value in scope.get("headers", ()) if key == name]
    return values[0] if len(values) == 1 else None


def _header(scope: Scope, name: bytes) -> Any:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None
