"""Qwen-VL-Chat beyond seq_length (2048) on the paged engine: dynamic NTK per sequence, as the original.

A prompt longer than seq_length raises its rotary base by a factor chosen from its own length, kept for all its
tokens. The paged engine keeps that factor per sequence: a long and a short prompt decode in the same steps, each
with its own base, and both equal the port's `generate` (which applies the factor per request) within 1e-5; the
long prompt's first logits also equal the independent reference forward of the original (float64). A short prompt
sharing the long one's first blocks must not lend it its KV (rotated with another base): the factor scopes the
prefix cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.integration.engine.conftest import engine_config
from tests.integration.engine.test_paged_engine import EagerDecodeGraphs
from tests.unit.models.qwen_vl_chat.qwen_vl_chat_prompts import images, prepare
from tests.unit.models.qwen_vl_chat.qwen_vl_chat_reference import logits_reference
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.paged_check import reference_logprobs
from vlmserve.engine.protocol import CoreOutput
from vlmserve.types import GenerationRequest, PositionLogprobs, PreparedPrompt, SamplingParams

MAX_TOKENS = 6
TOLERANCE = 1e-5


@pytest.fixture
def long_adapter(qwen_vl_chat_dir: Path) -> Any:
    """A fresh copy of the tiny checkpoint for each test (the engine switches its decoder to paged attention, and
    the reference `generate` needs it unswitched), served with a 4096-token context (seq_length is 2048)."""
    from vlmserve.models.qwen_vl_chat.adapter import load

    return load(qwen_vl_chat_dir, device="cpu", dtype=torch.float32, max_model_len=4096)


def _prompt(adapter: Any, words: int) -> PreparedPrompt:
    content = [{"type": "image"}, {"type": "text", "text": "Compare the pictures. " + "shapes and colors " * words},
               {"type": "image"}]
    return prepare(adapter, content, images((255, 0, 0), (0, 0, 255)))


def _run(core: PagedEngineCore, prompts: dict[str, PreparedPrompt]) -> tuple[dict[str, list[PositionLogprobs]],
                                                                              dict[str, int]]:
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=True,
                              top_logprobs=3)
    got: dict[str, list[PositionLogprobs]] = {request_id: [] for request_id in prompts}
    cached: dict[str, int] = {}

    def emit(outputs: list[CoreOutput]) -> None:
        for output in outputs:
            assert output.error is None, output.error
            got[output.request_id] += [lp for lp in output.new_logprobs or [] if lp is not None]
            cached[output.request_id] = output.num_cached_tokens

    for request_id, prompt in prompts.items():
        core.add_request(GenerationRequest(request_id=request_id, prompt=prompt, sampling=sampling))
    while core.has_work():
        core.step(emit)
    return got, cached


def _largest_difference(got: list[PositionLogprobs], expected: tuple[list[int], torch.Tensor]) -> float:
    tokens, logprobs = expected
    assert [p.chosen.token_id for p in got] == tokens
    return max(abs(item.logprob - float(logprobs[i, item.token_id])) for i, p in enumerate(got)
               for item in (p.chosen, *p.top))


@pytest.mark.parametrize("decode_graphs", [False, True], ids=["eager", "graph-stand-in"])
def test_long_and_short_prompts_each_keep_their_own_rotary_base(long_adapter: Any,
                                                                qwen_vl_chat_state: dict[str, torch.Tensor],
                                                                decode_graphs: bool) -> None:
    adapter = long_adapter
    assert adapter.paged_support() is None
    long, short = _prompt(adapter, 700), _prompt(adapter, 20)
    seq_length = adapter.model.config.seq_length
    assert long.num_tokens > seq_length >= short.num_tokens
    assert short.token_ids[:64] == long.token_ids[:64]  # they share leading blocks of tokens
    alpha = adapter.embed_prompt(long, adapter.encode_images(long)).ntk_alpha
    assert alpha == 3.0 and adapter.ntk_alpha(short) == 1.0

    # the original's forward (float64, written from its formulas) on the long prompt: the first generated token
    config = {**adapter.model.config.to_dict(), "visual": adapter.model.config.visual}
    with torch.no_grad():
        original = logits_reference(qwen_vl_chat_state, config, long.token_ids,
                                    long.model_inputs["pixel_values"].double())[-1]
    expected = {"long": reference_logprobs(adapter, long, MAX_TOKENS), "short": reference_logprobs(adapter, short,
                                                                                                  MAX_TOKENS)}
    torch.testing.assert_close(expected["long"][1][0], original.float().log_softmax(-1), atol=1e-4, rtol=0)

    core = PagedEngineCore(adapter, engine_config(max_num_batched_tokens=512, block_size=16))
    if decode_graphs:
        # decode graphs take no per-row rotary factor: the long sequence's decode rows must stay eager, while the
        # short one's may replay (the CPU stand-in runs the graph's call eagerly, without decoder extras)
        graphs = EagerDecodeGraphs(adapter)
        core.runner._graphs = graphs  # type: ignore[assignment]
    first, _ = _run(core, {"short": short})  # its blocks are cached now: the long prompt must not use them
    got, cached = _run(core, {"long": long, "again": short})  # one prefilling while the other decodes
    assert cached["again"] > 0 and cached["long"] == 0
    errors = [_largest_difference(first["short"], expected["short"]), _largest_difference(got["again"],
              expected["short"]), _largest_difference(got["long"], expected["long"])]
    assert max(errors) <= TOLERANCE, errors
    if decode_graphs:
        assert graphs.batches, "no decode row replayed the graph stand-in"
