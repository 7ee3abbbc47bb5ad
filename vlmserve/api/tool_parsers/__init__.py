"""Tool-call parsers, one per output format, and the registry that picks one by model family.

`parser_name_for(model_type, override)` resolves `--tool-call-parser` (a parser name, "auto" or "none");
`make_parser(name, tools)` builds the per-request parser.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmserve.api.tool_parsers.base import ParsedToolCall, ParseResult, ToolCallParser
from vlmserve.api.tool_parsers.glm4 import Glm4Parser
from vlmserve.api.tool_parsers.glm45 import Glm45Parser
from vlmserve.api.tool_parsers.hermes import HermesParser
from vlmserve.api.tool_parsers.llama3_json import Llama3JsonParser
from vlmserve.api.tool_parsers.mistral import MistralParser

PARSERS: dict[str, type[ToolCallParser]] = {
    cls.name: cls for cls in (HermesParser, Glm45Parser, Glm4Parser, Llama3JsonParser, MistralParser)}

#: the parser names `--tool-call-parser` accepts
PARSER_CHOICES: tuple[str, ...] = ("auto", "none", *PARSERS)


def parser_name_for(model_type: str, override: str = "auto") -> str | None:
    """The parser for a model family (`config.json` model_type), or `override` when it names one; None when no
    parser applies (tools are then refused with a 400 that names the flag)."""
    if override == "none":
        return None
    if override != "auto":
        return override
    for name, cls in PARSERS.items():
        if model_type in cls.families:
            return name
    return None


def make_parser(name: str, tools: Sequence[dict[str, Any]]) -> ToolCallParser:
    return PARSERS[name](tools)


__all__ = ["PARSERS", "PARSER_CHOICES", "ParseResult", "ParsedToolCall", "ToolCallParser", "make_parser",
           "parser_name_for"]
