"""A stream that fails after it started ends with an OpenAI-shaped error event and logs the failure."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from vlmserve.api.responses_format import EventWriter, ResponseState
from vlmserve.api.schemas_responses import ResponseCreateRequest
from vlmserve.api.streaming import guarded
from vlmserve.errors import InternalError


async def failing(events: list[str]) -> AsyncIterator[str]:
    for event in events:
        yield event
    raise InternalError("the engine failed while generating this request")


def collect(stream: AsyncIterator[str]) -> list[str]:
    async def run() -> list[str]:
        return [event async for event in stream]

    return asyncio.run(run())


def test_chat_stream_failure_is_an_error_event_then_done_and_is_logged() -> None:
    fields: dict[str, Any] = {"completion_tokens": 3}
    events = collect(guarded(failing(["data: a\n\n"]), fields))
    assert events[0] == "data: a\n\n" and events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[1].removeprefix("data: "))["error"]
    assert error["type"] == "internal_server_error" and error["code"] == "internal_error"
    assert fields == {"completion_tokens": 3, "status": 500, "code": "internal_error", "stream_failed": True}


def test_responses_stream_failure_is_an_error_event_then_response_failed() -> None:
    request = ResponseCreateRequest.model_validate({"model": "m", "input": "hi"})
    writer = EventWriter(ResponseState(response_id="resp_1", message_id="msg_1", request=request), "m")
    opening = writer.opening()
    events = collect(guarded(failing(opening), {}, writer.failure))
    bodies = [json.loads(event.split("data: ", 1)[1]) for event in events]
    assert [b["type"] for b in bodies[-2:]] == ["error", "response.failed"]
    assert [b["sequence_number"] for b in bodies] == list(range(len(bodies)))
    failed = bodies[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert bodies[-2]["code"] == "internal_error"  # the error event keeps ours
    from openai.types.responses import ResponseFailedEvent

    ResponseFailedEvent.model_validate(bodies[-1])  # the SDK's own model accepts it
