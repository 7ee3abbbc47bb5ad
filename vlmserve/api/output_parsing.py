"""One choice's generated text → reasoning, content and tool calls, the same way streamed or not.

The text flows through the reasoning parser first (what is left is the answer), then through the tool-call
streamer. Both re-parse the text so far and hand on only the new part; a non-streamed response feeds the whole
text once with `final=True` and so gets exactly what the stream would have carried.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmserve.api.reasoning import ThinkParser
from vlmserve.api.tool_parsers.base import ToolCallParser
from vlmserve.api.tool_parsers.streaming import EmittedToolCall, ToolCallStreamer


@dataclass
class OutputDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[EmittedToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class OutputParser:
    """Per-choice incremental parser; without a reasoning or tool parser the text is passed through."""

    def __init__(self, reasoning: ThinkParser | None, tools: ToolCallParser | None) -> None:
        self._reasoning = reasoning
        self._tools = ToolCallStreamer(tools) if tools is not None else None
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
