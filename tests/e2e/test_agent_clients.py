"""Tool calling and structured output with the clients agents are built on, against a real `vlmserve serve` of
the bundled demo model (one server for the module): the openai SDK, LangChain, openai-agents, instructor,
LiteLLM and Dify's request shape. Every output is checked against the schema its request asked for.

The demo model never chooses to call a tool by itself, so calls are forced (`tool_choice` required or named) and
the grammar engine makes them valid; free-text string fields would run on, so schemas bound them (enums, numbers
with limits, max_length). Clients stay offline: base URLs on 127.0.0.1, no retries, no telemetry or tracing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import ServerProcess

MODEL = "vlmserve-demo"
QUESTION = "How many red shapes are there?"
COUNT_SHAPES = {"type": "function", "function": {
    "name": "count_shapes", "description": "Count the shapes of one color in the picture.",
    "parameters": {"type": "object", "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "max_count": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["color"]}}}
ZOOM = {"type": "function", "function": {
    "name": "zoom", "description": "Zoom into the picture.",
    "parameters": {"type": "object", "properties": {"factor": {"type": "integer", "minimum": 1, "maximum": 4}},
                   "required": ["factor"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (COUNT_SHAPES, ZOOM)}


class ShapeCount(BaseModel):
    """How many shapes of one color the picture holds."""

    color: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def demo(start_server: type[ServerProcess]) -> Iterator[ServerProcess]:
    yield start_server(["--max-num-seqs", "8"])


@pytest.fixture(scope="module")
def base_url(demo: ServerProcess) -> str:
    return f"{demo.base_url}/v1"


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0) as sdk:
        yield sdk


def assert_valid_call(name: str, arguments: str | dict[str, Any]) -> dict[str, Any]:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, SCHEMAS[name])
    return args


# --- openai SDK ----------------------------------------------------------------------------------------------


def test_openai_required_call_is_valid(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], tools=[COUNT_SHAPES, ZOOM],
        tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=200)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert_valid_call(call.function.name, call.function.arguments)


def test_openai_named_call_streamed_equals_non_streamed(client: openai.OpenAI) -> None:
    request: dict[str, Any] = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                   tools=[COUNT_SHAPES, ZOOM], temperature=0, max_tokens=200,
                                   tool_choice={"type": "function", "function": {"name": "zoom"}})
    whole = client.chat.completions.create(**request).choices[0].message
    assert whole.tool_calls and whole.tool_calls[0].function.name == "zoom"
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**request, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        ("zoom", whole.tool_calls[0].function.arguments)]
    assert_valid_call("zoom", calls[0]["arguments"])


def test_openai_parse_with_pydantic(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                               response_format=ShapeCount, temperature=0, max_tokens=100)
    assert isinstance(completion.choices[0].message.parsed, ShapeCount)


def test_openai_tool_round_trip_with_an_image_result(client: openai.OpenAI) -> None:
    from tests.conftest import data_uri, png_bytes

    messages: list[Any] = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "zoom", "arguments": '{"factor": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(png_bytes((255, 0, 0), (112, 112)))}},
            {"type": "text", "text": "zoomed picture"}]}]
    completion = client.chat.completions.create(model=MODEL, messages=messages, tools=[COUNT_SHAPES, ZOOM],
                                                temperature=0, max_tokens=30)
    assert completion.usage is not None and completion.usage.prompt_tokens > 100  # the image's tokens count
    assert completion.choices[0].finish_reason in ("stop", "length", "tool_calls")


# --- LangChain -----------------------------------------------------------------------------------------------


def chat_model(base_url: str) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=base_url, api_key="unused", temperature=0, max_tokens=200,  # type: ignore[arg-type]
                      max_retries=0)


def test_langchain_bind_tools_forcing_a_tool(base_url: str) -> None:
    message = chat_model(base_url).bind_tools([COUNT_SHAPES, ZOOM], tool_choice="count_shapes").invoke(QUESTION)
    assert [call["name"] for call in message.tool_calls] == ["count_shapes"]
    assert_valid_call("count_shapes", message.tool_calls[0]["args"])


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output_with_a_schema(base_url: str, method: str) -> None:
    result = chat_model(base_url).with_structured_output(ShapeCount, method=method).invoke(QUESTION)
    assert isinstance(result, ShapeCount)


def test_langchain_structured_output_json_mode(base_url: str) -> None:
    # json_mode promises a JSON object (LangChain parses it; the schema only goes into the prompt)
    schema = {"title": "Answer", "type": "object", "properties": {"color": {"type": "string"}}}
    result = chat_model(base_url).with_structured_output(schema, method="json_mode").invoke(
        "Answer in JSON: " + QUESTION)
    assert isinstance(result, dict)


# --- openai-agents -------------------------------------------------------------------------------------------


def run_agent(base_url: str, make_agent: Any) -> Any:
    """Run `make_agent(model)` to completion on a fresh loop, closing its client (no leaked sockets)."""
    from agents import OpenAIChatCompletionsModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)

    async def main() -> Any:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as sdk:
            agent = make_agent(OpenAIChatCompletionsModel(model=MODEL, openai_client=sdk))
            return await Runner.run(agent, QUESTION, max_turns=2)

    return asyncio.run(main())


def test_openai_agents_function_tool(base_url: str) -> None:
    from agents import Agent, ModelSettings, function_tool

    seen: list[str] = []

    @function_tool
    def zoom_on(color: Literal["red", "green", "blue"]) -> str:
        """Zoom onto the shapes of one color."""
        seen.append(color)
        return f"zoomed on {color}"

    result = run_agent(base_url, lambda model: Agent(
        name="looker", instructions="Use the tools.", tools=[zoom_on], model=model,
        tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=200)))
    assert len(seen) == 1 and seen[0] in ("red", "green", "blue")
    assert result.final_output == f"zoomed on {seen[0]}"


def test_openai_agents_output_type(base_url: str) -> None:
    from agents import Agent, ModelSettings

    result = run_agent(base_url, lambda model: Agent(
        name="counter", instructions="Count shapes.", output_type=ShapeCount, model=model,
        model_settings=ModelSettings(temperature=0, max_tokens=100)))
    assert isinstance(result.final_output, ShapeCount)


# --- instructor ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_modes_with_a_schema(client: openai.OpenAI, mode: str) -> None:
    import instructor

    patched = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
    result = patched.chat.completions.create(model=MODEL, response_model=ShapeCount, max_retries=0, temperature=0,
                                             max_tokens=200, messages=[{"role": "user", "content": QUESTION}])
    assert isinstance(result, ShapeCount)


def test_instructor_json_mode(client: openai.OpenAI) -> None:
    import instructor

    class Notes(BaseModel):
        # JSON mode constrains the output to a JSON object; the schema only travels in the prompt, which the
        # demo model cannot read, so every field has a default
        color: str | None = Field(default=None, max_length=40)

    patched = instructor.from_openai(client, mode=instructor.Mode.JSON)
    result = patched.chat.completions.create(model=MODEL, response_model=Notes, max_retries=0, temperature=0,
                                             max_tokens=200, messages=[{"role": "user", "content": QUESTION}])
    assert isinstance(result, Notes)


# --- LiteLLM -------------------------------------------------------------------------------------------------


LITELLM_SCRIPT = """
import json, sys
import litellm
response = litellm.completion(model="openai/" + sys.argv[2], api_base=sys.argv[1], api_key="unused", num_retries=0,
                              messages=[{"role": "user", "content": sys.argv[3]}], tools=[json.loads(sys.argv[4])],
                              tool_choice="required", temperature=0, max_tokens=200)
