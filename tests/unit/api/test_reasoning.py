"""Reasoning parsers on real thinking-model output, streamed piece by piece == parsed whole; composed with the
tool-call parser through `OutputParser`."""

from __future__ import annotations

import json

import pytest

from vlmserve.api.output_parsing import OutputParser
from vlmserve.api.reasoning import (
    Glm4vThinkParser,
    ThinkParser,
    prompt_opens_reasoning,
    reasoning_parser_name_for,
)
from vlmserve.api.tool_parsers import make_parser

TOOLS = [{"type": "function", "function": {"name": "zoom", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}}}}]


def run(parser: OutputParser, pieces: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
    reasoning = content = ""
    calls: list[tuple[str, str]] = []
    for i, piece in enumerate([*pieces, ""]):
        delta = parser.feed(piece, final=i == len(pieces))
        reasoning += delta.reasoning
        content += delta.content
        calls += [(c.name, c.arguments) for c in delta.tool_calls]
    return reasoning, content, calls


def both_ways(make: type[ThinkParser], text: str, *, starts: bool = False, tools: bool = False
              ) -> tuple[str, str, list[tuple[str, str]]]:
    def new() -> OutputParser:
        return OutputParser(make(starts_in_reasoning=starts), make_parser("hermes", TOOLS) if tools else None)

    whole = run(new(), [text])
    assert run(new(), list(text)) == whole
    assert run(new(), [text[i:i + 3] for i in range(0, len(text), 3)]) == whole
    return whole


def test_qwen3_think_block_is_split_from_the_answer() -> None:
    assert both_ways(ThinkParser, "<think>\nTwo red circles.\n</think>\n\nThere are two.") == (
        "Two red circles.", "There are two.", [])


def test_template_opened_think_block_starts_as_reasoning() -> None:
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert both_ways(ThinkParser, "Counting...\n</think>\n\nThree.", starts=True) == ("Counting...", "Three.", [])


def test_answer_without_think_block_is_content_and_unfinished_thinking_is_reasoning() -> None:
    assert both_ways(ThinkParser, "Plain answer <think> inside") == ("", "Plain answer <think> inside", [])
    assert both_ways(ThinkParser, "<think>still thinking when max_tokens hit") == (
        "still thinking when max_tokens hit", "", [])


def test_glm41v_answer_tags_are_dropped() -> None:
    text = "<think>The image shows a cat.</think><answer>A cat.</answer>"
    assert both_ways(Glm4vThinkParser, text) == ("The image shows a cat.", "A cat.", [])


def test_reasoning_then_tool_call() -> None:
    text = '<think>I should zoom.</think>\n<tool_call>\n{"name": "zoom", "arguments": {"x": 3}}\n</tool_call>'
    reasoning, content, calls = both_ways(ThinkParser, text, tools=True)
    assert (reasoning, content) == ("I should zoom.", "")
    assert [(n, json.loads(a)) for n, a in calls] == [("zoom", {"x": 3})]


@pytest.mark.parametrize(("model_type", "expected"), [
    ("qwen3_vl", "think"), ("glm4v", "glm4v"), ("glm46v", "glm4v"), ("qwen2_vl", None)])
def test_registry(model_type: str, expected: str | None) -> None:
    assert reasoning_parser_name_for(model_type) == expected
    assert reasoning_parser_name_for(model_type, "none") is None
