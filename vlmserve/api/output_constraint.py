"""The one constraint a chat request's output gets, from its tool choice, its response format and reasoning.

- `tool_choice` required / named: the tool-call grammar (a call is due, whatever response_format says: the
  structured answer comes in a later turn, after the tool results).
- tools offered with `auto` and a response format: a call *or* the structured answer (openai-agents sends both).
- a thinking model: the constraint applies after the think block — optional `<think>…</think>` when the model may
  choose to think, free text up to `</think>` when the prompt already opened the block.
All compose into one Lark grammar (llguidance's dialect).
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
    answer = _START.sub(r"after_think\1:", grammar)
    think = ('think[suffix="</think>"]: /(.|\\n)*/\nstart: think /[ \\t\\n]*/ after_think\n'
             if starts_in_reasoning else
             'think[suffix="</think>"]: "<think>" /(.|\\n)*/\nstart: (think /[ \\t\\n]*/)? after_think\n')
    return StructuredOutputSpec(kind="grammar", value=think + answer)


#: marks grammars this server generated (tool calls), which it may rewrite
OWNED_GRAMMAR_PREFIX = "// vlmserve: tool call\n"


def output_constraint(call_grammar: str | None, *, is_forced: bool, structure: StructuredOutputSpec | None,
                      reasoning: bool, starts_in_reasoning: bool) -> StructuredOutputSpec | None:
    """The spec to enforce, or None for free output. `call_grammar`: the tool-call grammar when tools are offered
    (auto, required or named); `structure`: what response_format & co. asked for."""
    if call_grammar is not None and (is_forced or structure is not None):
        calls = OWNED_GRAMMAR_PREFIX + call_grammar
        spec: StructuredOutputSpec | None = StructuredOutputSpec("grammar", calls)
        if not is_forced:
            spec = _calls_or_answer(calls, structure) if structure is not None else None
            spec = spec or structure  # NOTE: a user-written grammar cannot be merged; it alone then applies
    else:
        spec = structure
    if spec is None or not reasoning:
        return spec
    return after_reasoning(spec, starts_in_reasoning=starts_in_reasoning)


def _calls_or_answer(calls: str, structure: StructuredOutputSpec) -> StructuredOutputSpec | None:
    answer = as_grammar(structure)
    if answer is None:
        return None
    merged = (_START.sub(r"calls_start\1:", calls) + _START.sub(r"answer_start\1:", answer)
              + "start: calls_start | answer_start\n")
    return StructuredOutputSpec("grammar", OWNED_GRAMMAR_PREFIX + merged)


def _owned_grammar(spec: StructuredOutputSpec) -> str | None:
    if isinstance(spec.value, str) and spec.value.startswith(OWNED_GRAMMAR_PREFIX):
        return spec.value
    return None
