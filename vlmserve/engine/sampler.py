"""Sampling a batch of logits, one token per running sequence, from the persistent per-slot `SamplingState`.

Order, as in transformers and vLLM: logit_bias → min_tokens (end tokens masked) → repetition, presence and
frequency penalties → grammar mask (structured outputs) → greedy argmax, or temperature → top-k → top-p → min-p →
draw. Logprobs are those of the model's raw distribution (log-softmax of the unprocessed logits, before bias,
penalties, grammar and temperature), which is what vLLM reports by default.

Seeded sequences draw their noise from their own `torch.Generator`, so a seed gives the same tokens whatever else
shares the batch; unseeded sequences share one generator and draw their noise in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from vlmserve.engine.sampling_state import MIN_P, TEMPERATURE, TOP_K, TOP_P, SamplingState
from vlmserve.types import PositionLogprobs, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from vlmserve.engine.detokenizer import IncrementalDetokenizer
    from vlmserve.engine.structured import GrammarMatcher


@dataclass(eq=False)
class SequenceSampling:
    """One sequence's sampling setup, made once when the sequence is created.

    `output_token_ids` is the sequence's own (growing) list. `slot` is the sequence's row in the sampler's
    `SamplingState` while it is in the running batch (None otherwise). `grammar` enforces a structured output.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    #: tokens that end the sequence; masked while fewer than `params.min_tokens` were generated
    end_token_ids: frozenset[int] = field(default_factory=frozenset)
    grammar: GrammarMatcher | None = None
    #: the sequence's own detokenizer when it has stop strings, so the core ends it at the match (engine.stopping)
    stop_strings: IncrementalDetokenizer | None = None
    slot: int | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class _BatchPlan:
    """What this step's rows ask for, read once from their parameters (host side, no device sync)."""

    sampled: list[int] = field(default_factory=list)
    grammar: list[int] = field(default_factory=list)
    min_tokens: list[int] = field(default_factory=list)
    logprobs: list[int] = field(default_factory=list)
    has_bias: bool = False
    has_penalties: bool = False
    has_repetition: bool = False
    has_top_k: bool = False
    has_top_p: bool = False
    has_min_p: bool = False

    @classmethod
    def of(cls, sequences: list[SequenceSampling]) -> _BatchPlan:
        plan = cls()
        for i, seq in enumerate(sequences):
            p = seq.params
            if p.temperature != 0.0:
                plan.sampled.append(i)
                plan.has_top_k |= p.top_k > 0
                plan.has_top_p |= p.top_p < 1.0
                plan.has_min_p |= p.min_p > 0.0
            if seq.grammar is not None:
                plan.grammar.append(i)
            if len(seq.output_token_ids) < p.min_tokens and seq.end_token_ids:
                plan.min_tokens.append(i)
            if p.logprobs:
                plan.logprobs.append(i)
            plan.has_bias |= bool(p.logit_bias)
            plan.has_penalties |= p.needs_penalties
            plan.has_repetition |= p.repetition_penalty != 1.0
        return plan


