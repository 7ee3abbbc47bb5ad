"""ResponsesService over a scripted engine: what the store keeps when a response fails or is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vlmserve.api.responses_format import ResponseState
from vlmserve.api.responses_store import MemoryResponseStore
from vlmserve.api.schemas_responses import ResponseCreateRequest
from vlmserve.api.serving_responses import PreparedResponse, ResponsesService
from vlmserve.errors import InternalError
from vlmserve.types import FinishReason, GenerationRequest, PreparedPrompt, SamplingParams, TokenDelta


class ScriptedEngine:
    """Yields one delta per step; `fail_after` raises after that many; records whether the stream was closed."""

    def __init__(self, steps: int, fail_after: int | None = None) -> None:
        self.steps = steps
        self.fail_after = fail_after
        self.closed = False
        self.started = asyncio.Event()
        self.proceed = asyncio.Event()

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        return self._deltas(request)

    async def _deltas(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        try:
            for i in range(self.steps):
                if i == self.fail_after:
                    raise InternalError("boom")
                last = i == self.steps - 1
                yield TokenDelta(request_id=request.request_id, index=0, text=f"t{i} ", token_ids=[i],
                                 num_prompt_tokens=3, num_generated_tokens=i + 1,
                                 finish_reason=FinishReason.LENGTH if last else None)
                self.started.set()
                await self.proceed.wait()
        finally:
            self.closed = True


def prepared(store: bool = True) -> PreparedResponse:
    request = ResponseCreateRequest.model_validate({"model": "m", "input": "hi", "store": store})
    generation = GenerationRequest(request_id="resp_1", prompt=PreparedPrompt(token_ids=[1, 2, 3]),
                                   sampling=SamplingParams(max_tokens=5))
    state = ResponseState(response_id="resp_1", message_id="msg_1", request=request, input_tokens=3)
    return PreparedResponse(state, generation, [{"role": "user", "content": "hi"}], {})


class PlainChat:
    """What the Responses path asks of ChatService for a request without tools: the cached-tokens policy."""

    def reported_cached_tokens(self, cached_tokens: int) -> int:
        return cached_tokens


def service(engine: ScriptedEngine) -> tuple[ResponsesService, MemoryResponseStore]:
    store = MemoryResponseStore(max_entries=10, max_bytes=10**6, ttl_s=60)
    return ResponsesService(chat=PlainChat(), engine=engine, store=store), store  # type: ignore[arg-type]


def test_a_failure_mid_generation_is_stored_as_failed() -> None:
    engine = ScriptedEngine(steps=5, fail_after=2)
    engine.proceed.set()
    responses, store = service(engine)
    with pytest.raises(InternalError):
        asyncio.run(responses.create(prepared()))
    kept: Any = store.get("resp_1")
    assert kept.response["status"] == "failed" and kept.response["error"]["code"] == "server_error"
    assert kept.response["output"] == [] and engine.closed


def test_cancel_stops_generation_and_keeps_a_cancelled_response() -> None:
    engine = ScriptedEngine(steps=50)
    responses, store = service(engine)

    async def run() -> dict[str, Any]:
        task = asyncio.ensure_future(responses.create(prepared()))
        await engine.started.wait()
        assert responses.get("resp_1")["status"] == "in_progress"
        assert responses.cancel("resp_1")["status"] == "cancelled"
        engine.proceed.set()
        return await task

    body = asyncio.run(run())
    assert body["status"] == "cancelled" and body["usage"]["output_tokens"] < 50 and engine.closed
    assert store.get("resp_1").response["status"] == "cancelled"  # type: ignore[union-attr]
    conversation = store.get("resp_1").conversation  # type: ignore[union-attr]
    assert conversation[-1] == {"role": "assistant", "content": body["output"][0]["content"][0]["text"]}


def test_a_finished_response_is_stored_once_complete_and_store_false_keeps_nothing() -> None:
    engine = ScriptedEngine(steps=3)
    engine.proceed.set()
    responses, store = service(engine)
    body = asyncio.run(responses.create(prepared()))
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert store.get("resp_1").response == body  # type: ignore[union-attr]
    engine2 = ScriptedEngine(steps=3)
    engine2.proceed.set()
    responses2, store2 = service(engine2)
    asyncio.run(responses2.create(prepared(store=False)))
    assert len(store2) == 0


class ScriptedText:
    """Yields the given texts as deltas, one per step; `sent` counts the deltas handed out so far."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.sent = 0

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        return self._deltas(request)

    async def _deltas(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        for i, text in enumerate(self.texts):
            self.sent = i + 1
            last = i == len(self.texts) - 1
            yield TokenDelta(request_id=request.request_id, index=0, text=text, token_ids=[i], num_prompt_tokens=3,
                             num_generated_tokens=i + 1, finish_reason=FinishReason.STOP if last else None)


class HermesChat(PlainChat):
    """What the Responses path asks of ChatService when a request has tools: also how to read the output."""

    def output_plan(self, request: Any, generation: GenerationRequest) -> Any:
        from vlmserve.api.output_parsing import OutputPlan

        return OutputPlan(tools=[{"type": "function", "function": {"name": "get_weather"}}], tool_parser="hermes")


def with_tools() -> PreparedResponse:
    from vlmserve.api import schemas

    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    base = prepared()
    base.state.request = ResponseCreateRequest.model_validate({"model": "m", "input": "hi", "tools": [tool]})
    base.chat_request = schemas.ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}]})
    return base


