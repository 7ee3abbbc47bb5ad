"""Structured outputs: a `StructuredOutputSpec` enforced on the logits every step by an llguidance matcher.

- `StructuredOutputs` (one per model) builds the llguidance tokenizer from the model's Hugging Face tokenizer once,
  compiles specs on a small thread pool (never on the engine thread, when the API awaited `compile` first) and keeps
  the compiled matchers in a bounded LRU keyed by spec; each sequence gets a `deep_copy` of the cached one.
- Each step the sampler asks `fill_bitmask` for one bitmask row per constrained sequence (computed in llguidance's
  Rust threads, before the sampler waits on the device, so on a GPU it overlaps the forward) and `apply_bitmask`
  forbids the other tokens; the chosen token then advances the matcher (`GrammarMatcher.accept`).
- A matcher that is stopped (the grammar is complete and admits nothing more, or it produced its end token) ends
  the sequence with finish_reason "stop" (see `engine.stopping`).

Preemption recomputes a sequence's KV from its prompt and the tokens it already generated, which stay; its matcher
has consumed exactly those tokens, so it is kept as is. `rollback`/`reset` are there for schedulers that drop tokens.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import llguidance
import llguidance.hf
import torch

from vlmserve.errors import InvalidRequestError
from vlmserve.types import StructuredOutputSpec

#: JSON is generated compactly: no whitespace between tokens a model could loop on, as OpenAI's strict mode does
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
_executor_lock = threading.Lock()
_executor: llguidance.LLExecutor | None = None


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.num_accepted = 0

    @property
    def matcher(self) -> llguidance.LLMatcher:
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advance on a sampled token; False (and the matcher in its error state) if the grammar refuses it."""
        accepted = bool(self._matcher.consume_token(token_id))
        self.num_accepted += accepted
        return accepted

    @property
    def is_finished(self) -> bool:
        """The grammar admits no more text (it is complete, or it consumed its end token, or it failed)."""
        return bool(self._matcher.is_stopped())

    @property
    def is_error(self) -> bool:
        return bool(self._matcher.is_error())

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)
        self.num_accepted -= num_tokens

    def reset(self) -> None:
        self._matcher.reset()
        self.num_accepted = 0


def grammar_for(spec: StructuredOutputSpec) -> str:
    """The llguidance grammar (its JSON form) of a spec; raises InvalidRequestError for a malformed value."""
    kind, value = spec.kind, spec.value
    try:
        if kind == "json_schema":
            return str(llguidance.LLMatcher.grammar_from_json_schema(str(value), overrides=_JSON_OPTIONS))  # type: ignore[arg-type]
        if kind == "json_object":
            return str(llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}',
                                                                     overrides=_JSON_OPTIONS))  # type: ignore[arg-type]
    except ValueError as exc:
        raise InvalidRequestError("the JSON schema is not a JSON object", param="response_format") from exc
    if kind == "regex":
        return str(llguidance.LLMatcher.grammar_from_regex(str(value)))
    if kind == "choice":
        choices = value if isinstance(value, tuple) else ()
        if not choices:
            raise InvalidRequestError("a choice constraint needs at least one string", param="structured_outputs")
        return str(llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices)))
    if kind == "grammar":
        return str(llguidance.LLMatcher.grammar_from_lark(str(value)))
    raise InvalidRequestError(f"unknown structured output kind {kind!r}", param="response_format")


