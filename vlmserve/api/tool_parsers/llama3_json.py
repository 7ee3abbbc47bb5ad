"""Llama 3.1+ JSON calls: the reply is `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`),
several separated by `;`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from vlmserve.api.tool_parsers.base import ParsedToolCall, ParseResult, ToolCallParser
from vlmserve.api.tool_parsers.grammar import call_object_schema, grammar_of_calls, json_rule
from vlmserve.api.tool_parsers.hermes import parse_call_object

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    families = ("mllama", "llama", "llama4")

    def parse(self, text: str, *, final: bool) -> ParseResult:
        body = text.lstrip()
        if not final:
            # A reply that starts like a call is held whole: only its end tells whether it was one.
            if not body or PYTHON_TAG.startswith(body) or body.startswith((PYTHON_TAG, "{")):
                return ParseResult()
            return ParseResult(content=text.rstrip())
        calls = _parse_calls(body.removeprefix(PYTHON_TAG))
        return ParseResult(calls=calls) if calls else ParseResult(content=text)

    def grammar(self, functions: Sequence[dict[str, Any]], *, parallel: bool) -> str:
        return grammar_of_calls([json_rule(call_object_schema(f, "parameters")) for f in functions],
                                open_text="", separator="; ", close_text="", parallel=parallel)


def _parse_calls(body: str) -> list[ParsedToolCall]:
    decoder = json.JSONDecoder()
    calls: list[ParsedToolCall] = []
    pos = 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return []
        call = parse_call_object(json.dumps(obj), ("parameters", "arguments"))
        if call is None:
            return []
        calls.append(call)
        pos = end
        while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
            pos += 1
    return calls
