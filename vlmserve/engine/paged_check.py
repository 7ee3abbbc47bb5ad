"""The paged engine's self-check at load: it must reproduce the model's own `generate` before it may serve.

A family's paged spec (`vlmserve.models.families`) is a claim about the model: its positions, its head, that its
decoder needs nothing beyond embeddings and positions. Here the claim is tested on the loaded model itself: a short
image prompt runs through a small paged engine (the real scheduler, model runner, paged attention and sampler) and
through `model.generate`; the logprobs of every generated position (the chosen token and the top alternatives)
must agree within a tolerance set by the model's dtype. On a mismatch, or if the paged engine fails on the prompt,
the caller serves the model with the generate engine instead and logs why.

Comparison is teacher-forced in effect: positions are compared up to and including the first one where the two
paths chose different tokens (possible under bf16 near-ties); after it their contexts differ.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from vlmserve.config import EngineConfig
from vlmserve.engine.protocol import CoreOutput
from vlmserve.models.base import ModelAdapter
from vlmserve.types import FinishReason, GenerationRequest, PositionLogprobs, PreparedPrompt, SamplingParams

logger = logging.getLogger(__name__)

#: per dtype (absolute, relative) tolerance on a logprob: |paged - generate| <= atol + rtol * |generate|.
#: NOTE: float32 is measured on the tiny families (errors ~1e-6, see tests/integration/models/
#: test_paged_logprobs.py); the 16-bit values are bounded from their resolution (a bf16 logit near 20 is rounded
#: to 1/16) and measured on CPU only, not on a GPU. A dropped head scale or wrong position rows move logprobs far
#: beyond either.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 0.0),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (1e-1, 5e-2),
}

#: generated positions compared; the first comes from the prefill, the rest from decode steps
NUM_CHECK_TOKENS = 3
#: alternatives compared at each position besides the chosen token
NUM_TOP_LOGPROBS = 8

_NO_TOKEN = 2**31 - 1


@dataclass(frozen=True)
class PagedCheckResult:
    """The outcome of the self-check; `reason` is None when the paged engine may serve the model."""

    reason: str | None
    max_error: float
    num_positions: int
    seconds: float


def check_paged_engine(adapter: ModelAdapter, prompt: PreparedPrompt, config: EngineConfig, *,
                       num_tokens: int = NUM_CHECK_TOKENS) -> PagedCheckResult:
    """Run `prompt` through a small paged engine and through `model.generate`, and compare their logprobs."""
    started = time.monotonic()
    expected_tokens, expected = reference_logprobs(adapter, prompt, num_tokens)  # before paged attention installs
    text_config: Any = adapter.text_model.config
    attention_before = getattr(text_config, "_attn_implementation", None)
    try:
        got = paged_logprobs(adapter, prompt, config, num_tokens=num_tokens, top_logprobs=NUM_TOP_LOGPROBS)
    except Exception as exc:  # any failure of the paged path on this model means: do not serve it paged
        logger.debug("paged self-check failed", exc_info=exc)
        return PagedCheckResult(f"the paged engine failed on the self-check prompt ({type(exc).__name__}: {exc})",
                                math.inf, 0, time.monotonic() - started)
    finally:
        # The engine switched the decoder to paged attention; the generate engine (or the real paged engine,
        # which installs it again) must find the model as it was loaded.
        text_config._attn_implementation = attention_before
        if adapter.device.type == "cuda":
            torch.cuda.empty_cache()
    atol, rtol = TOLERANCES.get(adapter.dtype, TOLERANCES[torch.bfloat16])
    error, compared, is_within = _compare(got, expected, expected_tokens, atol=atol, rtol=rtol)
    reason = None
    if not is_within:
        reason = (f"the paged engine's logprobs differ from model.generate's by up to {error:.3g} on the self-check "
                  f"prompt (tolerance {atol:g} + {rtol:g}·|logprob| for {str(adapter.dtype).removeprefix('torch.')})"
                  ": the family's paged spec does not match this model")
    return PagedCheckResult(reason, error, compared, time.monotonic() - started)


@torch.inference_mode()
def reference_logprobs(adapter: ModelAdapter, prompt: PreparedPrompt, num_tokens: int
                       ) -> tuple[list[int], torch.Tensor]:
    """Greedy `model.generate` of `num_tokens` tokens (end tokens neither stop nor are masked): (tokens, (num_tokens, vocab) raw
    log-softmax in float32), from the model's unprocessed logits."""
    from transformers import GenerationConfig

    inputs = adapter.collate([prompt])
    # NOTE: an end token no vocabulary reaches, rather than eos_token_id=None + min_new_tokens: generate fills a
    # None from the model's own generation config, and min_new_tokens then masks the real end tokens, so its
    # choices would differ from an engine that ignores (but does not mask) them.
    generation = GenerationConfig(max_new_tokens=num_tokens, do_sample=False, eos_token_id=_NO_TOKEN,
                                  pad_token_id=int(getattr(adapter, "pad_token_id", 0)),
                                  output_logits=True, return_dict_in_generate=True)
    output = adapter.model.generate(**inputs, generation_config=generation)
    tokens = output.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logits = torch.stack([step[0] for step in output.logits]).float()
    return tokens, logits.log_softmax(dim=-1).cpu()


