"""`/v1/responses`: OpenAI's Responses API as a translation onto the chat path (no second pipeline).

A request becomes a `ChatCompletionRequest` — `instructions` as the system turn, the stored conversation of
`previous_response_id`, then `input` — and goes through `ChatService.prepare` (limits, media intake, template,
`text.format` as `response_format`), then the same engine. What comes back is written as a Response object or as
the Responses stream events (`vlmserve.api.responses_format`).

Function tools translate onto chat `tools` / `tool_choice`, `function_call` items onto assistant tool calls and
`function_call_output` items onto `tool` turns; the answer is read back by the chat path's incremental output parser (`OutputParser`, what a streamed chat completion uses), so a streamed
response sends its text as it comes and each function call as soon as it is complete; a non-streamed one runs the
same path and keeps what it would have sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from vlmserve.api import schemas
from vlmserve.api.responses_format import EventWriter, ResponseState, logprob_entries, response_object
from vlmserve.api.responses_store import ResponseStore, StoredResponse
from vlmserve.api.schemas_responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputImage,
    InputText,
    ItemReference,
    MessageItem,
    OutputText,
    ResponseCreateRequest,
)
from vlmserve.api.serving_chat import ChatService
from vlmserve.engine.client import EngineClient
from vlmserve.errors import InvalidRequestError, NotFoundError, UnsupportedFeatureError, VlmserveError
from vlmserve.types import GenerationRequest, TokenDelta

logger = logging.getLogger(__name__)


@dataclass
class PreparedResponse:
    state: ResponseState
    generation: GenerationRequest
    #: the conversation a later previous_response_id continues (without instructions, as OpenAI does)
    conversation: list[dict[str, Any]]
    summary: dict[str, Any]
    #: set when the request has tools: the chat path's output plan and request, to read tool calls back
    chat_request: schemas.ChatCompletionRequest | None = None


class ResponsesService:
    def __init__(self, chat: ChatService, engine: EngineClient, store: ResponseStore) -> None:
        self._chat = chat
        self._engine = engine
        self._store = store
        self._inflight: dict[str, tuple[ResponseState, asyncio.Event]] = {}

    async def prepare(self, request: ResponseCreateRequest) -> PreparedResponse:
        _refuse_unsupported(request)
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            stored = self._store.get(request.previous_response_id)
            if stored is None:
                raise NotFoundError(f"no stored response {request.previous_response_id!r} (it was never stored, "
                                    "was deleted, or expired: --responses-store-ttl-s)",
                                    param="previous_response_id", code="previous_response_not_found")
            history = stored.conversation
        new_messages = _input_messages(request)
        system = [{"role": "system", "content": request.instructions}] if request.instructions else []
        logprobs = "message.output_text.logprobs" in (request.include or ())
        with _responses_params():
            chat_request = schemas.ChatCompletionRequest.model_validate({
                "model": request.model, "messages": system + history + new_messages,
                "max_completion_tokens": request.max_output_tokens, "temperature": request.temperature,
                "top_p": request.top_p, "seed": request.seed, "top_k": request.top_k, "min_p": request.min_p,
                "repetition_penalty": request.repetition_penalty, "ignore_eos": request.ignore_eos,
                "logprobs": logprobs, "top_logprobs": request.top_logprobs if logprobs else None,
                **_chat_tools(request),
                "response_format": _response_format(request)})
        with _responses_params():
            generation, summary = await self._chat.prepare(chat_request)
        response_id = f"resp_{uuid.uuid4().hex}"
        generation = dataclasses.replace(generation, request_id=response_id)
        summary["request_id"] = response_id
        state = ResponseState(response_id=response_id, message_id=f"msg_{uuid.uuid4().hex}", request=request,
                              input_tokens=generation.prompt.num_tokens)
        return PreparedResponse(state, generation, history + new_messages, summary,
                                chat_request if request.tools else None)

    # --- answers ---------------------------------------------------------------------------------------------

    async def create(self, prepared: PreparedResponse) -> dict[str, Any]:
        writer = EventWriter(prepared.state, prepared.state.request.model)
        async for _ in self._events(prepared, self._start(prepared), writer):
            pass  # the same path as a stream: what it would have sent is what the object holds
        return response_object(prepared.state, prepared.state.request.model)

    def stream(self, prepared: PreparedResponse) -> tuple[AsyncIterator[str], EventWriter]:
        """The stream's events and its writer (whose `failure` ends the stream if generation fails). Raises before
        any event for every error that needs no generation."""
        writer = EventWriter(prepared.state, prepared.state.request.model)
        return self._events(prepared, self._start(prepared), writer), writer

    def _start(self, prepared: PreparedResponse) -> AsyncIterator[TokenDelta]:
        with _responses_params():
            return self._engine.generate(prepared.generation)

    async def _events(self, prepared: PreparedResponse, deltas: AsyncIterator[TokenDelta],
                      writer: EventWriter) -> AsyncIterator[str]:
        """Every event of the response as the engine's deltas come. With tools, the text goes through the chat
        path's incremental output parser: text is sent as the parser vouches for it, each call once complete."""
        state = prepared.state
        parser = (self._chat.output_plan(prepared.chat_request, prepared.generation).new_parser()
                  if prepared.chat_request is not None else None)
        for event in writer.opening():
            yield event
        is_open = parser is None  # a plain answer is one message, opened at once (as OpenAI's stream does)
        if is_open:
            for event in writer.message_opening():
                yield event
        async for delta in self._run(prepared, deltas):
            if parser is None:
                text, entries, calls = delta.text, logprob_entries(delta), []
            else:
                parsed = parser.feed(delta.text, final=delta.finish_reason is not None)
                text, entries, calls = parsed.content, [], parsed.tool_calls
            if (text or entries) and not is_open:
                state.message_index, is_open = len(state.tool_calls), True
                for event in writer.message_opening():
                    yield event
            if text or entries:
                state.text += text
                state.logprobs += entries
                yield writer.delta(text, entries)
            for call in calls:
                state.tool_calls.append({"call_id": call.id, "name": call.name, "arguments": call.arguments})
                for event in writer.function_call(len(state.tool_calls) - 1, len(state.tool_calls) - 1 + is_open):
                    yield event
        self._finish(prepared)
        if not is_open and not state.tool_calls:  # nothing at all was said: an empty message, as without tools
            for event in writer.message_opening():
                yield event
            is_open = True
        if is_open:
            for event in writer.message_closing():
                yield event
        yield writer.final()

    async def _run(self, prepared: PreparedResponse, deltas: AsyncIterator[TokenDelta]) -> AsyncIterator[TokenDelta]:
        """The engine's deltas, with the response's counts and status kept up to date; stops early when
        cancelled."""
        state = prepared.state
        cancelled = asyncio.Event()
        self._inflight[state.response_id] = (state, cancelled)
        self._keep(prepared)  # GET sees it in progress
        try:
            async for delta in deltas:
                state.output_tokens = delta.num_generated_tokens
                state.cached_tokens = max(state.cached_tokens, self._chat.reported_cached_tokens(delta.num_cached_tokens))
                yield delta
                if delta.finish_reason is not None:
                    state.finish(delta.finish_reason.value)
                # NOTE: a cancel takes effect at the next delta (at most one token late), not while prefilling
                if cancelled.is_set():
                    state.status = "cancelled"
                    state.finish(None)
                    break
        except BaseException as exc:
            # kept as failed (or cancelled, when the client went away), not in_progress until it expires
            state.status = "failed" if isinstance(exc, Exception) else "cancelled"
            if isinstance(exc, Exception):
                state.error = {"code": "server_error", "message": "the response failed while generating"}
            state.finish(None)
            self._keep(prepared)
            raise
        finally:
            self._inflight.pop(state.response_id, None)
            await _aclose(deltas)

    def _finish(self, prepared: PreparedResponse) -> dict[str, Any]:
        state = prepared.state
        if state.status == "in_progress":
            state.finish(None)
        self._keep(prepared)
        return response_object(state, state.request.model)

    def _keep(self, prepared: PreparedResponse) -> None:
        state = prepared.state
        if not state.request.store:
            return
        answer: dict[str, Any] = {"role": "assistant", "content": state.text}
        if state.tool_calls:
            answer["tool_calls"] = [{"id": c["call_id"], "type": "function",
                                     "function": {"name": c["name"], "arguments": c["arguments"]}}
                                    for c in state.tool_calls]
        conversation = [*prepared.conversation, answer]
        self._store.put(state.response_id, StoredResponse(response_object(state, state.request.model),
                                                          conversation))

    # --- retrieval -------------------------------------------------------------------------------------------

    def get(self, response_id: str) -> dict[str, Any]:
        inflight = self._inflight.get(response_id)
        if inflight is not None and inflight[0].request.store:
            return response_object(inflight[0], inflight[0].request.model)
        stored = self._store.get(response_id)
        if stored is None:
            raise NotFoundError(f"no stored response {response_id!r}", param="response_id",
                                code="response_not_found")
        return stored.response

    def delete(self, response_id: str) -> dict[str, Any]:
        if not self._store.delete(response_id):
            raise NotFoundError(f"no stored response {response_id!r}", param="response_id",
                                code="response_not_found")
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    def cancel(self, response_id: str) -> dict[str, Any]:
        inflight = self._inflight.get(response_id)
        if inflight is None:
            stored = self._store.get(response_id)
            if stored is None:
                raise NotFoundError(f"no response {response_id!r} in progress or stored", param="response_id",
                                    code="response_not_found")
            raise InvalidRequestError(f"response {response_id!r} is {stored.response['status']}; only a response "
                                      "still being generated can be cancelled", param="response_id",
                                      code="response_not_cancellable")
        state, cancelled = inflight
        cancelled.set()
        return {**response_object(state, state.request.model, with_output=False), "status": "cancelled"}


