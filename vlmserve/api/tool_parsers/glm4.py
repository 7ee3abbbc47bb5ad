"""GLM-4 / GLM-4V-9B (legacy ChatGLM) calls: the whole reply is `NAME\n{json arguments}`.

The function name on the first line must be one of the offered tools (anything else is an ordinary answer).
Tool results go back to the model in the `observation` role (see `vlmserve.api.tool_messages`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from vlmserve.api.tool_parsers.base import ParsedToolCall, ParseResult, ToolCallParser, arguments_text
from vlmserve.api.tool_parsers.grammar import grammar_of_calls, json_rule, literal, parameters_schema


class Glm4Parser(ToolCallParser):
    name = "glm4"
    families = ("glm4v_9b", "chatglm")

    def parse(self, text: str, *, final: bool) -> ParseResult:
        names = [str(f.get("name", "")) for f in self.functions]
        first, newline, rest = text.lstrip("\n").partition("\n")
        if not final:
            # Hold everything while the first line is (or may still become) a tool name.
            if not newline and any(name.startswith(first) for name in names):
                return ParseResult()
            return ParseResult() if first.strip() in names else ParseResult(content=text.rstrip())
        if first.strip() in names:
            try:
                arguments = arguments_text(json.loads(rest)) if rest.strip() else "{}"
            except json.JSONDecodeError:
                arguments = None
            if arguments is not None:
                return ParseResult(calls=[ParsedToolCall(first.strip(), arguments)])
        return ParseResult(content=text)

    def grammar(self, functions: Sequence[dict[str, Any]], *, parallel: bool) -> str:
        # NOTE: the format has no way to write two calls in one reply; `parallel` cannot apply.
        return grammar_of_calls([f"{literal(f['name'] + chr(10))} {json_rule(parameters_schema(f))}"
                                 for f in functions], open_text="", separator="", close_text="", parallel=False)
