"""One constraint from tool choice, response format and reasoning, checked in llguidance on the demo tokenizer."""

from __future__ import annotations

import json

from tests.unit.api.tool_parsers.test_grammars import accepts
from tests.unit.api.tool_parsers.test_parsers import TOOLS
from vlmserve.api.output_constraint import output_constraint
from vlmserve.api.tool_parsers import make_parser
from vlmserve.api.tool_parsers.base import tool_functions
from vlmserve.types import StructuredOutputSpec

CALLS = make_parser("hermes", TOOLS).grammar(tool_functions(TOOLS), parallel=True)
CALL = '<tool_call>\n{"name": "count_shapes", "arguments": {"color": "red"}}\n</tool_call>'
ANSWER_SCHEMA = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"]}
ANSWER = StructuredOutputSpec("json_schema", json.dumps(ANSWER_SCHEMA))


def grammar(**kwargs: object) -> str:
    defaults: dict[str, object] = {"call_grammar": CALLS, "is_forced": False, "structure": ANSWER,
                                   "reasoning": False, "starts_in_reasoning": False}
    spec = output_constraint(**{**defaults, **kwargs})  # type: ignore[arg-type]
    assert spec is not None and spec.kind == "grammar" and isinstance(spec.value, str)
    return spec.value


def test_auto_tools_with_a_response_format_allow_a_call_or_the_answer() -> None:
    union = grammar()
    assert accepts(union, CALL) and accepts(union, '{"count": 3}')
    assert not accepts(union, "three") and not accepts(union, '{"count": "three"}')


def test_forced_choice_is_a_call_whatever_the_response_format() -> None:
    forced = grammar(is_forced=True)
    assert accepts(forced, CALL) and not accepts(forced, '{"count": 3}')


def test_constraints_apply_after_the_think_block() -> None:
    after = grammar(reasoning=True)
    assert accepts(after, "<think>Count them.</think>\n" + CALL)
    assert accepts(after, '<think>Count them.</think>{"count": 3}') and accepts(after, '{"count": 3}')
    opened = grammar(reasoning=True, starts_in_reasoning=True, is_forced=True)
    assert accepts(opened, "Count them.\n</think>\n\n" + CALL) and not accepts(opened, CALL)


def test_nothing_to_enforce_and_plain_structure_pass_through() -> None:
    assert output_constraint(CALLS, is_forced=False, structure=None, reasoning=False,
                             starts_in_reasoning=False) is None
    assert output_constraint(None, is_forced=False, structure=ANSWER, reasoning=False,
                             starts_in_reasoning=False) == ANSWER