def test_tool_calls_stream_as_their_items_as_soon_as_each_is_complete() -> None:
    import json

    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    engine = ScriptedText(["Let me look", " that up.", call[:20], call[20:], "\n", call.replace("Oslo", "Rome"),
                           "", ""])
    responses = ResponsesService(chat=HermesChat(), engine=engine,  # type: ignore[arg-type]
                                 store=MemoryResponseStore(max_entries=10, max_bytes=10**6, ttl_s=60))
    target = with_tools()
    events, _ = responses.stream(target)

    async def collect() -> list[tuple[int, dict[str, Any]]]:
        return [(engine.sent, json.loads(e.split("data: ", 1)[1])) async for e in events]

    got = asyncio.run(collect())
    types = [body["type"] for _, body in got]
    assert types == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",  # the message opens with its first text
        "response.output_text.delta", "response.output_text.delta",
        *["response.output_item.added", "response.function_call_arguments.delta",
          "response.function_call_arguments.done", "response.output_item.done"] * 2,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [body["sequence_number"] for _, body in got] == list(range(len(got)))
    first_done = next(i for i, (_, b) in enumerate(got) if b["type"] == "response.function_call_arguments.done")
    assert got[first_done][0] == 4  # sent while the engine had handed out only the call's own deltas
    assert json.loads(got[first_done][1]["arguments"]) == {"city": "Oslo"}
    assert [b["output_index"] for _, b in got if b["type"] == "response.output_item.added"] == [0, 1, 2]
    final = got[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Let me look that up."
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for _, body in got:
        adapter.validate_python(body)
    Response.model_validate(final)
    # the non-streamed answer runs the same path: the same items
    again = asyncio.run(ResponsesService(
        chat=HermesChat(), engine=ScriptedText(engine.texts),  # type: ignore[arg-type]
        store=MemoryResponseStore(max_entries=10, max_bytes=10**6, ttl_s=60)).create(with_tools()))
    assert [item.get("arguments") for item in again["output"]] == [item.get("arguments") for item in final["output"]]


def test_an_answer_made_only_of_calls_has_no_message_item() -> None:
    import json

    call = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    responses = ResponsesService(chat=HermesChat(), engine=ScriptedText([call, ""]),  # type: ignore[arg-type]
                                 store=MemoryResponseStore(max_entries=10, max_bytes=10**6, ttl_s=60))
    events, _ = responses.stream(with_tools())

    async def collect() -> list[dict[str, Any]]:
        return [json.loads(e.split("data: ", 1)[1]) async for e in events]

    got = asyncio.run(collect())
    assert [b["type"] for b in got] == ["response.created", "response.in_progress", "response.output_item.added",
                                        "response.function_call_arguments.delta",
                                        "response.function_call_arguments.done", "response.output_item.done",
                                        "response.completed"]
    assert got[2]["output_index"] == 0 and got[2]["item"]["type"] == "function_call"