def paged_logprobs(adapter: ModelAdapter, prompt: PreparedPrompt, config: EngineConfig, *, num_tokens: int,
                   top_logprobs: int) -> list[PositionLogprobs]:
    """Greedy generation of `prompt` alone on a fresh paged engine sized for it; one entry per generated token.

    The engine is the real one (scheduler, model runner, paged attention, sampler) without CUDA graphs and prefix
    cache; raises if the request fails in it."""
    from vlmserve.engine.core import PagedEngineCore

    blocks = -(-(prompt.num_tokens + num_tokens) // config.block_size) + 1
    small = dataclasses.replace(config, num_kv_blocks=blocks, enable_cuda_graphs=False, enable_prefix_caching=False,
                                max_num_seqs=1)
    core_logger = logging.getLogger(PagedEngineCore.__module__)
    level = core_logger.level
    core_logger.setLevel(logging.ERROR)  # its KV-size notes describe this throwaway engine, not the server's
    try:
        core = PagedEngineCore(adapter, small)
    finally:
        core_logger.setLevel(level)
    sampling = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True, logprobs=True,
                              top_logprobs=top_logprobs)
    core.add_request(GenerationRequest(request_id="paged-self-check", prompt=prompt, sampling=sampling))
    outputs: list[CoreOutput] = []
    while core.has_work():
        core.step(outputs.extend)
    if any(o.finish_reason is FinishReason.ERROR for o in outputs):
        raise RuntimeError(next(o.error for o in outputs if o.error) or "the request failed")
    return [lp for o in outputs for lp in (o.new_logprobs or []) if lp is not None]


def _compare(got: list[PositionLogprobs], expected: torch.Tensor, expected_tokens: list[int], *, atol: float,
             rtol: float) -> tuple[float, int, bool]:
    """(largest |logprob difference| over the compared positions' chosen and top tokens, positions compared,
    whether every entry is within atol + rtol * |expected|)."""
    if len(got) != len(expected_tokens):
        return math.inf, 0, False
    error, is_within = 0.0, True
    for index, position in enumerate(got):
        for item in (position.chosen, *position.top):
            reference = float(expected[index, item.token_id])
            difference = abs(item.logprob - reference)
            if not difference <= atol + rtol * abs(reference):  # NaN fails too
                is_within = False
            error = max(error, difference if not math.isnan(difference) else math.inf)
        if position.chosen.token_id != expected_tokens[index]:
            return error, index + 1, is_within  # the contexts differ from here on
    return error, len(got), is_within
