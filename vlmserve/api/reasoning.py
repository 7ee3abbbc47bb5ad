"""Reasoning parsers: split a thinking model's `<think>…</think>` from its answer.

`reasoning_content` is what the model wrote inside the think block; `content` is the rest. Like the tool-call
parsers, `parse(text, final=False)` is prefix-stable (its reasoning and content only ever grow), so streaming can
re-parse and send only the new characters, and streamed output equals the non-streamed one.

Families: GLM-4.1V-Thinking / GLM-4.5V / GLM-4.6V (`glm4v`: think block, then the answer, which GLM-4.1V wraps
in `<answer>…</answer>`; the tags are dropped) and Qwen3-VL Thinking (`think`). When the rendered prompt already
ends inside a think block (templates that open `<think>` for the model), the output starts as reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmserve.api.tool_parsers.base import held_suffix_len

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class ReasoningSplit:
    reasoning: str = ""
    content: str = ""


class ThinkParser:
    """`<think>reasoning</think>answer`; an answer without a think block is all content."""

    name: ClassVar[str] = "think"
    families: ClassVar[tuple[str, ...]] = ("qwen3_vl", "qwen3_vl_moe")
    #: tags wrapping the answer, removed from the content
    answer_tags: ClassVar[tuple[str, str] | None] = None

    def __init__(self, *, starts_in_reasoning: bool = False) -> None:
        self.starts_in_reasoning = starts_in_reasoning

    def parse(self, text: str, *, final: bool) -> ReasoningSplit:
        body = text
        if not self.starts_in_reasoning:
            stripped = text.lstrip()
            if not final and THINK_OPEN.startswith(stripped):
                return ReasoningSplit()  # could still become "<think>"
            if not stripped.startswith(THINK_OPEN):
                return ReasoningSplit(content=self._answer(text, final=final))
            body = stripped[len(THINK_OPEN):]
        end = body.find(THINK_CLOSE)
        if end < 0:
            reasoning = body if final else body[:len(body) - held_suffix_len(body, (THINK_CLOSE,))]
            return ReasoningSplit(reasoning=reasoning.strip() if final else reasoning.lstrip().rstrip())
        answer = body[end + len(THINK_CLOSE):].lstrip()
        return ReasoningSplit(reasoning=body[:end].strip(), content=self._answer(answer, final=final))

    def _answer(self, text: str, *, final: bool) -> str:
        if self.answer_tags is None:
            return text
        open_tag, close_tag = self.answer_tags
        if not final and open_tag.startswith(text) and text:
            return ""
        text = text.removeprefix(open_tag)
        if final:
            return text.removesuffix(close_tag)
        if close_tag in text:
            return text[:text.find(close_tag)]
        return text[:len(text) - held_suffix_len(text, (close_tag,))]


class Glm4vThinkParser(ThinkParser):
    name = "glm4v"
    families = ("glm4v", "glm4v_moe", "glm46v")
    answer_tags = ("<answer>", "</answer>")


REASONING_PARSERS: dict[str, type[ThinkParser]] = {cls.name: cls for cls in (ThinkParser, Glm4vThinkParser)}
REASONING_CHOICES: tuple[str, ...] = ("auto", "none", *REASONING_PARSERS)


def reasoning_parser_name_for(model_type: str, override: str = "auto") -> str | None:
    if override == "none":
        return None
    if override != "auto":
        return override
    return next((name for name, cls in REASONING_PARSERS.items() if model_type in cls.families), None)


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves the model inside a think block (it ends with an unclosed `<think>`)."""
    return prompt_text.rstrip().endswith(THINK_OPEN)
