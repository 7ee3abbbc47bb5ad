"""The objects and stream events of the Responses API, as plain dicts in the `openai` SDK's shapes.

A stream is: `response.created`, `response.in_progress`, `response.output_item.added` (the assistant message),
`response.content_part.added` (its output_text), `response.output_text.delta`…, `response.output_text.done`,
`response.content_part.done`, `response.output_item.done`, then `response.completed` (or `response.incomplete`
when max_output_tokens cut the answer) with usage. Every event carries `sequence_number`, counting from 0. A
failure after the stream started ends it with an `error` event and `response.failed`.

With function tools, each call is an item of its own (`response.output_item.added`,
`response.function_call_arguments.delta`, `….done`, `response.output_item.done`), sent as soon as the tool-call
parser has the whole call. The message item is opened when the first text arrives (at the output index after the
calls sent so far) and closed at the end; an answer made only of calls has no message item.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from vlmserve.api.schemas_responses import ResponseCreateRequest
from vlmserve.types import TokenDelta


@dataclass
class ResponseState:
    """One response as it is being generated."""

    response_id: str
    message_id: str
    request: ResponseCreateRequest
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "in_progress"
    text: str = ""
    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    error: dict[str, Any] | None = None
    completed_at: int | None = None
    #: per generated token, when include asks for message.output_text.logprobs
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    #: function calls the answer made: {"call_id", "name", "arguments"}
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    #: where the message sits among the output items (a streamed answer may make calls before any text)
    message_index: int = 0

    def finish(self, finish_reason: str | None) -> None:
        self.finish_reason = finish_reason
        if self.status == "in_progress":
            self.status = "incomplete" if finish_reason == "length" else "completed"
        self.completed_at = int(time.time())


def output_text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def logprob_entries(delta: TokenDelta) -> list[dict[str, Any]]:
    """The delta's tokens in the Responses logprob shape: text, UTF-8 bytes, logprob and the alternatives."""
    if not delta.logprobs:
        return []
    texts = delta.token_texts or [""] * len(delta.logprobs)
    tops = delta.top_token_texts or [[""] * len(lp.top) for lp in delta.logprobs]
    return [{"token": text, "bytes": list(text.encode("utf-8")), "logprob": lp.chosen.logprob,
             "top_logprobs": [{"token": alt_text, "bytes": list(alt_text.encode("utf-8")), "logprob": alt.logprob}
                              for alt_text, alt in zip(alternatives, lp.top, strict=True)]}
            for text, alternatives, lp in zip(texts, tops, delta.logprobs, strict=True)]


def message_item(state: ResponseState, *, done: bool) -> dict[str, Any]:
    status = "in_progress" if not done else ("incomplete" if state.status == "incomplete" else "completed")
    return {"id": state.message_id, "type": "message", "status": status, "role": "assistant",
            "content": [output_text_part(state.text, state.logprobs)] if done else []}


def function_call_item(state: ResponseState, index: int) -> dict[str, Any]:
    call = state.tool_calls[index]
    return {"type": "function_call", "id": f"fc_{state.message_id.removeprefix('msg_')}_{index}",
            "call_id": call["call_id"], "name": call["name"], "arguments": call["arguments"], "status": "completed"}


def output_items(state: ResponseState) -> list[dict[str, Any]]:
    """The answer's items: its message (unless it only made calls), then one function_call item per call."""
    items = [function_call_item(state, i) for i in range(len(state.tool_calls))]
    if state.text or not state.tool_calls:
        items.insert(min(state.message_index, len(items)), message_item(state, done=True))
    return items