#: chat request fields → the Responses fields they came from, for error params the client can act on
#: (message indices differ from input's — instructions and history come first — so messages[...] is just input)
_PARAMS = {"response_format": "text.format", "max_completion_tokens": "max_output_tokens",
           "max_tokens": "max_output_tokens", "messages": "input"}


@contextmanager
def _responses_params() -> Iterator[None]:
    """Errors raised by the chat path name the Responses field the client sent (`text.format`, not
    `response_format`)."""
    try:
        yield
    except ValidationError as exc:  # the chat request built from a valid Responses request broke a chat rule
        first = exc.errors()[0]
        raise InvalidRequestError(f"input: {str(first.get('msg', 'invalid')).removeprefix('Value error, ')}",
                                  param="input") from exc
    except VlmserveError as exc:
        if exc.param is not None:
            key = exc.param.split(".", 1)[0].split("[", 1)[0]
            if key == "messages":
                exc.param = "input"
            elif key in _PARAMS:
                exc.param = _PARAMS[key] + exc.param[len(key):]
        raise


def _refuse_unsupported(request: ResponseCreateRequest) -> None:
    if request.background:
        raise UnsupportedFeatureError("background responses are not supported; send the request and wait, or "
                                      "stream it", param="background")
    for i, tool in enumerate(request.tools or ()):
        if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            raise UnsupportedFeatureError("only function tools (type 'function' with a name) are supported",
                                          param=f"tools[{i}]")


