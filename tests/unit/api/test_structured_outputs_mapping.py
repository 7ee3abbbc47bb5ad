"""Request fields → one StructuredOutputSpec (or a 400 naming the field), without a server."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from vlmserve.api.schemas import ChatCompletionRequest
from vlmserve.api.structured_outputs import resolve_structured_output, structured_output_spec
from vlmserve.errors import InvalidRequestError
from vlmserve.types import StructuredOutputSpec

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
CANONICAL = json.dumps(SCHEMA, sort_keys=True, separators=(",", ":"))


def parse(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


@pytest.mark.parametrize(("fields", "expected", "param"), [
    ({}, None, None),
    ({"response_format": {"type": "text"}}, None, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutputSpec("json_object"), "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     StructuredOutputSpec("json_schema", CANONICAL), "response_format.json_schema.schema"),
    ({"structured_outputs": {"json": json.dumps(SCHEMA, indent=2)}}, StructuredOutputSpec("json_schema", CANONICAL),
     "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a+"}}, StructuredOutputSpec("regex", "a+"), "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["x", "y"]}}, StructuredOutputSpec("choice", ("x", "y")),
     "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": 'start: "x"'}}, StructuredOutputSpec("grammar", 'start: "x"'),
     "structured_outputs.grammar"),
    ({"structured_outputs": {"json_object": True}}, StructuredOutputSpec("json_object"),
     "structured_outputs.json_object"),
    ({"guided_json": SCHEMA}, StructuredOutputSpec("json_schema", CANONICAL), "guided_json"),
    ({"guided_regex": "[0-9]"}, StructuredOutputSpec("regex", "[0-9]"), "guided_regex"),
    ({"guided_choice": ["a"]}, StructuredOutputSpec("choice", ("a",)), "guided_choice"),
    ({"guided_grammar": 'start: "y"'}, StructuredOutputSpec("grammar", 'start: "y"'), "guided_grammar"),
])
def test_each_field_maps_onto_its_spec(fields: dict[str, Any], expected: StructuredOutputSpec | None,
                                       param: str | None) -> None:
    request = parse(**fields)
    assert structured_output_spec(request) == expected
    resolved = resolve_structured_output(request)
    assert (resolved.param if resolved is not None else None) == param


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    ({"guided_json": SCHEMA, "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_json": "{nope"}, "guided_json"),
    ({"guided_json": "[1, 2]"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", ""]}, "guided_choice"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"structured_outputs": {}}, "structured_outputs"),
])
def test_conflicts_and_malformed_values_are_request_errors(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        resolve_structured_output(parse(**fields))
    assert caught.value.param == param


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_object", "json_schema": {"name": "x"}}},
    {"response_format": {"type": "xml"}},
    {"structured_outputs": {"structural_tag": "{}"}},
])
def test_shapes_the_schema_refuses(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        parse(**fields)
