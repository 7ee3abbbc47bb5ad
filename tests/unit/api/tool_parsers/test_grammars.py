"""The forced-call grammars compile in llguidance, accept a call in their format (which their own parser reads
back) and refuse calls that break the tool's schema or name another function."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pytest

from tests.unit.api.tool_parsers.test_parsers import TOOLS, _tokenizer
from vlmserve.api.tool_parsers import make_parser
from vlmserve.api.tool_parsers.base import tool_functions

llguidance = pytest.importorskip("llguidance")


@lru_cache(maxsize=1)
def _ll_tokenizer() -> Any:
    import llguidance.hf

    return llguidance.hf.from_tokenizer(_tokenizer())


def accepts(grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(_ll_tokenizer(), llguidance.grammar_from("lark", grammar))
    assert not matcher.is_error(), matcher.get_error()
    for token in _tokenizer().encode(text):
        if not matcher.consume_token(token):
            return False
    return bool(matcher.is_accepting())


GOOD = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
    "glm45": "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>"
             "\n<arg_value>2</arg_value>\n</tool_call>",
    "glm4": 'get_weather\n{"city": "Paris", "days": 2}',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]',
}


@pytest.mark.parametrize("parser_name", sorted(GOOD))
def test_grammar_accepts_a_valid_call_that_its_parser_reads_back(parser_name: str) -> None:
    parser = make_parser(parser_name, TOOLS)
    grammar = parser.grammar(tool_functions(TOOLS), parallel=False)
    assert accepts(grammar, GOOD[parser_name])
    calls = parser.parse(GOOD[parser_name], final=True).calls
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris", "days": 2}')]


@pytest.mark.parametrize("parser_name", sorted(GOOD))
def test_grammar_refuses_schema_violations_and_unknown_functions(parser_name: str) -> None:
    parser = make_parser(parser_name, TOOLS)
    grammar = parser.grammar(tool_functions(TOOLS), parallel=False)
    bad_type = GOOD[parser_name].replace("2", '"two"', 1) if parser_name != "glm45" else GOOD[parser_name].replace(
        "<arg_value>2", "<arg_value>two")
    assert not accepts(grammar, bad_type)
    assert not accepts(grammar, GOOD[parser_name].replace("get_weather", "rm_rf"))
    assert not accepts(grammar, "I would rather not call a tool.")


def test_named_function_grammar_allows_only_that_function() -> None:
    parser = make_parser("hermes", TOOLS)
    grammar = parser.grammar(tool_functions(TOOLS)[1:], parallel=False)
    assert accepts(grammar, '<tool_call>\n{"name": "count_shapes", "arguments": {"color": "red"}}\n</tool_call>')
    assert not accepts(grammar, GOOD["hermes"])


def test_parallel_grammar_allows_several_calls_only_when_asked() -> None:
    parser = make_parser("hermes", TOOLS)
    two = GOOD["hermes"] + '\n<tool_call>\n{"name": "count_shapes", "arguments": {}}\n</tool_call>'
    assert accepts(parser.grammar(tool_functions(TOOLS), parallel=True), two)
    assert not accepts(parser.grammar(tool_functions(TOOLS), parallel=False), two)


def test_forced_json_has_no_free_whitespace_to_loop_on() -> None:
    grammar = make_parser("hermes", TOOLS).grammar(tool_functions(TOOLS), parallel=False)
    assert not accepts(grammar, GOOD["hermes"].replace('{"name"', '{\n\n"name"'))
    assert not accepts(grammar, GOOD["hermes"].replace('"city": ', '"city":'))


def test_undeclared_argument_keys_are_refused_unless_the_schema_allows_them() -> None:
    grammar = make_parser("hermes", TOOLS).grammar(tool_functions(TOOLS), parallel=False)
    extra = GOOD["hermes"].replace('"days": 2}', '"days": 2, "extra": 1}')
    assert not accepts(grammar, extra)
    open_tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "additionalProperties": True}}}]
    assert accepts(make_parser("hermes", open_tools).grammar(tool_functions(open_tools), parallel=False),
                   '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "x": 1}}\n</tool_call>')
