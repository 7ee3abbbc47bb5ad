"""/v1/completions and /v1/tokenize, /v1/detokenize on the demo model through the openai SDK and httpx."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ServerProcess
from tests.e2e.conftest import DEMO_KEY
from vlmserve.config import DEMO_MODEL_NAME as MODEL
from vlmserve.demo.shapes import draw_sample_image


def sample_uri(seed: int = 0) -> str:
    buffer = io.BytesIO()
    draw_sample_image(seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def post(server: ServerProcess, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, headers={"Authorization": f"Bearer {DEMO_KEY}"},
                      timeout=60)


def test_completion_of_text_and_token_prompts(demo_client: openai.OpenAI, demo_server: ServerProcess) -> None:
    text = demo_client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0)
    ids = post(demo_server, "/v1/tokenize", {"prompt": "Hello"}).json()["tokens"]
    from_ids = demo_client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert text.object == "text_completion" and text.choices[0].text == from_ids.choices[0].text
    assert text.usage is not None and text.usage.prompt_tokens == len(ids) and text.usage.completion_tokens == 6
    several = demo_client.completions.create(model=MODEL, prompt=["Hello", "Hi"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == text.choices[0].text[:len(several.choices[0].text)]


def test_echo_logprobs_and_streaming(demo_client: openai.OpenAI) -> None:
    echoed = demo_client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, echo=True)
    plain = demo_client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    assert echoed.choices[0].text == "Hello" + plain.choices[0].text
    logprobs = plain.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert "".join(logprobs.tokens) == plain.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert all(len(top) == 2 and token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True))
    chunks = list(demo_client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_best_of_returns_the_candidate_of_highest_cumulative_logprob(demo_client: openai.OpenAI) -> None:
    common = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "temperature": 1.5, "seed": 11}
    candidates = demo_client.completions.create(n=3, logprobs=0, **common)  # type: ignore[call-overload]
    best = demo_client.completions.create(n=1, best_of=3, **common)  # type: ignore[call-overload]

    def score(choice: Any) -> float:
        return float(sum(choice.logprobs.token_logprobs))

    assert len({c.text for c in candidates.choices}) > 1  # the choice is not trivial
    expected = max(candidates.choices, key=score)
    assert len(best.choices) == 1 and best.choices[0].text == expected.text and best.choices[0].logprobs is None
    assert best.usage is not None and candidates.usage is not None
    assert best.usage.completion_tokens == candidates.usage.completion_tokens  # every candidate is counted


@pytest.mark.parametrize(("extra", "param"), [({"suffix": "end"}, "suffix"),
                                              ({"best_of": 3, "stream": True}, "best_of"),
                                              ({"echo": True, "logprobs": 1}, "echo"),
                                              ({"max_tokens": 10**6, "stream": True}, "max_tokens")])
def test_what_cannot_be_honoured_is_refused_before_any_byte(demo_client: openai.OpenAI, extra: dict[str, object],
                                                            param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        demo_client.completions.create(model=MODEL, prompt="Hello", **extra)  # type: ignore[call-overload]
    assert refused.value.body["param"] == param  # type: ignore[index]


def test_tokenize_counts_what_a_chat_request_is_charged(demo_client: openai.OpenAI,
                                                        demo_server: ServerProcess) -> None:
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": sample_uri(), "detail": "low"}},
        {"type": "text", "text": "How many shapes are there?"},
        {"type": "image_url", "image_url": {"url": sample_uri(1), "detail": "high"}}]}]
    counted = post(demo_server, "/v1/tokenize", {"model": MODEL, "messages": messages}).json()
    chat = demo_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)  # type: ignore[arg-type]
    assert chat.usage is not None and counted["count"] == chat.usage.prompt_tokens == len(counted["tokens"])
    images = counted["images"]
    assert [(i["index"], i["detail"], i["param"]) for i in images] == [
        (0, "low", "messages[0].content[0].image_url"), (1, "high", "messages[0].content[2].image_url")]
    assert all(i["num_tokens"] > 0 for i in images) and sum(i["num_tokens"] for i in images) == \
        counted["num_image_tokens"] < counted["count"]
    assert counted["max_model_len"] > counted["count"]


def test_detokenize_inverts_tokenize_and_bad_ids_are_refused(demo_server: ServerProcess) -> None:
    tokens = post(demo_server, "/v1/tokenize", {"prompt": "What colour is the circle?",
                                                "return_token_strs": True}).json()
    assert len(tokens["token_strs"]) == tokens["count"]
    text = post(demo_server, "/v1/detokenize", {"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "What colour is the circle?"}
    refused = post(demo_server, "/v1/detokenize", {"tokens": [10**9]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tokens"
    both = post(demo_server, "/v1/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]})
    assert both.status_code == 400


def test_completion_bodies_validate_strictly_against_the_sdk_type(demo_server: ServerProcess) -> None:
    from openai.types import Completion

    body = {"model": MODEL, "prompt": ["Hello", "Hi"], "max_tokens": 3, "logprobs": 1, "n": 2}
    Completion.model_validate(post(demo_server, "/v1/completions", body).json())
    with httpx.stream("POST", f"{demo_server.base_url}/v1/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=60) as streamed:
        chunks = [line[len("data: "):] for line in streamed.iter_lines() if line.startswith("data: {")]
    # the SDK types finish_reason as required, though OpenAI's own chunks send null until the last: validate those
    finishing = [chunk for chunk in chunks if '"finish_reason":null' not in chunk]
    assert len(finishing) == 4 and all(Completion.model_validate_json(chunk).choices for chunk in finishing)
