"""The one streaming helper for every tool-call format: re-parse the text so far, emit only what is new.

Content is emitted as soon as the parser vouches for it (a tail that could begin a call tag is held back by the
parser). A call is emitted once it is complete — its closing tag seen, or the output ended — as the OpenAI pair
of deltas: first `index, id, type, function.name`, then `index, function.arguments`.

NOTE: arguments are sent whole rather than token by token. A call's text can still turn out malformed at its
closing tag (it then stays content); emitting only complete calls is what makes streamed output equal to the
non-streamed one in every case, malformed output included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vlmserve.api.tool_parsers.base import ToolCallParser

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmittedToolCall:
    index: int
    id: str
    name: str
    arguments: str


@dataclass
class ToolStreamDelta:
    content: str = ""
    tool_calls: list[EmittedToolCall] = field(default_factory=list)


class ToolCallStreamer:
    """Feeds one choice's text to its parser and returns the new content and newly complete calls."""

    def __init__(self, parser: ToolCallParser, *, max_calls: int | None = None) -> None:
        """`max_calls`: calls beyond this many are dropped (parallel_tool_calls: false)."""
        self._parser = parser
        self._max_calls = max_calls
        self._text = ""
        self._num_content_chars = 0
        self.calls: list[EmittedToolCall] = []

    def feed(self, text: str, *, final: bool = False) -> ToolStreamDelta:
        self._text += text
        result = self._parser.parse(self._text, final=final)
        delta = ToolStreamDelta()
        sent = self._num_content_chars
        if len(result.content) > sent and (final or result.content.strip()):
            delta.content = result.content[sent:]
            self._num_content_chars = len(result.content)
        for call in result.calls[len(self.calls):self._max_calls]:
            emitted = EmittedToolCall(len(self.calls), self._parser.new_call_id(), call.name, call.arguments)
            self.calls.append(emitted)
            delta.tool_calls.append(emitted)
        return delta
