"""Mistral calls after `[TOOL_CALLS]`: a JSON list `[{"name", "arguments"}, …]` (tokenizer v3) or
`NAME[ARGS]{json}` repeated per call (v11+). Call ids are 9 letters and digits, as Mistral templates demand."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from vlmserve.api.tool_parsers.base import (
    ParsedToolCall,
    ParseResult,
    ToolCallParser,
    alnum_id,
    arguments_text,
    held_suffix_len,
    is_function_name,
)
from vlmserve.api.tool_parsers.grammar import call_object_schema, json_rule, literal
from vlmserve.api.tool_parsers.hermes import parse_call_object

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralParser(ToolCallParser):
    name = "mistral"
    families = ("mistral3", "mistral", "pixtral", "llava_mistral")

    def parse(self, text: str, *, final: bool) -> ParseResult:
        start = text.find(TOOL_CALLS)
        if start < 0:
            content = text if final else text[:len(text) - held_suffix_len(text, (TOOL_CALLS,))].rstrip()
            return ParseResult(content=content)
        before = text[:start]
        if not final:
            return ParseResult(content=before.rstrip())
        calls = _parse_region(text[start + len(TOOL_CALLS):])
        if not calls:
            return ParseResult(content=text)
        return ParseResult(content="" if not before.strip() else before, calls=calls)

    def new_call_id(self) -> str:
        return alnum_id(9)

    def grammar(self, functions: Sequence[dict[str, Any]], *, parallel: bool) -> str:
        items = {"anyOf": [call_object_schema(f) for f in functions]}
        schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
        if not parallel:
            schema["maxItems"] = 1
        # NOTE: [TOOL_CALLS] is written as text; llguidance forces its canonical tokenization, which for Mistral
        # tokenizers is the control token itself.
        return f"start: {literal(TOOL_CALLS)} {json_rule(schema)}\n"


def _parse_region(region: str) -> list[ParsedToolCall]:
    stripped = region.strip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError:
            return []
        if not isinstance(items, list):
            return []
        parsed = [parse_call_object(json.dumps(item)) for item in items]
        calls = [c for c in parsed if c is not None]
        return calls if len(calls) == len(parsed) else []
    calls = []
    for piece in region.split(TOOL_CALLS):
        name, sep, raw = piece.partition(ARGS)
        try:
            arguments = arguments_text(json.loads(raw)) if sep else None
        except json.JSONDecodeError:
            arguments = None
        if arguments is None or not is_function_name(name.strip()):
            return []
        calls.append(ParsedToolCall(name.strip(), arguments))
    return calls
