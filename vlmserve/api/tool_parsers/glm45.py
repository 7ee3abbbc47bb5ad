"""GLM-4.5/4.6(V) calls: `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>…</tool_call>`.

Values are raw text; a value whose parameter is declared `"type": "string"` (or is undeclared and not JSON) stays
a string, any other is read as JSON — the way the GLM templates write them back (`tojson` for non-strings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from vlmserve.api.tool_parsers.base import (
    ParsedToolCall,
    ParseResult,
    ToolCallParser,
    is_function_name,
    parse_tagged,
)
from vlmserve.api.tool_parsers.grammar import grammar_of_calls, json_rule, literal, parameters_schema

OPEN, CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


class Glm45Parser(ToolCallParser):
    name = "glm45"
    families = ("glm4v_moe", "glm46v", "glm4_moe", "glm4v")

    def parse(self, text: str, *, final: bool) -> ParseResult:
        return parse_tagged(text, OPEN, CLOSE, self._parse_body, final=final)

    def _parse_body(self, body: str) -> ParsedToolCall | None:
        head, sep, rest = body.partition(KEY_OPEN)
        name = head.strip()
        if not is_function_name(name):
            return None
        rest = sep + rest
        arguments: dict[str, Any] = {}
        pos = 0
        for match in _PAIR.finditer(rest):
            if rest[pos:match.start()].strip():
                return None  # stray text between pairs: not this format
            key = match.group(1).strip()
            arguments[key] = self._value(name, key, match.group(2))
            pos = match.end()
        if rest[pos:].strip():
            return None
        return ParsedToolCall(name, json.dumps(arguments, ensure_ascii=False))

    def _value(self, function_name: str, key: str, raw: str) -> Any:
        declared = self._property_type(function_name, key)
        if declared == "string":
            return raw
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw

    def _property_type(self, function_name: str, key: str) -> Any:
        for function in self.functions:
            if function.get("name") == function_name:
                prop = parameters_schema(function).get("properties", {}).get(key, {})
                return prop.get("type") if isinstance(prop, dict) else None
        return None

    def grammar(self, functions: Sequence[dict[str, Any]], *, parallel: bool) -> str:
        return grammar_of_calls([_call_rule(f) for f in functions], open_text=OPEN, separator="\n",
                                close_text=CLOSE, parallel=parallel)


def _call_rule(function: dict[str, Any]) -> str:
    """NAME, then each declared parameter in order (required ones always, optional ones maybe), then a newline.

    NOTE: string values are raw text without '<' (which would open a tag), within the schema's length limits or
    enum; other values JSON by their schema. Parameters come in schema order; undeclared ones are not allowed."""
    schema = parameters_schema(function)
    required = set(schema.get("required", []))
    pieces = [literal(function["name"])]
    for key, prop in (schema.get("properties") or {}).items():
        value = _value_rule(prop if isinstance(prop, dict) else {})
        pair = f'{literal(chr(10) + KEY_OPEN + key + KEY_CLOSE + chr(10) + VALUE_OPEN)} {value} {literal(VALUE_CLOSE)}'
        pieces.append(pair if key in required else f"({pair})?")
    pieces.append(literal("\n"))
    return " ".join(pieces)


def _value_rule(prop: dict[str, Any]) -> str:
    if prop.get("type") != "string":
        return json_rule(prop)
    if isinstance(prop.get("enum"), list) and all(isinstance(v, str) for v in prop["enum"]):
        return "(" + " | ".join(literal(v) for v in prop["enum"]) + ")"
    low, high = prop.get("minLength", 0), prop.get("maxLength")
    low = low if isinstance(low, int) and low >= 0 else 0
    if isinstance(high, int) and high >= low:
        return f"/[^<]{{{low},{high}}}/"
    return f"/[^<]{{{low},}}/"