calls = response.choices[0].message.tool_calls or []
print(json.dumps([[c.function.name, c.function.arguments] for c in calls]))
"""


def test_litellm_completion_with_tools(base_url: str) -> None:
    # NOTE: in a subprocess: LiteLLM keeps cached clients and event loops open at exit (ResourceWarnings), and its
    # offline cost map is chosen by an environment variable read at import
    done = subprocess.run([sys.executable, "-c", LITELLM_SCRIPT, base_url, MODEL, QUESTION, json.dumps(COUNT_SHAPES)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"})
    assert done.returncode == 0, done.stderr[-2000:]
    calls = json.loads(done.stdout.strip().splitlines()[-1])
    assert calls and calls[0][0] == "count_shapes"
    assert_valid_call("count_shapes", calls[0][1])


# --- Dify ----------------------------------------------------------------------------------------------------


def test_dify_tool_call_request_shape(demo: ServerProcess) -> None:
    """The body Dify's OpenAI-API-compatible provider sends in tool-call mode: a streamed request with tools,
    an earlier assistant turn carrying tool_calls (empty content) and the tool's result with its name."""
    import httpx

    body = {
        "model": MODEL, "stream": True, "temperature": 0, "max_tokens": 200, "user": "dify-user-1",
        "tools": [COUNT_SHAPES, ZOOM], "tool_choice": "required",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_dify_1", "type": "function",
                 "function": {"name": "zoom", "arguments": "{\"factor\": 2}"}}]},
            {"role": "tool", "tool_call_id": "call_dify_1", "name": "zoom", "content": "zoomed x2"},
        ]}
    calls: dict[int, dict[str, str]] = {}
    with httpx.stream("POST", f"{demo.base_url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for delta in json.loads(line[6:])["choices"][0]["delta"].get("tool_calls", []):
                entry = calls.setdefault(delta["index"], {"name": "", "arguments": ""})
                entry["name"] += delta["function"].get("name", "")
                entry["arguments"] += delta["function"].get("arguments", "")
    assert calls
    for call in calls.values():
        assert_valid_call(call["name"], call["arguments"])
