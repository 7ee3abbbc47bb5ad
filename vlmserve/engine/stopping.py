"""When a sequence ends, and why: one rule for both engine cores.

A sequence ends with "stop" when it samples one of its end tokens (EOS unless ignore_eos, and its
`stop_token_ids`; the sampler masks them until `min_tokens`), when its grammar is complete, or when its text
contains one of its stop strings; with "length" at `max_tokens` or when the context window is full.

Stop strings are matched here, in the core, by the sequence's own incremental detokenizer (only sequences that
have stop strings pay for it): the sequence then stops generating at once instead of running until the client's
abort arrives. The client's detokenizer, fed the same tokens, cuts the text at the same place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmserve.engine.detokenizer import IncrementalDetokenizer
from vlmserve.engine.sampler import SequenceSampling, make_generator
from vlmserve.engine.text_policy import TextPolicy
from vlmserve.types import FinishReason, GenerationRequest

if TYPE_CHECKING:
    import torch

    from vlmserve.engine.structured import StructuredOutputs


def make_sampling(request: GenerationRequest, *, eos_token_ids: frozenset[int], device: torch.device,
                  tokenizer: Any, text_policy: TextPolicy | None,
                  structured: StructuredOutputs | None) -> SequenceSampling:
    """A new sequence's sampling setup. Raises InvalidRequestError when its structured output cannot compile."""
    params = request.sampling
    end_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
    grammar = None
    if params.structured is not None:
        if structured is None:
            from vlmserve.errors import UnsupportedFeatureError

            raise UnsupportedFeatureError("structured outputs are not available on this engine",
                                          param="response_format")
        grammar = structured.matcher(params.structured)
    stop_strings = None
    if params.stop and tokenizer is not None:
        # the same text the client's detokenizer makes (same policy and options), so both see the same match
        stop_strings = IncrementalDetokenizer(tokenizer, params.stop, policy=text_policy,
                                              skip_special_tokens=params.skip_special_tokens,
                                              spaces_between_special_tokens=params.spaces_between_special_tokens)
    return SequenceSampling(params=params, prompt_token_ids=request.prompt.token_ids, output_token_ids=[],
                            generator=make_generator(params.seed, device), end_token_ids=end_ids,
                            grammar=grammar, stop_strings=stop_strings)


def finish_reason(sampling: SequenceSampling, token: int, *, num_tokens: int,
                  max_model_len: int) -> FinishReason | None:
    """Why the sequence ends after `token` (already appended to its output), or None if it goes on."""
    if token in sampling.end_token_ids:  # masked by the sampler until min_tokens is reached
        return FinishReason.STOP
    if sampling.grammar is not None and sampling.grammar.is_finished:
        return FinishReason.STOP
    if sampling.stop_strings is not None:
        sampling.stop_strings.add_tokens([token])
        if sampling.stop_strings.stopped_by is not None:
            return FinishReason.STOP
    if len(sampling.output_token_ids) >= int(sampling.params.max_tokens or 0):
        return FinishReason.LENGTH
    if num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None
