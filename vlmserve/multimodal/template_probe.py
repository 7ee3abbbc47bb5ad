"""What a chat template can render, found by rendering small probe conversations.

Templates say nothing about their abilities, and reading their source for the word `tools` would be fooled by
comments or dead branches. Rendering a probe with a marker and looking for the marker in the output is exact.
Results are cached per template source.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from vlmserve.multimodal.template import TemplateError, render_chat_template

_TOOL_MARK = "vlmserve_probe_tool_7f3a"
_CALL_MARK = "vlmserve_probe_call_9c1e"
_RESULT_MARK = "vlmserve-probe-result-2b8d"
_USER = {"role": "user", "content": [{"type": "text", "text": "hi"}]}


def _render(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str | None:
    context: dict[str, Any] = {"messages": messages, "add_generation_prompt": True}
    if tools is not None:
        context["tools"] = tools
    try:
        return render_chat_template(template, context)
    except TemplateError:
        return None


def _tool_turns(tool_content: Any) -> list[dict[str, Any]]:
    call = {"id": "call_probe", "type": "function", "function": {"name": _CALL_MARK, "arguments": {"x": 1}}}
    return [_USER, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_probe", "content": tool_content}]


@lru_cache(maxsize=16)
def renders_tools(template: str) -> bool:
    """Whether `tools` reach the prompt (a tool's name shows up in it)."""
    tool = {"type": "function", "function": {"name": _TOOL_MARK, "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}
    text = _render(template, [_USER], [tool])
    return text is not None and _TOOL_MARK in text


@lru_cache(maxsize=16)
def renders_tool_turns(template: str) -> bool:
    """Whether an assistant turn's tool_calls and a tool turn's result both reach the prompt."""
    text = _render(template, _tool_turns(_RESULT_MARK))
    return text is not None and _CALL_MARK in text and _RESULT_MARK in text


@lru_cache(maxsize=16)
def holds_tool_images(template: str, image_marker: str) -> bool:
    """Whether an image inside a tool result becomes exactly one image placeholder in the prompt."""
    content = [{"type": "image"}, {"type": "text", "text": _RESULT_MARK}]
    text = _render(template, _tool_turns(content))
    return text is not None and _RESULT_MARK in text and text.count(image_marker) == 1
