"""Structured outputs through a real server (tiny random Qwen2-VL) and the official openai client.

The model's weights are random: every valid output below is valid because the grammar enforced it."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import MODEL
from tests.e2e.test_chat_api import RED, image_message

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


class Shape(BaseModel):
    kind: Literal["circle", "square", "triangle"]
    count: int = Field(ge=0, le=9)
    filled: bool


def ask(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=[image_message("Describe it as JSON.", RED)],
                                          **{"max_tokens": 80, **kwargs})


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_response_format_validates(client: openai.OpenAI, temperature: float) -> None:
    response = ask(client, response_format=JSON_SCHEMA_FORMAT, temperature=temperature, seed=3, n=2,
                   logprobs=True, top_logprobs=1)
    assert len(response.choices) == 2
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert choice.logprobs is not None and all(e.logprob <= 0.0 for e in choice.logprobs.content)
    # one logprob per generated token (the end token included), every choice
    assert sum(len(c.logprobs.content) for c in response.choices) == response.usage.completion_tokens


def test_json_schema_streamed_equals_non_streamed(client: openai.OpenAI) -> None:
    whole = ask(client, response_format=JSON_SCHEMA_FORMAT, temperature=0)
    chunks = list(ask(client, response_format=JSON_SCHEMA_FORMAT, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(model=MODEL, messages=[image_message("What shape?", RED)],
                                               response_format=Shape, max_tokens=60, temperature=0.7, seed=11)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Shape) and 0 <= parsed.count <= 9


@pytest.mark.parametrize("stream", [False, True])
def test_json_object(client: openai.OpenAI, stream: bool) -> None:
    result = ask(client, response_format={"type": "json_object"}, temperature=0, stream=stream, max_tokens=150)
    if stream:
        chunks = list(result)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    else:
        text, finish = result.choices[0].message.content, result.choices[0].finish_reason
    assert text.startswith("{")
    if finish == "stop":  # any object may be longer than max_tokens; one that ended is complete
        assert isinstance(json.loads(text), dict)


def test_vllm_fields(client: openai.OpenAI) -> None:
    regex = ask(client, temperature=1.0, seed=1, extra_body={"structured_outputs": {"regex": r"[A-Z]{3}-\d{2}"}})
    assert re.fullmatch(r"[A-Z]{3}-\d{2}", regex.choices[0].message.content)
    choice = ask(client, temperature=1.0, seed=2, extra_body={"guided_choice": ["left", "right", "up"]})
    assert choice.choices[0].message.content in ("left", "right", "up")
    grammar = ask(client, temperature=0, extra_body={"guided_grammar": 'start: "ok" | "no"'})
    assert grammar.choices[0].message.content in ("ok", "no")
    guided = ask(client, temperature=0, extra_body={"guided_json": json.dumps(PERSON)})
    jsonschema.validate(json.loads(guided.choices[0].message.content), PERSON)


@pytest.mark.parametrize(("kwargs", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "dependentSchemas": {"a": {}}}}}},
     "response_format.json_schema.schema", "dependentSchemas"),
    ({"extra_body": {"guided_regex": "a(b"}}, "guided_regex", "regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "start: nothing_defined"}}}, "structured_outputs.grammar",
     "grammar"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "guided_regex",
     "one field only"),
    ({"extra_body": {"guided_json": "{not json"}}, "guided_json", "not valid JSON"),
])
def test_unenforceable_or_conflicting_constraints_are_400(client: openai.OpenAI, kwargs: dict[str, Any],
                                                          param: str, words: str) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            result = ask(client, stream=stream, **kwargs)
            list(result) if stream else None
        body = caught.value.body
        assert isinstance(body, dict) and body["param"] == param and words in body["message"], body
    assert ask(client, max_tokens=2).choices[0].finish_reason in ("stop", "length")  # and the server serves on
