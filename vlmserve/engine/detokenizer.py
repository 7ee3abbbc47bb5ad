"""Incremental detokenisation with stop strings, safe for streaming.

Decoding token by token breaks characters whose UTF-8 bytes span several tokens, and differs from decoding the
whole sequence where tokenizers merge spaces. So each step decodes a short window that starts at the tokens read
at the previous emission (`prefix_offset`) and emits only what the window adds beyond them, holding back output
that ends in U+FFFD (an incomplete character) until the character completes. Stop strings are searched in the text produced so far; the text
from the stop string on is never emitted, and while a stop string could still be completing, the tail that might
belong to it is held back.

Which special tokens the text keeps is the model's `TextPolicy` (grounding markup kept, control tokens dropped)
adjusted by the request's `skip_special_tokens`. A special token is one token, so a streamed tag is never split.
"""

from __future__ import annotations

from typing import Any

from vlmserve.engine.text_policy import TextPolicy


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text deltas.

    Without a `policy` every special token is skipped (the tokenizer's own `skip_special_tokens=True`).
    `spaces_between_special_tokens` puts one space between a kept special token and its neighbours' text.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), *, policy: TextPolicy | None = None,
                 skip_special_tokens: bool | None = None, spaces_between_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._policy = policy
        self._dropped = policy.dropped_ids(skip_special_tokens) if policy is not None else frozenset()
        self._spaced = spaces_between_special_tokens and policy is not None
        self._strip = policy is not None and policy.strip_whitespace
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
        start, end = self._emitted, len(self.text)
        if not final and self.stopped_by is None and self._stop:
            end = max(start, end - self._hold)
        if self._strip:
            start, end = self._trimmed(start, end)
        if end <= start:
            return ""
        self._emitted = end
        return self.text[start:end]

    def _trimmed(self, start: int, end: int) -> tuple[int, int]:
        """Leading whitespace is never emitted; trailing whitespace waits until more text follows it."""
        body = self.text.strip()
        if not body:
            return start, start
        lead = len(self.text) - len(self.text.lstrip())
        return max(start, lead), min(end, lead + len(body))

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._policy is None:
            return str(self._tokenizer.decode(ids, skip_special_tokens=True))
        kept = [token for token in ids if token not in self._dropped]
        if not self._spaced:
            return str(self._tokenizer.decode(kept, skip_special_tokens=False))
        return " ".join(piece for piece in self._pieces(kept) if piece)

    def _pieces(self, ids: list[int]) -> list[str]:
        """Runs of ordinary tokens and single special tokens, each decoded on its own."""
        special = self._policy.special_ids if self._policy is not None else frozenset()
        pieces: list[str] = []
        run: list[int] = []
        for token in ids:
            if token in special:
                pieces += [str(self._tokenizer.decode(run, skip_special_tokens=False)),
                           str(self._tokenizer.decode([token], skip_special_tokens=False))]
                run = []
            else:
                run.append(token)
        pieces.append(str(self._tokenizer.decode(run, skip_special_tokens=False)))
        return pieces
