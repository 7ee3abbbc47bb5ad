"""A real `vlmserve serve` on a tiny random Qwen2-VL, driven by the official openai client.

Random weights produce noise, so these tests assert structure and equivalences (streamed == non-streamed under
greedy decoding, batched == alone), not answers; the demo model's tests check answers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai

from tests.conftest import ImageHTTPServer, ServerProcess, data_uri, png_bytes
from tests.e2e.conftest import API_KEY, MODEL

RED = data_uri(png_bytes((255, 0, 0)))
BLUE = data_uri(png_bytes((0, 0, 255), (64, 96)))


def image_message(text: str, *urls: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


def chat(client: openai.OpenAI, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)


def test_non_streaming_shape(client: openai.OpenAI) -> None:
    response = chat(client, [image_message("What is in this picture?", RED)], max_tokens=8)
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == MODEL
    assert response.created > 0
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.completion_tokens >= 1 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    messages = [image_message("Describe the image.", RED)]
    whole = chat(client, messages, max_tokens=12)
    chunks = list(chat(client, messages, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == [] and chunks[-1] is usage_chunks[0]
    streamed_usage = usage_chunks[0].usage
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert getattr(streamed_usage, field) == getattr(whole.usage, field)
    # the second identical prompt found the first one's blocks in the prefix cache
    assert streamed_usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens_details.cached_tokens


def test_streaming_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(chat(client, [image_message("Hi", RED)], max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_image_tokens_are_counted(client: openai.OpenAI) -> None:
    with_image = chat(client, [image_message("What is this?", RED)], max_tokens=1)
    without = chat(client, [{"role": "user", "content": "What is this?"}], max_tokens=1)
    assert with_image.usage.prompt_tokens > without.usage.prompt_tokens + 4


def test_two_images_in_one_message(client: openai.OpenAI) -> None:
    one = chat(client, [image_message("Compare.", RED)], max_tokens=1)
    two = chat(client, [image_message("Compare.", RED, BLUE)], max_tokens=1)
    assert two.usage.prompt_tokens > one.usage.prompt_tokens


def test_image_in_an_earlier_turn(client: openai.OpenAI) -> None:
    messages = [image_message("What colour?", RED), {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "Are you sure?"}]
    response = chat(client, messages, max_tokens=4)
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > chat(client, messages[2:], max_tokens=1).usage.prompt_tokens


def test_http_url_from_allowed_host_equals_data_uri(client: openai.OpenAI, image_server: ImageHTTPServer) -> None:
    by_url = chat(client, [image_message("What is it?", image_server.url("red.png"))], max_tokens=8)
    by_data = chat(client, [image_message("What is it?", RED)], max_tokens=8)
    assert by_url.choices[0].message.content == by_data.choices[0].message.content
    assert "/red.png" in image_server.hits


def test_different_images_give_different_prompts_or_outputs(client: openai.OpenAI) -> None:
    red = chat(client, [image_message("What?", RED)], max_tokens=8, logprobs=True)
    blue = chat(client, [image_message("What?", data_uri(png_bytes((0, 0, 255))))], max_tokens=8, logprobs=True)
    assert red.choices[0].logprobs.content[0].logprob != blue.choices[0].logprobs.content[0].logprob


def test_n_choices(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=[image_message("Hi", RED)], n=2,
                                              max_tokens=6, temperature=1.0, seed=7, logprobs=True,
                                              extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason == "length" and len(c.logprobs.content) == 6 for c in response.choices)
    assert response.usage.completion_tokens == 12  # both choices counted, the prompt once
    tokens = [[t.token for t in c.logprobs.content] for c in response.choices]
    assert tokens[0] != tokens[1]  # the choices are sampled independently


def test_max_tokens_reached_is_length(client: openai.OpenAI) -> None:
    response = chat(client, [image_message("Talk.", RED)], max_tokens=3, extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


def test_stop_string_cuts_and_is_not_returned(client: openai.OpenAI) -> None:
    messages = [image_message("Talk.", RED)]
    full = chat(client, messages, max_tokens=16, extra_body={"ignore_eos": True}).choices[0].message.content
    assert len(full) > 4
    stop = full[3:5]
    cut = chat(client, messages, max_tokens=16, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[:full.index(stop)]


def test_alias_and_models_endpoint(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL, "tiny-alias"]
    response = client.chat.completions.create(model="tiny-alias", messages=[image_message("Hi", RED)], max_tokens=1)
    assert response.model == "tiny-alias"


def test_concurrent_requests_equal_alone(server: ServerProcess) -> None:
    """16 different images at once; under greedy decoding each answer equals the same request sent alone."""
    aclient = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)
    colors = [((i * 53) % 256, (i * 97) % 256, (i * 31) % 256) for i in range(16)]
    requests = [[image_message(f"Question {i}?", data_uri(png_bytes(c, (60 + 4 * i, 90))))]
                for i, c in enumerate(colors)]

    async def ask(messages: list[dict[str, Any]]) -> str:
        response = await aclient.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                         max_tokens=8)
        return response.choices[0].message.content or ""

    async def run() -> tuple[list[str], list[str]]:
        together = await asyncio.gather(*(ask(m) for m in requests))
        alone = [await ask(m) for m in requests]
        await aclient.close()
        return list(together), alone

    together, alone = asyncio.run(run())
    assert together == alone
    assert len(set(alone)) > 1  # different images really reached the model
