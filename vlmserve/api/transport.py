"""HTTP plumbing the routes share: JSON bodies in, SSE responses out, cancellation when the client goes away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from vlmserve.api.streaming import chat_error_events, guarded
from vlmserve.errors import InvalidRequestError, ServiceUnavailableError

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


#: JSON nested deeper than this is refused; OpenAI requests nest a few levels (tool schemas a few dozen)
MAX_JSON_DEPTH = 64


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError("the request body is not valid JSON", param=None) from exc
    except RecursionError:
        raise InvalidRequestError(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels",
                                  param=None) from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise InvalidRequestError("the request body holds a number with too many digits", param=None) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object", param=None)
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise InvalidRequestError(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", param=None)
    return data


def _depth_exceeds(data: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` deep (iterative: deep input cannot overflow the stack here)."""
    level: list[Any] = [data]
    for _ in range(limit):
        level = [child for container in level
                 for child in (container.values() if isinstance(container, dict) else container)
                 if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


async def json_body(request: Request) -> dict[str, Any]:
    return parse_json_object(await request.body())


def sse_response(events: AsyncIterator[str], fields: dict[str, Any],
                 error_events: Callable[[dict[str, Any]], list[str]] = chat_error_events) -> StreamingResponse:
    """A streamed answer whose mid-stream failure ends it with `error_events` and is recorded in the log line
    (`fields`), which the request log writes when the stream ends."""
    return StreamingResponse(_logged(guarded(events, fields, error_events), fields), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts the generation) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def client_gone() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(client_gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise ServiceUnavailableError("the client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _logged(events: AsyncIterator[str], fields: dict[str, Any]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    except BaseException:
        fields["status"] = 499  # the client closed the stream (the response itself started as 200)
        raise
