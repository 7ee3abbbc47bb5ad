"""OpenAI sampling fields → `SamplingParams`, for the routes that do not go through a chat request (completions).

NOTE: the chat service still builds its own (`ChatService._sampling`); both apply the same rules and the chat one
could move here once the branches editing it have landed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vlmserve.errors import InvalidRequestError
from vlmserve.types import SamplingParams


def token_logit_bias(logit_bias: Mapping[str, float] | None, vocab_size: int) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in (logit_bias or {}).items():
        if not key.isdigit():
            raise InvalidRequestError(f"logit_bias keys are token ids; {key!r} is not", param="logit_bias")
        bias[int(key)] = value
    if any(token >= vocab_size for token in bias):
        raise InvalidRequestError(f"token ids must be below the vocabulary size {vocab_size}", param="logit_bias")
    return bias


def build_sampling(*, vocab_size: int, max_tokens: int | None, temperature: float | None, top_p: float | None,
                   n: int, stop: str | Sequence[str] | None, seed: int | None, presence_penalty: float,
                   frequency_penalty: float, logit_bias: Mapping[str, float] | None, top_logprobs: int | None,
                   top_k: int | None, min_p: float | None, repetition_penalty: float | None, min_tokens: int,
                   ignore_eos: bool, stop_token_ids: Sequence[int] | None) -> SamplingParams:
    """`top_logprobs=None` means no logprobs; 0 means the chosen token's only. Defaults are OpenAI's."""
    if any(token >= vocab_size for token in stop_token_ids or ()):
        raise InvalidRequestError(f"token ids must be below the vocabulary size {vocab_size}",
                                  param="stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p, top_k=max(top_k or 0, 0), min_p=min_p or 0.0,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty or 1.0, logit_bias=token_logit_bias(logit_bias, vocab_size),
        seed=seed, stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        stop_token_ids=tuple(stop_token_ids or ()), min_tokens=min_tokens, ignore_eos=ignore_eos,
        logprobs=top_logprobs is not None, top_logprobs=top_logprobs or 0, n=n)
