"""One choice's generated text → reasoning, content and tool calls, the same way streamed or not.

The text flows through the reasoning parser first (what is left is the answer), then through the tool-call
streamer. Both re-parse the text so far and hand on only the new part; a non-streamed response feeds the whole
text once with `final=True` and so gets exactly what the stream would have carried.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmserve.api.reasoning import REASONING_PARSERS, ThinkParser
from vlmserve.api.tool_parsers import make_parser
from vlmserve.api.tool_parsers.base import ToolCallParser
from vlmserve.api.tool_parsers.streaming import EmittedToolCall, ToolCallStreamer


@dataclass(frozen=True)
class OutputPlan:
    """How a request's output is read: which tool-call and reasoning parsers apply."""

    tools: list[dict[str, Any]] | None = None
    tool_parser: str | None = None
    max_calls: int | None = None
    is_legacy: bool = False
    reasoning_parser: str | None = None
    starts_in_reasoning: bool = False

    @property
    def is_plain(self) -> bool:
        return self.tool_parser is None and self.reasoning_parser is None

    def new_parser(self) -> OutputParser:
        reasoning = (REASONING_PARSERS[self.reasoning_parser](starts_in_reasoning=self.starts_in_reasoning)
                     if self.reasoning_parser else None)
        tools = make_parser(self.tool_parser, self.tools or []) if self.tool_parser else None
        return OutputParser(reasoning, tools, max_calls=self.max_calls)


@dataclass
class OutputDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[EmittedToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class OutputParser:
    """Per-choice incremental parser; without a reasoning or tool parser the text is passed through."""

    def __init__(self, reasoning: ThinkParser | None, tools: ToolCallParser | None, *,
                 max_calls: int | None = None) -> None:
        self._reasoning = reasoning
        self._tools = ToolCallStreamer(tools, max_calls=max_calls) if tools is not None else None
        self._text = ""
        self._num_reasoning_chars = 0
        self._num_answer_chars = 0

    @property
    def tool_calls(self) -> list[EmittedToolCall]:
        return self._tools.calls if self._tools is not None else []

    def feed(self, text: str, *, final: bool = False) -> OutputDelta:
        delta = OutputDelta()
        if self._reasoning is None:
            answer = text
        else:
            self._text += text
            split = self._reasoning.parse(self._text, final=final)
            delta.reasoning = split.reasoning[self._num_reasoning_chars:]
            self._num_reasoning_chars = max(self._num_reasoning_chars, len(split.reasoning))
            answer = split.content[self._num_answer_chars:]
            self._num_answer_chars = max(self._num_answer_chars, len(split.content))
        if self._tools is None:
            delta.content = answer
        else:
            tool_delta = self._tools.feed(answer, final=final)
            delta.content, delta.tool_calls = tool_delta.content, tool_delta.tool_calls
        return delta
