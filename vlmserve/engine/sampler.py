"""Per-request sampling over a batch of logits.

Order, as in transformers and vLLM: logit_bias → min_tokens (end tokens masked) → repetition, presence and
frequency penalties → greedy argmax, or temperature → top-k → top-p → min-p → draw. Logprobs are those of the
model's raw distribution (log-softmax of the unprocessed logits), which is what vLLM reports by default.

Seeded requests draw from their own `torch.Generator`, so a seed gives the same tokens whatever else shares the
batch; unseeded requests share one generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmserve.types import PositionLogprobs, SamplingParams, TokenLogprob


@dataclass
class SequenceSampling:
    """What the sampler needs to know about one sequence at one step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    #: tokens that end the sequence; masked while fewer than `params.min_tokens` were generated
    end_token_ids: frozenset[int] = field(default_factory=frozenset)


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


class Sampler:
    """Turns (batch, vocab) logits into one token per sequence."""

    def __init__(self, device: torch.device | str) -> None:
        self._shared = torch.Generator(device=device)
        self._shared.seed()

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, sequences: list[SequenceSampling]) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = _raw_logprobs(logits, sequences)
        logits = self._process(logits.clone(), sequences)
        tokens = self._choose(logits, sequences)
        token_list = tokens.tolist()
        logprobs = [_position_logprobs(raw_logprobs, i, token_list[i], seq.params)
                    if raw_logprobs is not None and seq.params.logprobs else None
                    for i, seq in enumerate(sequences)]
        return SamplerOutput(token_ids=token_list, logprobs=logprobs)

    def _process(self, logits: torch.Tensor, sequences: list[SequenceSampling]) -> torch.Tensor:
        for row, seq in enumerate(sequences):
            params = seq.params
            if params.logit_bias:
                ids = torch.tensor(list(params.logit_bias), device=logits.device)
                bias = torch.tensor(list(params.logit_bias.values()), device=logits.device)
                logits[row, ids] += bias
            if len(seq.output_token_ids) < params.min_tokens and seq.end_token_ids:
                logits[row, list(seq.end_token_ids)] = float("-inf")
            if params.needs_penalties:
                _apply_penalties(logits[row], seq)
        return logits

    def _choose(self, logits: torch.Tensor, sequences: list[SequenceSampling]) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, seq in enumerate(sequences) if not seq.params.is_greedy]
        if not sampled:
            return tokens
        rows = torch.tensor(sampled, device=logits.device)
        probs = _filtered_probs(logits[rows], [sequences[i].params for i in sampled])
        # Exponential race (Gumbel-max in disguise): argmax(p / E) with E ~ Exp(1) draws from p, and lets each
        # seeded row draw its noise from its own generator.
        noise = torch.empty_like(probs)
        for j, i in enumerate(sampled):
            noise[j].exponential_(generator=sequences[i].generator or self._shared)
        tokens[rows] = (probs / noise).argmax(dim=-1)
        return tokens


def _apply_penalties(row: torch.Tensor, seq: SequenceSampling) -> None:
    params = seq.params
    vocab = row.shape[0]
    outputs = torch.tensor(seq.output_token_ids, dtype=torch.long, device=row.device)
    if params.repetition_penalty != 1.0:
        seen = torch.cat([torch.tensor(seq.prompt_token_ids, dtype=torch.long, device=row.device), outputs])
        seen = seen[seen < vocab].unique()
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if outputs.numel() and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(outputs[outputs < vocab], minlength=vocab).to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    logits = logits / temperature
    top_k = [p.top_k for p in params]
    if any(k > 0 for k in top_k):
        vocab = logits.shape[1]
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=device)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    if bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        drop_sorted = before >= top_p.unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    if bool((min_p > 0).any()):
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _raw_logprobs(logits: torch.Tensor, sequences: list[SequenceSampling]) -> torch.Tensor | None:
    if not any(seq.params.logprobs for seq in sequences):
        return None
    return logits.log_softmax(dim=-1)


def _position_logprobs(logprobs: torch.Tensor, row: int, token_id: int, params: SamplingParams) -> PositionLogprobs:
    chosen = TokenLogprob(token_id, float(logprobs[row, token_id]))
    top: tuple[TokenLogprob, ...] = ()
    if params.top_logprobs:
        values, ids = logprobs[row].topk(params.top_logprobs)
        top = tuple(TokenLogprob(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return PositionLogprobs(chosen=chosen, top=top)
