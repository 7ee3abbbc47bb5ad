"""Hermes-style calls, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`: Qwen2/2.5/3-VL and the demo."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from vlmserve.api.tool_parsers.base import (
    ParsedToolCall,
    ParseResult,
    ToolCallParser,
    arguments_text,
    is_function_name,
    parse_tagged,
)
from vlmserve.api.tool_parsers.grammar import call_object_schema, grammar_of_calls, json_rule

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def parse_call_object(body: str, arguments_keys: tuple[str, ...] = ("arguments", "parameters")
                      ) -> ParsedToolCall | None:
    """`{"name": "f", "arguments": {...}}` (or "parameters"), or None when the body is anything else."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not is_function_name(obj["name"]):
        return None
    key = next((k for k in arguments_keys if k in obj), None)
    arguments = arguments_text(obj[key]) if key is not None else "{}"
    return None if arguments is None else ParsedToolCall(obj["name"], arguments)


class HermesParser(ToolCallParser):
    name = "hermes"
    families = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2", "qwen3", "qwen3_moe")

    def parse(self, text: str, *, final: bool) -> ParseResult:
        return parse_tagged(text, OPEN, CLOSE, parse_call_object, final=final)

    def grammar(self, functions: Sequence[dict[str, Any]], *, parallel: bool) -> str:
        return grammar_of_calls([json_rule(call_object_schema(f)) for f in functions], open_text=OPEN + "\n",
                                separator="\n", close_text="\n" + CLOSE, parallel=parallel)