def _chat_tools(request: ResponseCreateRequest) -> dict[str, Any]:
    """tools / tool_choice / parallel_tool_calls in the chat request's shapes (nothing without tools)."""
    if not request.tools:
        return {}
    tools = [{"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters", "strict")
                                               if tool.get(k) is not None}} for tool in request.tools]
    choice: Any = request.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise UnsupportedFeatureError("tool_choice must be none, auto, required or a function by name",
                                          param="tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return {"tools": tools, "tool_choice": choice, "parallel_tool_calls": request.parallel_tool_calls}


def _response_format(request: ResponseCreateRequest) -> dict[str, Any] | None:
    """`text.format` in chat's `response_format` shape, so the chat path builds the structured-output spec."""
    text_format = request.text.format if request.text else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return {"type": "json_object"}
    if text_format.schema_ is None:
        raise InvalidRequestError("text.format of type json_schema needs a schema", param="text.format.schema")
    json_schema: dict[str, Any] = {"name": text_format.name or "response", "schema": text_format.schema_}
    if text_format.strict is not None:
        json_schema["strict"] = text_format.strict
    return {"type": "json_schema", "json_schema": json_schema}


def _input_messages(request: ResponseCreateRequest) -> list[dict[str, Any]]:
    """`input` as chat messages (dicts in the chat request's shape)."""
    if isinstance(request.input, str):
        return [{"role": "user", "content": request.input}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(request.input):
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _content(item, f"input[{i}]")})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            previous = messages[-1] if messages else None
            if previous is not None and previous["role"] == "assistant" and "tool_calls" in previous:
                previous["tool_calls"].append(call)  # parallel calls of one turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else "".join(
                str(part.get("text", "")) for part in item.output if isinstance(part, dict))
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
        elif isinstance(item, ItemReference):
            raise UnsupportedFeatureError("item_reference inputs are not supported; send the item itself",
                                          param=f"input[{i}]")
        else:
            logger.debug("ignoring a %s item of input: it changes nothing this server does", item.type)
    if not messages:
        raise InvalidRequestError("input holds no message", param="input")
    return messages


def _content(item: MessageItem, param: str) -> str | list[dict[str, Any]]:
    if isinstance(item.content, str):
        return item.content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(item.content):
        if isinstance(part, InputImage):
            if part.image_url is None:
                raise UnsupportedFeatureError("input_image needs image_url (a URL or data URI); file ids are not "
                                              "supported", param=f"{param}.content[{j}].image_url")
            detail = "high" if part.detail == "original" else part.detail
            parts.append({"type": "image_url", "image_url": {"url": part.image_url, "detail": detail}})
        elif isinstance(part, (InputText, OutputText)):
            parts.append({"type": "text", "text": part.text})
        else:
            parts.append({"type": "text", "text": part.refusal})
    return parts


async def _aclose(stream: AsyncIterator[TokenDelta]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
