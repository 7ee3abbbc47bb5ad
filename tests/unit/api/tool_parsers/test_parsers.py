"""Every parser's `auto` parsing on text in its real format, fed token by token through the streaming helper.

The property checked everywhere: the streamed deltas reassemble to exactly the non-streamed result (content and
calls), no partial tag text ever reaches the content, and malformed calls stay content instead of failing.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import pytest

from vlmserve.api.tool_parsers import PARSERS, make_parser, parser_name_for
from vlmserve.api.tool_parsers.streaming import ToolCallStreamer
from vlmserve.demo import WEIGHTS_DIR

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "count_shapes", "parameters": {
        "type": "object", "properties": {"color": {"type": "string"}}}}},
]


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(WEIGHTS_DIR)


def token_pieces(text: str) -> list[str]:
    """`text` cut where the demo's byte-level BPE cuts it (tags fall across several tokens)."""
    tokenizer = _tokenizer()
    return [tokenizer.decode([token]) for token in tokenizer.encode(text)]


def stream(parser_name: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[str]]:
    streamer = ToolCallStreamer(make_parser(parser_name, TOOLS))
    content, calls, ids = "", [], []
    for i, piece in enumerate([*pieces, ""]):
        delta = streamer.feed(piece, final=i == len(pieces))
        content += delta.content
        calls += [(c.name, c.arguments) for c in delta.tool_calls]
        ids += [c.id for c in delta.tool_calls]
    return content, calls, ids


def whole(parser_name: str, text: str) -> tuple[str, list[tuple[str, str]]]:
    result = make_parser(parser_name, TOOLS).parse(text, final=True)
    return result.content, [(c.name, c.arguments) for c in result.calls]


def check(parser_name: str, text: str, content: str, calls: list[tuple[str, dict[str, Any]]]) -> None:
    expected = (content, [(name, args) for name, args in calls])
    got_content, got_calls = whole(parser_name, text)
    assert (got_content, [(n, json.loads(a)) for n, a in got_calls]) == expected
    for pieces in (token_pieces(text), list(text)):
        streamed_content, streamed_calls, ids = stream(parser_name, pieces)
        assert (streamed_content, streamed_calls) == (got_content, got_calls)
        assert len(set(ids)) == len(ids)


CASES: dict[str, list[tuple[str, str, list[tuple[str, dict[str, Any]]]]]] = {
    "hermes": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
         [("get_weather", {"city": "Paris"})]),
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n'
         '</tool_call>\n<tool_call>\n{"name": "count_shapes", "arguments": {}}\n</tool_call>', "Let me check.\n",
         [("get_weather", {"city": "Oslo", "days": 2}), ("count_shapes", {})]),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call> done',
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call> done', []),
        ("a < b and <tool but no call", "a < b and <tool but no call", []),
        ('<tool_call>\n{"name": "count_shapes", "arguments": "{\\"color\\": \\"red\\"}"}', "",
         [("count_shapes", {"color": "red"})]),  # unclosed at the end, double-encoded arguments
    ],
    "glm45": [
        ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>"
         "\n<arg_value>3</arg_value>\n</tool_call>", "", [("get_weather", {"city": "Paris", "days": 3})]),
        ("Sure.<tool_call>count_shapes\n<arg_key>color</arg_key>\n<arg_value>42</arg_value>\n</tool_call>"
         "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>", "Sure.",
         [("count_shapes", {"color": "42"}), ("get_weather", {"city": "Rome"})]),
        ("<tool_call>get weather\n</tool_call>", "<tool_call>get weather\n</tool_call>", []),
    ],
    "glm4": [
        ('get_weather\n{"city": "Beijing"}', "", [("get_weather", {"city": "Beijing"})]),
        ("get_weather is a tool I could call.", "get_weather is a tool I could call.", []),
        ("get_weather\n{not json", "get_weather\n{not json", []),
        ("There are three shapes.", "There are three shapes.", []),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Lima"}}', "", [("get_weather", {"city": "Lima"})]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}; '
         '{"name": "count_shapes", "parameters": {"color": "blue"}}', "",
         [("get_weather", {"city": "Lima"}), ("count_shapes", {"color": "blue"})]),
        ('{"answer": 3}', '{"answer": 3}', []),
        ("Three shapes.", "Three shapes.", []),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Nice"}}]', "",
         [("get_weather", {"city": "Nice"})]),
        ('Checking. [TOOL_CALLS]get_weather[ARGS]{"city": "Nice"}[TOOL_CALLS]count_shapes[ARGS]{}', "Checking. ",
         [("get_weather", {"city": "Nice"}), ("count_shapes", {})]),
        ("[TOOL_CALLS][{broken", "[TOOL_CALLS][{broken", []),
        ("No tools [TOOL needed", "No tools [TOOL needed", []),
    ],
}


@pytest.mark.parametrize(("parser_name", "case"), [(p, i) for p, cases in CASES.items() for i in range(len(cases))])
def test_streamed_equals_whole_on_real_format_text(parser_name: str, case: int) -> None:
    text, content, calls = CASES[parser_name][case]
    check(parser_name, text, content, calls)


def test_every_parser_has_cases() -> None:
    assert set(CASES) == set(PARSERS)


def test_partial_tag_never_reaches_content() -> None:
    streamer = ToolCallStreamer(make_parser("hermes", TOOLS))
    seen = ""
    for piece in ["Hi", " <", "tool", "_c", "all>", '{"name": "count_shapes", "arguments": {}}', "</tool_call>"]:
        seen += streamer.feed(piece).content
        assert "<" not in seen
    assert seen == "Hi" and [c.name for c in streamer.calls] == ["count_shapes"]


def test_ids_are_unique_and_mistral_ids_fit_its_templates() -> None:
    ids = {make_parser("hermes", TOOLS).new_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("call_") for i in ids)
    mistral_id = make_parser("mistral", TOOLS).new_call_id()
    assert len(mistral_id) == 9 and mistral_id.isalnum()


@pytest.mark.parametrize(("model_type", "expected"), [
    ("qwen2_vl", "hermes"), ("qwen2_5_vl", "hermes"), ("qwen3_vl", "hermes"), ("glm4v_moe", "glm45"),
    ("glm46v", "glm45"), ("glm4v_9b", "glm4"), ("mistral3", "mistral"), ("mllama", "llama3_json"),
    ("idefics3", None)])
def test_registry_picks_by_family(model_type: str, expected: str | None) -> None:
    assert parser_name_for(model_type) == expected
    assert parser_name_for(model_type, "mistral") == "mistral"
    assert parser_name_for(model_type, "none") is None
