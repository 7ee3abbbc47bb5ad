"""The Responses API on the demo model through the real clients: the openai SDK, openai-agents, LangChain.

The oracle is the chat path: a response must be exactly what the same conversation answers through
/v1/chat/completions at temperature 0 (the Responses API is a translation onto it), and the demo model must
answer the picture's question right.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any, Literal

import httpx
import openai
import pytest

from tests.conftest import ServerProcess
from tests.e2e.conftest import DEMO_KEY
from vlmserve.config import DEMO_MODEL_NAME as MODEL
from vlmserve.demo.shapes import draw_sample_image

QUESTION = "How many shapes are there?"
EVENTS = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def sample_uri() -> str:
    buffer = io.BytesIO()
    draw_sample_image(0).save(buffer, format="PNG")  # four shapes (see the README)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_input(question: str = QUESTION) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "input_image", "image_url": sample_uri()},
                                         {"type": "input_text", "text": question}]}]


def chat_answer(client: openai.OpenAI, messages: list[dict[str, Any]], max_tokens: int = 48) -> str:
    completion = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                temperature=0, max_tokens=max_tokens)
    return completion.choices[0].message.content or ""


def test_text_input_with_instructions_answers_as_chat_does(demo_client: openai.OpenAI) -> None:
    response = demo_client.responses.create(model=MODEL, input="What can you do?", instructions="Be brief.",
                                            temperature=0, max_output_tokens=48)
    expected = chat_answer(demo_client, [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "What can you do?"}])
    assert response.status == "completed" and response.object == "response"
    assert response.output_text == expected and expected
    assert response.usage is not None and response.usage.total_tokens == (response.usage.input_tokens
                                                                          + response.usage.output_tokens)


def test_image_input_is_answered_and_matches_chat(demo_client: openai.OpenAI) -> None:
    response = demo_client.responses.create(model=MODEL, input=image_input(), temperature=0)  # type: ignore[arg-type]
    expected = chat_answer(demo_client, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": sample_uri()}}, {"type": "text", "text": QUESTION}]}])
    assert response.output_text == expected
    assert response.output_text.rstrip(".") == "4"
    assert response.usage is not None and response.usage.input_tokens > 20  # image tokens counted


def test_stream_sends_openais_event_sequence(demo_client: openai.OpenAI) -> None:
    events = list(demo_client.responses.create(model=MODEL, input=image_input("Describe the image."),
                                               temperature=0, stream=True))  # type: ignore[arg-type]
    types = [event.type for event in events]
    assert types[:4] == EVENTS and types[-4:] == [*CLOSING, "response.completed"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    plain = demo_client.responses.create(model=MODEL, input=image_input("Describe the image."),
                                         temperature=0)  # type: ignore[arg-type]
    assert text == final.output_text == plain.output_text and "triangle" in text
    assert final.usage is not None and plain.usage is not None  # cached tokens differ: the second hits the cache
    assert (final.usage.input_tokens, final.usage.output_tokens) == (plain.usage.input_tokens,
                                                                      plain.usage.output_tokens)


def test_objects_and_events_validate_strictly_against_the_sdk_types(demo_server: ServerProcess) -> None:
    """The SDK builds its models without validating; here every body must pass its pydantic validation."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    headers = {"Authorization": f"Bearer {DEMO_KEY}"}
    body = {"model": MODEL, "input": image_input("Describe the image."), "temperature": 0, "max_output_tokens": 3}
    plain = httpx.post(f"{demo_server.base_url}/v1/responses", json=body, headers=headers, timeout=60).json()
    assert Response.model_validate(plain).status == "incomplete"
    with httpx.stream("POST", f"{demo_server.base_url}/v1/responses", json={**body, "stream": True},
                      headers=headers, timeout=60) as streamed:
        events = [json.loads(line[len("data: "):]) for line in streamed.iter_lines() if line.startswith("data: ")]
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    assert [type(adapter.validate_python(event)).__name__ for event in events][-1] == "ResponseIncompleteEvent"
    Response.model_validate(httpx.get(f"{demo_server.base_url}/v1/responses/{plain['id']}", headers=headers).json())


