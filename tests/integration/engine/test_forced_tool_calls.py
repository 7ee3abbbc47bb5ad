"""Forced tool calls end to end inside the engine with tiny random-weight models: a random model never chooses
to call a tool, so every valid call below comes from the grammar. For each output format the forced text must
parse (with that format's own parser) into calls of the offered functions whose arguments meet their schemas.
Sampled at temperature 1 with seeds, so the grammar constrains rather than scripts."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from tests.integration.engine.conftest import Loaded, engine_config, prompts_with_images, request
from tests.integration.engine.test_structured_engine import run_all, text_of
from vlmserve.api.output_constraint import OWNED_GRAMMAR_PREFIX
from vlmserve.api.tool_parsers import PARSERS, make_parser
from vlmserve.api.tool_parsers.base import tool_functions
from vlmserve.engine.core import PagedEngineCore
from vlmserve.models.base import ModelAdapter
from vlmserve.types import FinishReason, StructuredOutputSpec

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "crop", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 99}, "label": {"type": "string", "maxLength": 5}},
        "required": ["x", "label"]}}},
    {"type": "function", "function": {"name": "set_color", "parameters": {"type": "object", "properties": {
        "color": {"enum": ["red", "green"]}, "strong": {"type": "boolean"}}, "required": ["color"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def own_adapter() -> Callable[[Loaded], ModelAdapter]:
    """A private copy of each family's adapter: the paged core switches a model's attention to the paged kernel,
    which must not leak into the session's shared adapters (the generate engine's tests use them)."""
    cache: dict[str, ModelAdapter] = {}

    def get(family: Loaded) -> ModelAdapter:
        key = str(family.path)
        if key not in cache:
            cache[key] = family.fresh_adapter()
        return cache[key]

    return get


def forced_calls(family: Loaded, adapter: ModelAdapter, parser_name: str, *, parallel: bool,
                 functions: list[dict[str, Any]], seeds: range) -> list[list[tuple[str, dict[str, Any]]]]:
    parser = make_parser(parser_name, TOOLS)
    spec = StructuredOutputSpec("grammar", OWNED_GRAMMAR_PREFIX + parser.grammar(functions, parallel=parallel))
    prompts = prompts_with_images(family.renderer, 2)
    requests = [request(f"r{seed}", prompts[seed % 2], structured=spec, ignore_eos=False, max_tokens=300,
                        temperature=1.0, seed=seed) for seed in seeds]
    outputs = run_all(PagedEngineCore(adapter, engine_config()), requests)
    results = []
    for request_id, outs in outputs.items():
        assert outs[-1].finish_reason is FinishReason.STOP, request_id  # the grammar ended the sequence
        parsed = parser.parse(text_of(family, outs), final=True)
        assert parsed.calls, (request_id, text_of(family, outs))
        results.append([(c.name, json.loads(c.arguments)) for c in parsed.calls])
    return results


@pytest.mark.parametrize(("family_name", "parser_name"), [
    *(("qwen2_vl", name) for name in PARSERS), ("glm4v", "glm45")])
def test_required_call_is_valid_in_every_format(loaded: Callable[[str], Loaded], own_adapter: Any,
                                                family_name: str, parser_name: str) -> None:
    parallel = parser_name != "glm4"  # GLM-4's format has one call per reply
    family = loaded(family_name)
    results = forced_calls(family, own_adapter(family), parser_name, parallel=parallel,
                           functions=tool_functions(TOOLS), seeds=range(3))
    for calls in results:
        for name, arguments in calls:
            jsonschema.validate(arguments, SCHEMAS[name])
        assert parallel or len(calls) == 1
    assert len({json.dumps(calls) for calls in results}) > 1


def test_named_call_uses_only_that_function(loaded: Callable[[str], Loaded], own_adapter: Any) -> None:
    family = loaded("qwen2_vl")
    results = forced_calls(family, own_adapter(family), "hermes", parallel=False, functions=tool_functions(TOOLS)[1:],
                           seeds=range(2))
    for calls in results:
        assert [name for name, _ in calls] == ["set_color"]
        jsonschema.validate(calls[0][1], SCHEMAS["set_color"])
