"""The one mapping from exceptions to OpenAI error bodies and HTTP statuses.

`error_response(exc)` walks the exception's MRO and takes the first class listed in `_STATUS`; anything unknown is
a 500 whose body says nothing about the cause (the traceback goes to the server log only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from vlmserve import errors

logger = logging.getLogger(__name__)

#: class → (HTTP status, OpenAI error type)
_STATUS: dict[type[BaseException], tuple[int, str]] = {
    errors.InvalidRequestError: (400, "invalid_request_error"),
    errors.AuthenticationError: (401, "authentication_error"),
    errors.ModelNotFoundError: (404, "invalid_request_error"),
    errors.NotFoundError: (404, "invalid_request_error"),
    errors.PayloadTooLargeError: (413, "invalid_request_error"),
    errors.UnsupportedMediaTypeError: (415, "invalid_request_error"),
    errors.RequestTimeoutError: (408, "invalid_request_error"),
    errors.QueueFullError: (429, "rate_limit_error"),
    errors.RequestError: (400, "invalid_request_error"),
    errors.ServiceUnavailableError: (503, "service_unavailable_error"),
    errors.VlmserveError: (500, "internal_server_error"),
}

_INTERNAL_MESSAGE = "the server failed while handling this request; the failure is in the server log"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def classify(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, extra headers) for any exception."""
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return (400, _validation_body(exc), {})
    if isinstance(exc, StarletteHTTPException):
        return _http_exception(exc)
    if isinstance(exc, ClientDisconnect):
        # The client left mid-body; nobody reads this answer, and a traceback per slow client would flood the log.
        logger.debug("client disconnected while sending its request")
        return (400, error_body("the client disconnected while sending the request", "invalid_request_error",
                                None, "client_disconnected"), {})
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            status, type_ = _STATUS[cls]
            assert isinstance(exc, errors.VlmserveError)
            if status == 500:
                logger.error("internal error: %s", exc.message)
                return (500, error_body(_INTERNAL_MESSAGE, type_, None, exc.code), {})
            headers = {}
            if isinstance(exc, errors.QueueFullError):
                headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
            return (status, error_body(exc.message, type_, exc.param, exc.code), headers)
    logger.error("unhandled %s", type(exc).__name__, exc_info=exc)
    return (500, error_body(_INTERNAL_MESSAGE, "internal_server_error", None, "internal_error"), {})


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = classify(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _http_exception(exc: StarletteHTTPException) -> tuple[int, dict[str, Any], dict[str, str]]:
    # Routing-level errors raised by Starlette itself (unknown path, wrong method).
    if exc.status_code == 404:
        return (404, error_body("no such route", "invalid_request_error", None, "not_found"), {})
    if exc.status_code == 405:
        return (405, error_body("method not allowed on this route", "invalid_request_error", None,
                                "method_not_allowed"), dict(exc.headers or {}))
    type_ = "invalid_request_error" if exc.status_code < 500 else "internal_server_error"
    return (exc.status_code, error_body(str(exc.detail), type_, None, None), dict(exc.headers or {}))


def _validation_body(exc: RequestValidationError | ValidationError) -> dict[str, Any]:
    details = exc.errors()
    # With unions (content: str | list[...]) pydantic reports every branch; the deepest location is the most
    # specific complaint ("messages[0].content[0].type" rather than "messages[0].content").
    first = max(details, key=lambda d: len(loc_to_param(d.get("loc", ())).replace("[", ".[").split(".")),
                default={"loc": (), "msg": "invalid request"})
    param = loc_to_param(first.get("loc", ()))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    if len(details) > 1:
        message += f" (and {len(details) - 1} more problem{'s' if len(details) > 2 else ''})"
    return error_body(message, "invalid_request_error", param or None, "invalid_request")


def loc_to_param(loc: Sequence[Any]) -> str:
    """('body', 'messages', 0, 'content', 'list[ContentPart]', 1, 'image_url') → messages[0].content[1].image_url

    Drops FastAPI's 'body' prefix and pydantic's union-member labels, which are not request fields.
    """
    param = ""
    for item in loc:
        if isinstance(item, int):
            param += f"[{item}]"
        elif item == "body" and not param:
            continue
        elif isinstance(item, str) and item.isidentifier() and item not in _UNION_LABELS:
            param += f".{item}" if param else item
    return param


_UNION_LABELS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})