def test_previous_response_id_continues_the_conversation(demo_client: openai.OpenAI) -> None:
    first = demo_client.responses.create(model=MODEL, input=image_input(), temperature=0)  # type: ignore[arg-type]
    second = demo_client.responses.create(model=MODEL, input="What colour is the square?", temperature=0,
                                          previous_response_id=first.id)
    expected = chat_answer(demo_client, [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": sample_uri()}},
                                     {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What colour is the square?"}])
    assert second.output_text == expected and second.previous_response_id == first.id
    assert demo_client.responses.retrieve(first.id).output_text == first.output_text
    demo_client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        demo_client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as refused:
        demo_client.responses.create(model=MODEL, input="And?", previous_response_id=first.id)
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_store_false_keeps_nothing_and_max_output_tokens_is_incomplete(demo_client: openai.OpenAI) -> None:
    unstored = demo_client.responses.create(model=MODEL, input="Hello", store=False, max_output_tokens=2)
    assert unstored.status == "incomplete" and unstored.incomplete_details is not None
    assert unstored.incomplete_details.reason == "max_output_tokens" and unstored.usage.output_tokens == 2  # type: ignore[union-attr]
    with pytest.raises(openai.NotFoundError):
        demo_client.responses.retrieve(unstored.id)


def test_cancel_stops_a_running_response(demo_client: openai.OpenAI) -> None:
    stream = demo_client.responses.create(model=MODEL, input="Hello", stream=True, max_output_tokens=3000,
                                          extra_body={"ignore_eos": True})
    response_id = None
    for event in stream:
        if event.type == "response.created":
            response_id = event.response.id
        if event.type == "response.output_text.delta":
            assert response_id is not None
            assert demo_client.responses.cancel(response_id).status == "cancelled"
            break
    final = [event for event in stream if event.type == "response.completed"]
    assert final and final[0].response.status == "cancelled"
    assert final[0].response.usage is not None and final[0].response.usage.output_tokens < 3000
    with pytest.raises(openai.BadRequestError):  # finished: nothing left to cancel
        demo_client.responses.cancel(final[0].response.id)


def test_non_function_tools_are_refused(demo_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        demo_client.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}])  # type: ignore[list-item]
    assert refused.value.body["param"] == "tools[0]"  # type: ignore[index]


def test_text_format_goes_through_the_chat_paths_structured_output(demo_client: openai.OpenAI) -> None:
    """text.format becomes chat's response_format: the same grammar-constrained answer as chat gives."""
    schema = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"],
              "additionalProperties": False}
    response = demo_client.responses.create(model=MODEL, input=image_input(), temperature=0, max_output_tokens=24,
                                            text={"format": {"type": "json_schema", "name": "shapes",
                                                             "schema": schema, "strict": True}})
    chat = demo_client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=24, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": sample_uri()}}, {"type": "text", "text": QUESTION}]}],
        response_format={"type": "json_schema", "json_schema": {"name": "shapes", "schema": schema,
                                                                "strict": True}})
    # the tiny demo model was never taught JSON: the grammar holds it to the schema's shape, not to a short answer
    assert response.output_text == chat.choices[0].message.content and response.output_text.startswith('{"count"')
    if response.status == "completed":
        assert isinstance(json.loads(response.output_text)["count"], int)
    with pytest.raises(openai.BadRequestError) as refused:
        demo_client.responses.create(model=MODEL, input="Hi", text={"format": {"type": "json_schema", "name": "x",
                                                                               "schema": {"type": "nonsense"}}})
    assert refused.value.body["param"].startswith("text.format")  # type: ignore[index]


def test_openai_agents_default_agent_answers_about_the_image(demo_server: ServerProcess) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)

    async def ask() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=f"{demo_server.base_url}/v1", api_key=DEMO_KEY, max_retries=0)
        agent = Agent(name="shapes", model=OpenAIResponsesModel(model=MODEL, openai_client=client),
                      model_settings=ModelSettings(temperature=0))
        result = await Runner.run(agent, image_input())  # type: ignore[arg-type]
        streamed = Runner.run_streamed(agent, image_input())  # type: ignore[arg-type]
        async for _ in streamed.stream_events():
            pass
        await client.close()
        return str(result.final_output), str(streamed.final_output)

    answer, streamed = asyncio.run(ask())
    assert answer.rstrip(".") == "4" and streamed == answer


def test_langchain_with_the_responses_api(demo_server: ServerProcess) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{demo_server.base_url}/v1", api_key=DEMO_KEY,  # type: ignore[arg-type]
                     use_responses_api=True, temperature=0, max_retries=0)
    message = llm.invoke([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": sample_uri()}},
                                                       {"type": "text", "text": QUESTION}]}])
    assert message.text.rstrip(".") == "4"
    assert "".join(chunk.text for chunk in llm.stream("Hello")) == llm.invoke("Hello").text


