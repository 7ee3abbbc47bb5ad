"""Incremental detokenisation with stop strings, safe for streaming.

Decoding token by token breaks characters whose UTF-8 bytes span several tokens, and differs from decoding the
whole sequence where tokenizers merge spaces. So each step decodes a short window that starts at the tokens read
at the previous emission (`prefix_offset`) and emits only what the window adds beyond them, holding back output
that ends in U+FFFD (an incomplete character) until the character completes. Stop strings are searched in the text produced so far; the text
from the stop string on is never emitted, and while a stop string could still be completing, the tail that might
belong to it is held back.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text deltas."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # tokens up to here are reflected in `text`
        self.text = ""  # decoded so far (complete characters only)
        self._emitted = 0  # characters of `text` already returned to the caller
        self.stopped_by: str | None = None

    def add_tokens(self, token_ids: list[int]) -> str:
        """Append tokens; returns the new text that is safe to emit now."""
        for token in token_ids:
            if self.stopped_by is not None:
                break
            self._ids.append(token)
            self._advance()
        return self._take(final=False)

    def flush(self) -> str:
        """Everything still held back (call when the sequence finishes)."""
        return self._take(final=True)

    def token_text(self, token_id: int) -> str:
        return str(self._tokenizer.decode([token_id], skip_special_tokens=False))

    def _advance(self) -> None:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return  # an incomplete character, or nothing visible yet: wait for more tokens
        previous = len(self.text)
        self.text += full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._check_stop(previous)

    def _check_stop(self, previous_length: int) -> None:
        if not self._stop:
            return
        start = max(0, previous_length - self._hold)
        cut = -1
        for stop in self._stop:
            found = self.text.find(stop, start)
            if found != -1 and (cut == -1 or found < cut):
                cut, self.stopped_by = found, stop
        if cut != -1:
            self.text = self.text[:cut]

    def _take(self, *, final: bool) -> str:
        end = len(self.text)
        if not final and self.stopped_by is None and self._stop:
            end = max(self._emitted, end - self._hold)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return str(self._tokenizer.decode(ids, skip_special_tokens=self._skip_special))