def response_object(state: ResponseState, model: str, *, with_output: bool = True) -> dict[str, Any]:
    request = state.request
    text_format = request.text.format.model_dump(by_alias=True, exclude_none=True) if request.text else {
        "type": "text"}
    finished = state.status not in ("in_progress", "queued")
    return {
        "id": state.response_id, "object": "response", "created_at": state.created_at, "status": state.status,
        "completed_at": state.completed_at, "background": False, "error": state.error,
        "incomplete_details": {"reason": "max_output_tokens"} if state.status == "incomplete" else None,
        "instructions": request.instructions, "max_output_tokens": request.max_output_tokens, "model": model,
        "output": output_items(state) if with_output and finished and state.error is None else [],
        "parallel_tool_calls": request.parallel_tool_calls, "previous_response_id": request.previous_response_id,
        "reasoning": {"effort": None, "summary": None}, "store": request.store,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "text": {"format": text_format},
        "tool_choice": request.tool_choice or "auto", "tools": request.tools or [],
        "top_p": 1.0 if request.top_p is None else request.top_p, "top_logprobs": request.top_logprobs, "truncation": request.truncation or "disabled",
        "usage": _usage(state) if finished and state.error is None else None,
        "user": request.user, "metadata": request.metadata or {},
    }


def _usage(state: ResponseState) -> dict[str, Any]:
    return {"input_tokens": state.input_tokens,
            "input_tokens_details": {"cached_tokens": state.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": state.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": state.input_tokens + state.output_tokens}


#: our error codes → the few a Response object's `error.code` may hold (the SDK validates them); else server_error
_RESPONSE_ERROR_CODES = {"queue_full": "rate_limit_exceeded", "invalid_image": "invalid_image",
                         "invalid_image_url": "invalid_image_url"}


class EventWriter:
    """Numbers and frames the events of one streamed response."""

    def __init__(self, state: ResponseState, model: str) -> None:
        self._state = state
        self._model = model
        self._sequence_number = 0

    def event(self, type_: str, **fields: Any) -> str:
        body = {"type": type_, "sequence_number": self._sequence_number, **fields}
        self._sequence_number += 1
        return f"event: {type_}\ndata: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def opening(self) -> list[str]:
        """response.created and response.in_progress."""
        state = self._state
        return [self.event("response.created", response=response_object(state, self._model)),
                self.event("response.in_progress", response=response_object(state, self._model))]

    def message_opening(self) -> list[str]:
        state = self._state
        return [self.event("response.output_item.added", output_index=state.message_index,
                           item=message_item(state, done=False)),
                self.event("response.content_part.added", **self._part_ids(), part=output_text_part(""))]

    def delta(self, text: str, logprobs: list[dict[str, Any]]) -> str:
        return self.event("response.output_text.delta", **self._part_ids(), delta=text, logprobs=logprobs)

    def message_closing(self) -> list[str]:
        state = self._state
        return [self.event("response.output_text.done", **self._part_ids(), text=state.text, logprobs=state.logprobs),
                self.event("response.content_part.done", **self._part_ids(),
                           part=output_text_part(state.text, state.logprobs)),
                self.event("response.output_item.done", output_index=state.message_index,
                           item=message_item(state, done=True))]

    def function_call(self, index: int, output_index: int) -> list[str]:
        """The four events of the answer's `index`-th call (already in `state.tool_calls`), complete."""
        item = function_call_item(self._state, index)
        ids = {"item_id": item["id"], "output_index": output_index}
        return [self.event("response.output_item.added", output_index=output_index,
                           item={**item, "arguments": "", "status": "in_progress"}),
                self.event("response.function_call_arguments.delta", **ids, delta=item["arguments"]),
                self.event("response.function_call_arguments.done", **ids, name=item["name"],
                           arguments=item["arguments"]),
                self.event("response.output_item.done", output_index=output_index, item=item)]

    def final(self) -> str:
        # NOTE: OpenAI has no event for a cancelled response; its stream ends with response.completed whose
        # response says status "cancelled", which is what SDK clients read.
        final = "response.incomplete" if self._state.status == "incomplete" else "response.completed"
        return self.event(final, response=response_object(self._state, self._model))

    def _part_ids(self) -> dict[str, Any]:
        return {"item_id": self._state.message_id, "output_index": self._state.message_index, "content_index": 0}

    def failure(self, body: dict[str, Any]) -> list[str]:
        error = body["error"]
        state = self._state
        state.status = "failed"
        state.error = {"code": _RESPONSE_ERROR_CODES.get(error.get("code") or "", "server_error"),
                       "message": error["message"]}
        return [self.event("error", code=error.get("code"), message=error["message"], param=error.get("param")),
                self.event("response.failed", response=response_object(state, self._model))]
