"""What every tool-call parser shares: the parsed call, the parse result, and the scan of tag-delimited calls.

A parser turns the model's raw text into `content` plus complete tool calls. `parse(text, final=False)` is called
on every prefix of the output while streaming and must be *prefix-stable*: its content is always a prefix of the
final content and its calls a prefix of the final calls. That is what lets one streaming helper (see
`streaming.py`) re-parse the text so far and emit only what is new, with streamed == non-streamed by construction.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class ParsedToolCall:
    """One complete call: the function's name and its arguments as a JSON object text."""

    name: str
    arguments: str


@dataclass
class ParseResult:
    """Content text (outside any call) and the complete calls, in order."""

    content: str = ""
    calls: list[ParsedToolCall] = field(default_factory=list)


def tool_functions(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `function` objects of OpenAI `tools` entries (name, description, parameters)."""
    return [tool["function"] for tool in tools if isinstance(tool.get("function"), dict)]


def held_suffix_len(text: str, tags: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `tags` (could become a tag)."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if tag.startswith(text[-k:]):
                best = k
                break
    return best


def arguments_text(value: Any) -> str | None:
    """A call's arguments as JSON object text, or None when they are not an object.

    Accepts an object or a string holding a JSON object (some models double-encode)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def is_function_name(name: str) -> bool:
    return bool(name) and not any(ch.isspace() for ch in name) and len(name) <= 256


class ToolCallParser:
    """Base class: one output format. Subclasses set `name`, `families` and implement `parse` and `grammar`."""

    #: the name `--tool-call-parser` takes
    name: ClassVar[str] = ""
    #: model_type values (config.json) whose models write this format
    families: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tools: Sequence[dict[str, Any]]) -> None:
        self.functions = tool_functions(tools)

    def parse(self, text: str, *, final: bool) -> ParseResult:
        raise NotImplementedError

    def grammar(self, functions: Sequence[dict[str, Any]], *, parallel: bool) -> str:
        """A Lark grammar (llguidance dialect) whose every sentence is one call (or, with `parallel`, one or
        more calls) of `functions` in this format, arguments valid against each function's parameters."""
        raise NotImplementedError

    def new_call_id(self) -> str:
        return f"call_{secrets.token_hex(12)}"


def alnum_id(length: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def parse_tagged(text: str, open_tag: str, close_tag: str, parse_body: Callable[[str], ParsedToolCall | None],
                 *, final: bool) -> ParseResult:
    """Calls written as `open_tag BODY close_tag`, with free text around them.

    A body that does not parse stays in the content, tags and all (never an error). While streaming, an open call
    and a tail that could still become `open_tag` are held back. At the end an unclosed call (the model stopped
    before its close tag) still counts when its body parses."""
    parts: list[str | None] = []  # None marks where a call stood
    calls: list[ParsedToolCall] = []
    pos = 0
    while True:
        start = text.find(open_tag, pos)
        if start < 0:
            tail = text[pos:]
            if not final:
                tail = tail[:len(tail) - held_suffix_len(tail, (open_tag,))]
            parts.append(tail)
            break
        parts.append(text[pos:start])
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            if final:
                call = parse_body(text[start + len(open_tag):])
                if call is None:
                    parts.append(text[start:])
                else:
                    calls.append(call)
            break
        call = parse_body(text[start + len(open_tag):end])
        if call is None:
            parts.append(text[start:end + len(close_tag)])
        else:
            calls.append(call)
        pos = end + len(close_tag)
        parts.append(None)
    return ParseResult(content=join_content(parts, has_calls=bool(calls), final=final), calls=calls)


def join_content(parts: list[str | None], *, has_calls: bool, final: bool) -> str:
    """Join the free-text pieces. Whitespace-only pieces after a call are dropped (the newline between two calls
    is not content); while streaming, trailing whitespace waits until we know whether a call follows it."""
    kept: list[str] = []
    after_call = False
    for part in parts:
        if part is None:
            after_call = True
            continue
        if after_call and not part.strip():
            continue
        kept.append(part)
    content = "".join(kept)
    if not final:
        content = content.rstrip()  # NOTE: prefix-stable because the final text keeps or drops it, never edits it
    elif has_calls and not content.strip():
        content = ""
    return content