def test_logprobs_when_included(demo_client: openai.OpenAI) -> None:
    common: dict[str, Any] = {"model": MODEL, "input": "Hello", "temperature": 0, "max_output_tokens": 16,
                              "top_logprobs": 2, "include": ["message.output_text.logprobs"]}
    response = demo_client.responses.create(**common)
    part = response.output[0].content[0]  # type: ignore[union-attr]
    tokens = "".join(lp.token for lp in part.logprobs or [])  # type: ignore[union-attr]
    assert part.logprobs and tokens.startswith(response.output_text)  # type: ignore[union-attr]  # (+ EOS, as chat)
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token == lp.token for lp in part.logprobs)  # type: ignore[union-attr]
    events = list(demo_client.responses.create(stream=True, **common))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [lp.token for lp in streamed] == [lp.token for lp in part.logprobs]  # type: ignore[union-attr]


def test_function_tools_round_trip(demo_client: openai.OpenAI) -> None:
    """A forced call (tool_choice required: the grammar makes even the demo model call) comes back as a
    function_call item; its output sent back with previous_response_id continues the conversation."""
    tools: list[Any] = [{"type": "function", "name": "count_shapes", "strict": True, "parameters": {
        "type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green"]}},
        "required": ["colour"],
        "additionalProperties": False}}]
    first = demo_client.responses.create(model=MODEL, input=image_input(), tools=tools, tool_choice="required",
                                         temperature=0, max_output_tokens=200)
    calls = [item for item in first.output if item.type == "function_call"]
    assert first.status == "completed" and calls and calls[0].name == "count_shapes"
    assert all(json.loads(call.arguments)["colour"] in ("red", "green") for call in calls)
    events = list(demo_client.responses.create(model=MODEL, input=image_input(), tools=tools, stream=True,
                                               tool_choice="required", temperature=0, max_output_tokens=200))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    Response.model_validate(first.model_dump())  # strictly: the SDK builds its objects without validating
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event.model_dump())
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and done[0].arguments == calls[0].arguments and events[-1].type == "response.completed"
    second = demo_client.responses.create(model=MODEL, previous_response_id=first.id, tools=tools, temperature=0,
                                          max_output_tokens=16, input=[{
                                              "type": "function_call_output", "call_id": calls[0].call_id,
                                              "output": "4"}])
    assert second.status in ("completed", "incomplete") and second.previous_response_id == first.id


def test_function_calls_stream_through_the_sdks_stream_helper(demo_client: openai.OpenAI) -> None:
    """tool_choice naming the function (enforced by grammar) through `client.responses.stream`: the call's events
    arrive before the response completes, in OpenAI's order, and the helper's final response holds the call."""
    tools: list[Any] = [{"type": "function", "name": "count_shapes", "parameters": {
        "type": "object", "properties": {"shape": {"type": "string", "enum": ["circle", "square"]}},
        "required": ["shape"], "additionalProperties": False}}]
    choice: Any = {"type": "function", "name": "count_shapes"}
    with demo_client.responses.stream(model=MODEL, input=image_input(), tools=tools, tool_choice=choice,
                                      temperature=0, max_output_tokens=100) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    call_events = ["response.output_item.added", "response.function_call_arguments.delta",
                   "response.function_call_arguments.done", "response.output_item.done"]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert types[2:6] == call_events  # a forced call: no text, so no message item before it
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and calls[0].name == "count_shapes" and json.loads(calls[0].arguments)["shape"] in ("circle",
                                                                                                      "square")
    plain = demo_client.responses.create(model=MODEL, input=image_input(), tools=tools, tool_choice=choice,
                                         temperature=0, max_output_tokens=100)
    assert [(c.name, c.arguments) for c in plain.output if c.type == "function_call"] == [
        (c.name, c.arguments) for c in calls]


def test_openai_agents_streamed_run_calls_a_function_tool_over_the_responses_api(demo_server: ServerProcess) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def count_colour(colour: Literal["red", "green"]) -> str:
        """Count the shapes of one colour."""
        seen.append(colour)
        return f"counted {colour}"

    async def run() -> tuple[list[str], str]:
        async with openai.AsyncOpenAI(base_url=f"{demo_server.base_url}/v1", api_key=DEMO_KEY,
                                      max_retries=0) as client:
            agent = Agent(name="counter", tools=[count_colour], tool_use_behavior="stop_on_first_tool",
                          model=OpenAIResponsesModel(model=MODEL, openai_client=client),
                          model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=300,
                                                       parallel_tool_calls=False))
            streamed = Runner.run_streamed(agent, image_input(), max_turns=2)  # type: ignore[arg-type]
            names = [event.name async for event in streamed.stream_events() if event.type == "run_item_stream_event"]
            return names, str(streamed.final_output)

    names, final = asyncio.run(run())
    assert len(seen) == 1 and seen[0] in ("red", "green")
    assert names[:2] == ["tool_called", "tool_output"] and final == f"counted {seen[0]}"
