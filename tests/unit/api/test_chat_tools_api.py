"""The chat API's tool calling and reasoning over a scripted engine, through the official openai client:
calls parsed from real-format text, streamed deltas in OpenAI's shape reassembling to the non-streamed answer,
the grammar spec a forced choice sends to the engine, legacy functions, and reasoning_content."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from vlmserve.api.app import build_app
from vlmserve.config import Config, ModelConfig
from vlmserve.demo import WEIGHTS_DIR
from vlmserve.models.hf_processor import load_processor
from vlmserve.multimodal.loader import MediaLoader
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import EngineStats, FinishReason, GenerationRequest, StructuredOutputSpec, TokenDelta

TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "count_shapes", "parameters": {
        "type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}}},
    {"type": "function", "function": {"name": "zoom", "parameters": {
        "type": "object", "properties": {"factor": {"type": "integer"}}}}},
]
TWO_CALLS = ('Let me look.\n<tool_call>\n{"name": "count_shapes", "arguments": {"color": "red"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}}\n</tool_call>')
MESSAGES: list[Any] = [{"role": "user", "content": "How many red shapes?"}]


class ScriptedEngine:
    """Answers every request with `script`, cut into 3-character deltas; remembers the requests."""

    max_model_len = 4096
    is_dead = False

    def __init__(self) -> None:
        self.script = ""
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        self.requests.append(request)
        pieces = [self.script[i:i + 3] for i in range(0, len(self.script), 3)] or [""]
        for index in range(request.sampling.n):
            for i, piece in enumerate(pieces):
                yield TokenDelta(request.request_id, index, piece, [], request.prompt.num_tokens, i + 1,
                                 finish_reason=FinishReason.STOP if i == len(pieces) - 1 else None)

    def stats(self) -> EngineStats:
        return EngineStats()

    def check_can_accept(self, num_sequences: int, *, num_reserved: int = 0) -> None:
        pass

    def client_load(self, client_id: str | None) -> tuple[int, int]:
        return 0, 0

    def held_prompt_bytes(self) -> int:
        return 0

    async def compile_structured(self, spec: StructuredOutputSpec) -> None:
        pass

    async def shutdown(self, timeout_s: float) -> None:
        pass


@pytest.fixture(scope="module")
def renderer() -> PromptRenderer:
    processor = load_processor(WEIGHTS_DIR)
    return PromptRenderer(processor, image_token_id=processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                          max_model_len=4096)


def call(renderer: PromptRenderer, script: str, request: dict[str, Any], *, reasoning_parser: str = "auto",
         stream: bool = False) -> tuple[Any, ScriptedEngine]:
    engine = ScriptedEngine()
    engine.script = script
    config = Config(model=ModelConfig(reasoning_parser=reasoning_parser))

    async def main() -> Any:
        media = MediaLoader(config.media)
        app = build_app(engine, renderer, media, config, ("demo",), model_family="qwen2_vl")  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
            client = openai.AsyncOpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x", http_client=http, max_retries=0)
            if not stream:
                return await client.chat.completions.create(model="demo", messages=MESSAGES, **request)
            return [chunk async for chunk in await client.chat.completions.create(
                model="demo", messages=MESSAGES, stream=True, **request)]

    return asyncio.run(main()), engine


def calls_of(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_auto_calls_are_parsed_with_content_before_them(renderer: PromptRenderer) -> None:
    completion, engine = call(renderer, TWO_CALLS, {"tools": TOOLS})
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look.\n"
    assert calls_of(choice.message) == [("count_shapes", {"color": "red"}), ("zoom", {"factor": 2})]
    ids = [c.id for c in choice.message.tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    assert engine.requests[0].sampling.structured is None  # auto: the model decides, nothing forced
    prompt = renderer.tokenizer.decode(engine.requests[0].prompt.token_ids)
    assert "# Tools" in prompt and '"name": "count_shapes"' in prompt


def test_streamed_calls_have_openais_shape_and_equal_the_whole_answer(renderer: PromptRenderer) -> None:
    chunks, _ = call(renderer, TWO_CALLS, {"tools": TOOLS}, stream=True)
    content, calls, finish = "", {}, None
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tool_delta in delta.tool_calls or []:
            if tool_delta.id is not None:  # the first delta of a call
                assert tool_delta.type == "function" and tool_delta.function.name
                calls[tool_delta.index] = [tool_delta.function.name, tool_delta.function.arguments or ""]
            else:
                assert tool_delta.function.name is None
                calls[tool_delta.index][1] += tool_delta.function.arguments
        finish = chunk.choices[0].finish_reason or finish
        assert "<tool" not in content
    assert finish == "tool_calls" and content == "Let me look.\n"
    assert [(n, json.loads(a)) for n, a in calls.values()] == [("count_shapes", {"color": "red"}),
                                                               ("zoom", {"factor": 2})]


def test_parallel_tool_calls_false_keeps_the_first_call(renderer: PromptRenderer) -> None:
    completion, _ = call(renderer, TWO_CALLS, {"tools": TOOLS, "parallel_tool_calls": False})
    assert calls_of(completion.choices[0].message) == [("count_shapes", {"color": "red"})]


def test_malformed_call_stays_content(renderer: PromptRenderer) -> None:
    script = '<tool_call>\n{"name": "zoom", "arguments": {"factor": </tool_call>'
    completion, _ = call(renderer, script, {"tools": TOOLS})
    assert completion.choices[0].message.content == script and completion.choices[0].message.tool_calls is None
    assert completion.choices[0].finish_reason == "stop"


def test_required_and_named_choices_send_a_grammar_forcing_a_call(renderer: PromptRenderer) -> None:
    _, engine = call(renderer, "", {"tools": TOOLS, "tool_choice": "required"})
    spec = engine.requests[0].sampling.structured
    assert spec is not None and spec.kind == "grammar"
    assert "count_shapes" in spec.value and "zoom" in spec.value and '("\\n" call)*' in spec.value
    _, engine = call(renderer, "", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "zoom"}}})
    spec = engine.requests[0].sampling.structured
    assert spec is not None and "zoom" in spec.value and "count_shapes" not in spec.value


def test_tool_choice_none_renders_no_tools_and_parses_nothing(renderer: PromptRenderer) -> None:
    completion, engine = call(renderer, TWO_CALLS, {"tools": TOOLS, "tool_choice": "none"})
    assert completion.choices[0].message.content == TWO_CALLS
    assert "# Tools" not in renderer.tokenizer.decode(engine.requests[0].prompt.token_ids)


def test_legacy_functions_answer_with_function_call(renderer: PromptRenderer) -> None:
    script = '<tool_call>\n{"name": "zoom", "arguments": {"factor": 3}}\n</tool_call>'
    request = {"functions": [TOOLS[1]["function"]], "function_call": {"name": "zoom"}}
    completion, engine = call(renderer, script, request)
    choice = completion.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert (choice.message.function_call.name, json.loads(choice.message.function_call.arguments)) == (
        "zoom", {"factor": 3})
    assert engine.requests[0].sampling.structured is not None
    chunks, _ = call(renderer, script, request, stream=True)
    streamed = [c.choices[0].delta.function_call for c in chunks if c.choices[0].delta.function_call]
    assert streamed[0].name == "zoom" and json.loads("".join(d.arguments for d in streamed)) == {"factor": 3}


def test_reasoning_content_is_split_streamed_and_not(renderer: PromptRenderer) -> None:
    script = "<think>\nThe shapes look red.\n</think>\n\nThree."
    completion, _ = call(renderer, script, {}, reasoning_parser="think")
    message = completion.choices[0].message
    assert (message.reasoning_content, message.content) == ("The shapes look red.", "Three.")  # type: ignore[attr-defined]
    chunks, _ = call(renderer, script, {}, reasoning_parser="think", stream=True)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (reasoning, content) == ("The shapes look red.", "Three.")


def test_tool_turns_go_back_into_the_template(renderer: PromptRenderer) -> None:
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "zoom", "arguments": '{"factor": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "zoomed in"}]
    engine = ScriptedEngine()
    engine.script = "Three."

    async def main() -> None:
        config = Config()
        app = build_app(engine, renderer, MediaLoader(config.media), config, ("demo",),  # type: ignore[arg-type]
                        model_family="qwen2_vl")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as http:
            response = await http.post("/v1/chat/completions", json={"model": "demo", "messages": history,
                                                                     "tools": TOOLS})
            assert response.status_code == 200, response.text

    asyncio.run(main())
    prompt = renderer.tokenizer.decode(engine.requests[0].prompt.token_ids)
    assert '<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}}\n</tool_call>' in prompt
    assert "<tool_response>\nzoomed in\n</tool_response>" in prompt
