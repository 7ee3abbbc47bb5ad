"""Server-Sent Events framing for chat completion streams, and ending a stream cleanly on errors.

A stream is: one chunk per choice carrying the role, content chunks, a chunk per choice with its finish_reason,
a usage chunk (empty choices) when `stream_options.include_usage` is true, then `data: [DONE]`. When usage is
requested every other chunk carries `"usage": null`, as OpenAI's do. An error after the response started is sent
as a `data: {"error": ...}` event followed by `[DONE]`, since the status line has already gone out.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from vlmserve.api import schemas
from vlmserve.api.errors import classify
from vlmserve.api.tool_parsers.streaming import EmittedToolCall


class ChunkWriter:
    """Formats the SSE events of one streamed completion."""

    def __init__(self, completion_id: str, model: str, *, include_usage: bool) -> None:
        self._id = completion_id
        self._model = model
        self._created = int(time.time())
        self._include_usage = include_usage

    def role(self, index: int) -> str:
        return self._chunk([schemas.ChatCompletionChunkChoice(
            index=index, delta=schemas.ChoiceDelta(role="assistant", content=""))])

    def content(self, index: int, text: str, logprobs: list[schemas.TokenLogprobEntry] | None) -> str:
        return self._chunk([schemas.ChatCompletionChunkChoice(
            index=index, delta=schemas.ChoiceDelta(content=text),
            logprobs=schemas.ChoiceLogprobs(content=logprobs) if logprobs is not None else None)])

    def reasoning(self, index: int, text: str) -> str:
        return self._chunk([schemas.ChatCompletionChunkChoice(
            index=index, delta=schemas.ChoiceDelta(reasoning_content=text))])

    def tool_call(self, index: int, call: EmittedToolCall, *, legacy: bool = False) -> list[str]:
        """OpenAI's pair of deltas for one call: id, type and name first (arguments ""), then the arguments."""
        if legacy:
            return [self._chunk([schemas.ChatCompletionChunkChoice(index=index, delta=schemas.ChoiceDelta(
                function_call=schemas.FunctionCallDelta(name=call.name, arguments="")))]),
                self._chunk([schemas.ChatCompletionChunkChoice(index=index, delta=schemas.ChoiceDelta(
                    function_call=schemas.FunctionCallDelta(arguments=call.arguments)))])]
        head = schemas.ToolCallDelta(index=call.index, id=call.id, type="function",
                                     function=schemas.FunctionCallDelta(name=call.name, arguments=""))
        tail = schemas.ToolCallDelta(index=call.index, function=schemas.FunctionCallDelta(arguments=call.arguments))
        return [self._chunk([schemas.ChatCompletionChunkChoice(index=index, delta=schemas.ChoiceDelta(
            tool_calls=[delta]))]) for delta in (head, tail)]

    def finish(self, index: int, reason: str) -> str:
        return self._chunk([schemas.ChatCompletionChunkChoice(index=index, delta=schemas.ChoiceDelta(),
                                                              finish_reason=reason)])  # type: ignore[arg-type]

    def usage(self, usage: schemas.Usage) -> str:
        return self._event(schemas.ChatCompletionChunk(id=self._id, created=self._created, model=self._model,
                                                       choices=[], usage=usage).model_dump(mode="json"))

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"

    def _chunk(self, choices: list[schemas.ChatCompletionChunkChoice]) -> str:
        chunk = schemas.ChatCompletionChunk(id=self._id, created=self._created, model=self._model, choices=choices)
        body = chunk.model_dump(mode="json", exclude_none=False)
        if not self._include_usage:
            body.pop("usage")
        for choice in body["choices"]:
            choice["delta"] = _without_none(choice["delta"])
        return self._event(body)

    @staticmethod
    def _event(body: dict[str, object]) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _without_none(value: Any) -> Any:
    """Deltas carry only the fields they set (OpenAI sends no nulls inside a delta)."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def chat_error_events(body: dict[str, Any]) -> list[str]:
    """How a chat or completions stream ends on an error: the OpenAI error body as an event, then [DONE]."""
    return [ChunkWriter._event(body), ChunkWriter.done()]


async def guarded(events: AsyncIterator[str], fields: dict[str, Any] | None = None,
                  error_events: Callable[[dict[str, Any]], list[str]] = chat_error_events) -> AsyncIterator[str]:
    """Pass events through; an exception becomes the stream's error events instead of a cut connection.

    `fields` (the request's log line) then records the failure: the status the error would have had, its code,
    and `stream_failed` (the HTTP status sent was 200), next to the token counts the stream recorded so far."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        status, body, _ = classify(exc)
        if fields is not None:
            fields.update(status=status, code=body["error"]["code"], stream_failed=True)
        for event in error_events(body):
            yield event
