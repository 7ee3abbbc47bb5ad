"""Issue 13's four failing cases, through the clients people use (openai SDK, LangChain, LiteLLM).

1. /v1/responses and 2. /v1/completions answered 404; 3. a stream with max_tokens beyond the context answered 200
and then an error event (generic APIError in the SDK, a *connection* error in LiteLLM); 4. fields clients add
(`cache_control`, `image_url.format`, `stream_options.include_obfuscation`) were refused. Also: top_logprobs carry
token text and bytes, not ids.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import ServerProcess
from tests.e2e.conftest import DEMO_KEY
from vlmserve.config import DEMO_MODEL_NAME as MODEL

TOO_LONG = 10**6


@pytest.fixture(scope="module")
def litellm() -> Iterator[Any]:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no download of the price list (tests stay offline)
    import litellm

    litellm.telemetry = False
    yield litellm
    # litellm caches the HTTP clients it creates; closed here, their sockets do not outlive the test server
    for client in list(litellm.in_memory_llm_clients_cache.cache_dict.values()):
        close = getattr(client, "close", None)
        if callable(close) and not inspect.iscoroutinefunction(close):
            close()


def lenient_messages() -> list[dict[str, Any]]:
    from tests.e2e.test_responses_api import sample_uri

    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": sample_uri(), "format": "image/png"},
         "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "How many shapes are there?", "cache_control": {"type": "ephemeral"}}]}]


def test_sdk_stream_beyond_the_context_is_a_400_before_the_stream(demo_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        demo_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=TOO_LONG, stream=True)
    assert refused.value.status_code == 400 and refused.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as refused:
        demo_client.responses.create(model=MODEL, input="Hi", max_output_tokens=TOO_LONG, stream=True)
    assert refused.value.body["param"] == "max_output_tokens"  # type: ignore[index]  # the Responses field


def test_sdk_accepts_the_fields_clients_add(demo_client: openai.OpenAI) -> None:
    chunks = list(demo_client.chat.completions.create(
        model=MODEL, messages=lenient_messages(), temperature=0, max_tokens=8, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True, "include_obfuscation": False,  # type: ignore[typeddict-unknown-key]
                        "continuous_usage_stats": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).rstrip(".") == "4"


def test_sdk_top_logprobs_are_token_texts_with_bytes(demo_client: openai.OpenAI) -> None:
    completion = demo_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                                     max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and "".join(entry.token for entry in content) == completion.choices[0].message.content
    for entry in content:
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        for alternative in entry.top_logprobs:
            assert not alternative.token.isdigit() or alternative.token == entry.token
            assert alternative.bytes == list(alternative.token.encode("utf-8"))


def test_langchain_gets_the_right_exception_and_leniency(demo_server: ServerProcess) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{demo_server.base_url}/v1", api_key=DEMO_KEY,  # type: ignore[arg-type]
                     temperature=0, max_retries=0, max_tokens=TOO_LONG)  # type: ignore[call-arg]
    with pytest.raises(openai.BadRequestError):
        list(llm.stream("Hi"))
    with pytest.raises(openai.BadRequestError):
        llm.invoke("Hi")
    short = ChatOpenAI(model=MODEL, base_url=f"{demo_server.base_url}/v1", api_key=DEMO_KEY,  # type: ignore[arg-type]
                       temperature=0, max_retries=0, max_tokens=8)  # type: ignore[call-arg]
    assert short.invoke(lenient_messages()).text.rstrip(".") == "4"


def test_litellm_text_completion_responses_and_errors(litellm: Any, demo_server: ServerProcess) -> None:
    common = {"model": f"openai/{MODEL}", "api_base": f"{demo_server.base_url}/v1", "api_key": DEMO_KEY,
              "num_retries": 0}
    with pytest.raises(litellm.BadRequestError):  # ContextWindowExceededError is one; before: APIConnectionError
        for _ in litellm.completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=TOO_LONG,
                                    stream=True, **common):
            pass
    answer = litellm.completion(messages=lenient_messages(), max_tokens=8, temperature=0, **common)
    assert answer.choices[0].message.content.rstrip(".") == "4"
    text = litellm.text_completion(prompt="Hello", max_tokens=3, temperature=0, **common)
    assert text.choices[0].text and text.usage.completion_tokens == 3
    response = litellm.responses(input="Hello", max_output_tokens=16, temperature=0, **common)  # OpenAI's minimum
    assert response.id.startswith("resp_") and 0 < response.usage.output_tokens <= 16