class StructuredOutputs:
    """Compiles and caches grammars for one model's tokenizer, and hands out per-sequence matchers."""

    def __init__(self, hf_tokenizer: Any, *, eos_token_ids: frozenset[int] = frozenset(), max_cached: int = 256,
                 num_workers: int = 2) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._eos = sorted(eos_token_ids)
        self._max_cached = max_cached
        self._cache: OrderedDict[StructuredOutputSpec, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="vlmserve-grammar")
        self.num_compiled = 0
        self.compile_seconds = 0.0

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                # NOTE: the first model token of `eos_token_ids` closes a finished grammar; all of them are
                # allowed there. Expensive (~1 s for a 150k vocabulary), so built once, lazily.
                eos = self._eos or None
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, eos_token=eos)
            return self._tokenizer

    def warm_up(self) -> None:
        """Build the llguidance tokenizer in the background now (seconds for a 150k vocabulary), so the first
        constrained request does not wait for it."""
        self._pool.submit(lambda: self.tokenizer)

    async def compile(self, spec: StructuredOutputSpec) -> None:
        """Compile `spec` off the event loop and the engine thread; raises InvalidRequestError if it cannot be."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self._compiled, spec)

    def matcher(self, spec: StructuredOutputSpec) -> GrammarMatcher:
        """A fresh matcher for one sequence (compiles here on a cache miss: callers should `compile` first)."""
        compiled = self._compiled(spec)
        return GrammarMatcher(compiled.deep_copy(), self.tokenizer.vocab_size)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compiled(self, spec: StructuredOutputSpec) -> llguidance.LLMatcher:
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                return cached
        grammar = grammar_for(spec)
        tokenizer = self.tokenizer
        start = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        elapsed = time.perf_counter() - start
        if matcher.is_error():
            raise InvalidRequestError(_refusal(spec, matcher.get_error()), param=_param(spec))
        with self._lock:
            self.num_compiled += 1
            self.compile_seconds += elapsed
            self._cache[spec] = matcher
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return matcher


def _param(spec: StructuredOutputSpec) -> str:
    return "response_format" if spec.kind in ("json_schema", "json_object") else "structured_outputs"


def _refusal(spec: StructuredOutputSpec, error: str) -> str:
    # llguidance's messages are about the grammar the client sent (no paths or addresses); keep them short.
    reason = error.strip().splitlines()[0][:300] if error.strip() else "unknown error"
    what = {"json_schema": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "choice",
            "grammar": "grammar"}[spec.kind]
    return f"the {what} cannot be enforced by this server's grammar engine (llguidance): {reason}"


def _shared_executor() -> llguidance.LLExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


def fill_bitmask(matchers: list[GrammarMatcher], vocab_size: int) -> torch.Tensor:
    """(rows, words) int32 CPU bitmask: bit t of row i set when matcher i allows token t next."""
    width = (matchers[0].vocab_size + 31) // 32
    bitmask = torch.full((len(matchers), width), -1, dtype=torch.int32)
    if len(matchers) == 1:
        row = bitmask[0]
        matchers[0].matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
    else:
        _shared_executor().unsafe_compute_mask_ptr([(m.matcher, i) for i, m in enumerate(matchers)],
                                                   bitmask.data_ptr(), width * 4, len(matchers))
    return bitmask


def accept_tokens(matchers: list[GrammarMatcher], token_ids: list[int]) -> None:
    """Advance each matcher on its sampled token (in llguidance's threads when there are several)."""
    if len(matchers) == 1:
        matchers[0].accept(token_ids[0])
        return
    accepted = _shared_executor().consume_token_par([(m.matcher, t) for m, t in zip(matchers, token_ids,
                                                                                      strict=True)])
    for matcher, ok in zip(matchers, accepted, strict=True):
        matcher.num_accepted += bool(ok)


_BITS: dict[torch.device, torch.Tensor] = {}


def _bits(device: torch.device) -> torch.Tensor:
    if device not in _BITS:
        _BITS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return _BITS[device]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf the logits of tokens the grammar forbids, in place, for the batch rows `rows`."""
    vocab = logits.shape[1]
    mask = bitmask.to(logits.device, non_blocking=True)
    allowed = ((mask.unsqueeze(-1) >> _bits(logits.device)) & 1).bool().flatten(1)  # (rows, words * 32)
    if allowed.shape[1] < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(len(rows), vocab - allowed.shape[1])], dim=1)
    at = torch.tensor(rows, device=logits.device)
    logits[at] = logits[at].masked_fill(~allowed[:, :vocab], float("-inf"))
