"""The demo's chat template: byte-identical to Qwen2-VL's (what the demo was trained on) without tools, and
Hermes-style tools, tool calls and tool turns (images included) with them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vlmserve.demo import WEIGHTS_DIR
from vlmserve.demo.build import QWEN2_VL_CHAT_TEMPLATE
from vlmserve.demo.template import DEMO_CHAT_TEMPLATE
from vlmserve.multimodal.template import render_chat_template

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "How many shapes are there?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
     {"role": "user", "content": [{"type": "text", "text": "And now?"}, {"type": "image"}, {"type": "image"}]}],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_without_tools_renders_exactly_like_qwen2_vl(conversation: list[dict[str, Any]],
                                                     add_generation_prompt: bool) -> None:
    context = {"messages": conversation, "add_generation_prompt": add_generation_prompt}
    assert render_chat_template(DEMO_CHAT_TEMPLATE, context) == render_chat_template(QWEN2_VL_CHAT_TEMPLATE, context)


def test_shipped_weights_carry_the_template() -> None:
    assert (WEIGHTS_DIR / "chat_template.jinja").read_text() == DEMO_CHAT_TEMPLATE
    assert json.loads((WEIGHTS_DIR / "chat_template.json").read_text())["chat_template"] == DEMO_CHAT_TEMPLATE


def test_tools_calls_and_tool_turns() -> None:
    tools = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "zoom", "arguments": {"x": 1}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "image"}, {"type": "text", "text": "done"}]},
    ]
    text = render_chat_template(DEMO_CHAT_TEMPLATE, {"messages": messages, "tools": tools,
                                                     "add_generation_prompt": True})
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert '\n<tools>\n{"type": "function", "function": {"name": "zoom"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "zoom", "arguments": {"x": 1}}\n</tool_call><|im_end|>' in text
    assert ("<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>done\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n") in text