class Sampler:
    """Turns (batch, vocab) logits into one token per sequence; rows keep their slot across steps."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._shared = torch.Generator(device=device)
        self._shared.seed()
        self.state: SamplingState | None = None

    def release(self, sequence: SequenceSampling) -> None:
        """The sequence left the running batch (finished, aborted, preempted)."""
        if self.state is not None:
            self.state.release(sequence)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, sequences: list[SequenceSampling]) -> SamplerOutput:
        plan = _BatchPlan.of(sequences)
        bitmask = None
        if plan.grammar:
            from vlmserve.engine.structured import fill_bitmask

            # First, before anything waits on the device: on a GPU the forward is still running while the
            # grammar masks are computed here on the CPU.
            bitmask = fill_bitmask([sequences[i].grammar for i in plan.grammar], logits.shape[1])  # type: ignore[misc]
        state = self._state(logits.shape[1])
        slot_list = state.slots_for(sequences)
        slots = torch.tensor(slot_list, device=self.device)
        work = logits.float()
        raw = work.log_softmax(dim=-1) if plan.logprobs else None
        if work is logits and (plan.has_bias or plan.min_tokens or plan.grammar):
            work = work.clone()  # the steps below write in place; the caller's logits stay as they were
        logits = self._process(work, plan, state, slots, slot_list)
        if bitmask is not None:
            from vlmserve.engine.structured import apply_bitmask

            apply_bitmask(logits, bitmask, plan.grammar)
        tokens = self._choose(logits, sequences, plan, state, slots)
        state.record(slots, tokens)
        token_list = tokens.tolist()
        if plan.grammar:
            from vlmserve.engine.structured import accept_tokens

            accept_tokens([sequences[i].grammar for i in plan.grammar],  # type: ignore[misc]
                          [token_list[i] for i in plan.grammar])
        return SamplerOutput(token_ids=token_list, logprobs=_logprobs(raw, tokens, token_list, sequences, plan))

    def _state(self, vocab_size: int) -> SamplingState:
        if self.state is None or self.state.vocab_size != vocab_size:
            self.state = SamplingState(self.device, vocab_size)
        return self.state

    @staticmethod
    def _process(logits: torch.Tensor, plan: _BatchPlan, state: SamplingState, slots: torch.Tensor,
                 slot_list: list[int]) -> torch.Tensor:
        if plan.has_bias:
            state.apply_bias(logits, slots)
        if plan.min_tokens:
            state.mask_end_tokens(logits, plan.min_tokens, [slot_list[i] for i in plan.min_tokens])
        if plan.has_penalties:
            logits = state.apply_penalties(logits, slots, repetition=plan.has_repetition)
        return logits

    def _choose(self, logits: torch.Tensor, sequences: list[SequenceSampling], plan: _BatchPlan,
                state: SamplingState, slots: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        if not plan.sampled:
            return tokens
        everyone = len(plan.sampled) == len(sequences)
        rows = None if everyone else torch.tensor(plan.sampled, device=self.device)
        sub_logits = logits if rows is None else logits[rows]
        scalars = state.scalars[slots if rows is None else slots[rows]]
        probs = _filtered_probs(sub_logits, scalars, plan)
        # Exponential race (Gumbel-max in disguise): argmax(p / E) with E ~ Exp(1) draws from p, and lets each
        # seeded row draw its noise from its own generator.
        noise = self._noise(probs, [sequences[i].generator for i in plan.sampled])
        drawn = (probs / noise).argmax(dim=-1)
        if rows is None:
            return drawn
        tokens[rows] = drawn
        return tokens

    def _noise(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        unseeded = [j for j, g in enumerate(generators) if g is None]
        if len(unseeded) == len(generators):
            return noise.exponential_(generator=self._shared)
        if unseeded:
            shared = torch.empty(len(unseeded), probs.shape[1], device=probs.device, dtype=probs.dtype)
            noise[torch.tensor(unseeded, device=probs.device)] = shared.exponential_(generator=self._shared)
        for j, generator in enumerate(generators):
            if generator is not None:
                noise[j].exponential_(generator=generator)
        return noise


def _filtered_probs(logits: torch.Tensor, scalars: torch.Tensor, plan: _BatchPlan) -> torch.Tensor:
    logits = logits / scalars[:, TEMPERATURE:TEMPERATURE + 1]
    vocab = logits.shape[1]
    if plan.has_top_k:
        k = scalars[:, TOP_K].long()
        k = torch.where((k > 0) & (k < vocab), k, vocab)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if plan.has_top_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        drop_sorted = before >= scalars[:, TOP_P:TOP_P + 1]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if plan.has_min_p:
        threshold = probs.max(dim=-1, keepdim=True).values * scalars[:, MIN_P:MIN_P + 1]
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _logprobs(raw: torch.Tensor | None, tokens: torch.Tensor, token_list: list[int],
              sequences: list[SequenceSampling], plan: _BatchPlan) -> list[PositionLogprobs | None]:
    out: list[PositionLogprobs | None] = [None] * len(sequences)
    if raw is None:
        return out
    rows = torch.tensor(plan.logprobs, device=raw.device)
    wanted = raw[rows]
    chosen = wanted.gather(1, tokens[rows].unsqueeze(1)).squeeze(1).tolist()
    k = max(sequences[i].params.top_logprobs for i in plan.logprobs)
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if k:
        values, ids = wanted.topk(min(k, wanted.shape[1]), dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    for j, i in enumerate(plan.logprobs):
        n = sequences[i].params.top_logprobs
        top = tuple(TokenLogprob(t, v) for t, v in zip(top_ids[j][:n], top_values[j][:n], strict=True)) if n else ()
        out[i] = PositionLogprobs(chosen=TokenLogprob(token_list[i], chosen[j]), top=top)
    return out
