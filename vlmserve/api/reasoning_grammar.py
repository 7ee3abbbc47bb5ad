"""Structured output for thinking models: the constraint applies to the answer after the think block.

The answer's constraint becomes one Lark grammar (llguidance's dialect) preceded by a free think block:
optional `<think>…</think>` when the model may choose to think, or free text up to `</think>` when the prompt
already opened the block.
"""

from __future__ import annotations

import json
import re

from vlmserve.api.tool_parsers.grammar import json_rule
from vlmserve.types import StructuredOutputSpec

_START = re.compile(r"^start(\s*):", re.MULTILINE)


def as_grammar(spec: StructuredOutputSpec) -> str | None:
    """The spec as a Lark grammar with a `start` rule; None for a user grammar (whose rules we do not rewrite)."""
    if spec.kind == "json_schema" and isinstance(spec.value, str):
        return f"start: {json_rule(json.loads(spec.value))}\n"
    if spec.kind == "json_object":
        return f"start: {json_rule({'type': 'object'})}\n"
    if spec.kind == "regex" and isinstance(spec.value, str):
        return "start: /" + spec.value.replace("/", "\\/") + "/\n"
    if spec.kind == "choice" and isinstance(spec.value, tuple):
        return "start: " + " | ".join(json.dumps(choice) for choice in spec.value) + "\n"
    return None


def after_reasoning(spec: StructuredOutputSpec, *, starts_in_reasoning: bool) -> StructuredOutputSpec:
    """`spec` applied after the reasoning block. A user-written grammar is returned unchanged.

    NOTE: a "grammar" spec cannot be composed without rewriting the user's rule names; it then constrains the
    output from its first token (the client may write the think block into its grammar)."""
    grammar = as_grammar(spec) if spec.kind != "grammar" else _owned_grammar(spec)
    if grammar is None:
        return spec
    answer = _START.sub(r"answer_start\1:", grammar)
    think = ('think[suffix="</think>"]: /(.|\\n)*/\nstart: think /[ \\t\\n]*/ answer_start\n'
             if starts_in_reasoning else
             'think[suffix="</think>"]: "<think>" /(.|\\n)*/\nstart: (think /[ \\t\\n]*/)? answer_start\n')
    return StructuredOutputSpec(kind="grammar", value=think + answer)


#: marks grammars this server generated (forced tool calls), which it may rewrite
OWNED_GRAMMAR_PREFIX = "// vlmserve: tool call\n"


def _owned_grammar(spec: StructuredOutputSpec) -> str | None:
    if isinstance(spec.value, str) and spec.value.startswith(OWNED_GRAMMAR_PREFIX):
        return spec.value
    return None
