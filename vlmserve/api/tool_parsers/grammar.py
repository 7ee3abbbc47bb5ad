"""Pieces of Lark grammars (llguidance's dialect) that force tool calls: literals, embedded JSON schemas, and the
one-or-more repetition used for parallel calls."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def literal(text: str) -> str:
    """A Lark string literal matching `text` exactly (JSON string escapes are valid Lark escapes)."""
    return json.dumps(text, ensure_ascii=False)


#: JSON written as json.dumps writes it (the form chat templates show models); free whitespace inside forced
#: JSON lets a model loop on newlines
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_rule(schema: dict[str, Any]) -> str:
    """An inline JSON-schema-constrained value, written compactly."""
    return "%json " + json.dumps({**schema, "x-guidance": COMPACT_JSON}, ensure_ascii=False, sort_keys=False)


def parameters_schema(function: dict[str, Any]) -> dict[str, Any]:
    """A function's `parameters` with undeclared keys closed off, or any object when it declares none (OpenAI
    allows omitting them).

    NOTE: objects that list `properties` but say nothing of `additionalProperties` get `false`, as OpenAI's strict
    mode and xgrammar's default do; left open, a forced call lets a model invent keys without end."""
    parameters = function.get("parameters")
    return closed_objects(parameters) if isinstance(parameters, dict) and parameters else {"type": "object"}


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` in which every object with `properties` and no `additionalProperties` is closed."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_objects(value) if key not in ("const", "enum", "default", "examples") else value
              for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def call_object_schema(function: dict[str, Any], arguments_key: str = "arguments") -> dict[str, Any]:
    """`{"name": <this name>, "<arguments_key>": <its parameters>}` as one JSON schema."""
    return {"type": "object",
            "properties": {"name": {"const": function["name"]}, arguments_key: parameters_schema(function)},
            "required": ["name", arguments_key], "additionalProperties": False}


def grammar_of_calls(call_rules: Sequence[str], *, open_text: str, separator: str, close_text: str,
                     parallel: bool) -> str:
    """`start` = one call (or several, separated) where each call is one of `call_rules` between open/close."""
    lines = [f"start: call ({literal(separator)} call)*" if parallel else "start: call",
             f"call: {literal(open_text)} fn {literal(close_text)}" if open_text or close_text else "call: fn",
             "fn: " + " | ".join(f"fn_{i}" for i in range(len(call_rules)))]
    lines += [f"fn_{i}: {rule}" for i, rule in enumerate(call_rules)]
    return "\n".join(lines) + "\n"
