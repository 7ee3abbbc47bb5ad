"""Which special tokens reach the answer text.

Decoding with every special token skipped (what `tokenizer.decode(skip_special_tokens=True)` does) also drops the
grounding markup some families answer with — Qwen-VL's `<ref>…</ref><box>(x1,y1),(x2,y2)</box>`, Qwen2-VL's
`<|object_ref_start|>…<|box_start|>…<|box_end|>`, GLM-4.1V's `<|begin_of_box|>…<|end_of_box|>` — which turns a
detection answer into bare numbers. Those tokens are content; end-of-turn, padding and image placeholders are
control. By default the answer keeps content markup and drops control tokens; a request's `skip_special_tokens`
asks for every special token dropped (True) or kept (False).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: special tokens that carry an answer's meaning (grounding references, boxes, quads, points), by their text;
#: a family's tokenizer holds some of these, and only those it holds matter
CONTENT_MARKUP: frozenset[str] = frozenset({
    # Qwen-VL-Chat, InternVL
    "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
    # Qwen2-VL, Qwen2.5-VL, Qwen3-VL
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
    "<|quad_end|>",
    # GLM-4.1V, GLM-4.5V, GLM-4.6V
    "<|begin_of_box|>", "<|end_of_box|>",
})


@dataclass(frozen=True)
class TextPolicy:
    """One model's split of its special tokens into content markup and control, and its answer trimming."""

    markup_ids: frozenset[int]
    control_ids: frozenset[int]
    #: trim whitespace around the whole answer, as the family's original `chat()` does (Qwen-VL-Chat)
    strip_whitespace: bool = False

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, *, strip_whitespace: bool = False) -> TextPolicy:
        special = _special_tokens(tokenizer)
        markup = frozenset(token_id for token_id, text in special.items() if text in CONTENT_MARKUP)
        return cls(markup_ids=markup, control_ids=frozenset(special) - markup, strip_whitespace=strip_whitespace)

    def dropped_ids(self, skip_special_tokens: bool | None) -> frozenset[int]:
        """Token ids left out of the text: control tokens by default, all specials (True), none (False)."""
        if skip_special_tokens is None:
            return self.control_ids
        return self.control_ids | self.markup_ids if skip_special_tokens else frozenset()

    @property
    def special_ids(self) -> frozenset[int]:
        return self.markup_ids | self.control_ids


def _special_tokens(tokenizer: Any) -> dict[int, str]:
    """Every id `decode(skip_special_tokens=True)` would drop, with its text."""
    found: dict[int, str] = {}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token_id, token in decoder.items():
        if getattr(token, "special", False):
            found[int(token_id)] = str(token.content)
    named: Iterable[int] = getattr(tokenizer, "all_special_ids", None) or ()
    for token_id in named:
        if token_id is not None and int(token_id) not in found:
            found[int(token_id)] = str(tokenizer.convert_ids_to_tokens(int(token_id)))
    return found
