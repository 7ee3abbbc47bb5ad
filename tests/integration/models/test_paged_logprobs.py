"""For every family on the paged allow-list: the paged engine's per-token logprobs equal the model's own.

Per family (tiny random weights, float32, CPU): multi-turn prompts with several images run concurrently through the
paged engine (chunked prefill mixed with decode, prefix cache on), greedy, 8 tokens each; at every generated
position the chosen token's logprob and the top alternatives must equal the log-softmax of
`model.generate(output_logits=True)` within 1e-5, and the tokens must be the same. Token equality alone misses
small position errors (a dropped M-RoPE delta keeps tiny models' tokens but moves their logprobs by ~1e-3).

A third prompt differs from the first only in its second image and runs after it on the same engine: reusing the
first prompt's KV for that image (a prefix-cache key that forgot an image) shows up as wrong logprobs. Hybrid
decoders (Qwen3.5) run without prefix caching; for them the third prompt checks that a freed recurrent-state slot
is reused from zeros.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.tiny.registry import FAMILIES
from tests.integration.engine.conftest import engine_config, image, user_turn
from vlmserve.config import EngineConfig, ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.paged_check import check_paged_engine, reference_logprobs
from vlmserve.engine.protocol import CoreOutput
from vlmserve.models.base import ModelAdapter
from vlmserve.models.families import FAMILY_SPECS
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.serve import self_check_prompt
from vlmserve.types import (
    ChatMessage,
    GenerationRequest,
    PositionLogprobs,
    PreparedPrompt,
    SamplingParams,
    TextPart,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`hidden_state` is deprecated:FutureWarning"),  # Mllama's own vision layers
]

MAX_TOKENS = 8
TOP_LOGPROBS = 5
TOLERANCE = 1e-5


def _native(module: str, function: str) -> Callable[[Path], Path]:
    return lambda out: Path(getattr(importlib.import_module(f"tests.fixtures.tiny.{module}"), function)(out))


def _cases() -> list[Any]:
    cases: list[Any] = []
    for name, family in sorted(FAMILIES.items()):
        if name not in FAMILY_SPECS:
            continue
        missing = family.missing()
        marks = [pytest.mark.skip(reason=missing)] if missing else []
        cases.append(pytest.param(name, lambda out, f=family: f.build(out), family.requires, id=name, marks=marks))
    cases.append(pytest.param("glm4v_9b", _native("glm4v_9b", "build_glm4v_9b"), (), id="glm4v_9b(native)"))
    cases.append(pytest.param("qwen_vl_chat", _native("qwen_vl_chat", "build_qwen_vl_chat"), (),
                              id="qwen_vl_chat(native)"))
    return cases


def _conversations(max_images: int | None) -> list[list[ChatMessage]]:
    """Three multi-turn conversations; the third differs from the first only in its second image. A model taking
    one image per conversation (GLM-4V-9B) gets one image each, the third then differing in its only image.
    Images are large enough for several merged patches in each direction (an M-RoPE delta of 0 would hide bugs)."""
    pictures = {i: image(i, size) for i, size in ((1, (112, 84)), (2, (84, 112)), (3, (98, 98)), (4, (112, 84)))}
    reply = ChatMessage("assistant", (TextPart("The first one is darker."),))
    if max_images == 1:
        return [[user_turn("What is this?", pictures[1]), reply, ChatMessage("user", (TextPart("Its colour?"),))],
                [user_turn("Describe it.", pictures[3]), reply, ChatMessage("user", (TextPart("Why?"),))],
                [user_turn("What is this?", pictures[4]), reply, ChatMessage("user", (TextPart("Its colour?"),))]]
    return [[user_turn("Compare these two.", pictures[1], pictures[2]), reply, user_turn("And this?", pictures[3])],
            [user_turn("Describe it.", pictures[3]), reply, user_turn("Is this the same?", pictures[1])],
            [user_turn("Compare these two.", pictures[1], pictures[4]), reply, user_turn("And this?", pictures[3])]]


def _raise_pixel_budget(adapter: ModelAdapter) -> None:
    """Let the tiny grid processors keep images of several merged patches each way: at their own budget a GLM-4.1V
    image merges to one row of patches, whose M-RoPE delta is 0, and a dropped delta would go unseen."""
    image_processor = adapter.processor.image_processor
    size = image_processor.size
    image_processor.size = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"] * 8}


def _run(core: PagedEngineCore, prompts: dict[str, PreparedPrompt]) -> dict[str, list[PositionLogprobs]]:
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=True,
                              top_logprobs=TOP_LOGPROBS)
    got: dict[str, list[PositionLogprobs]] = {request_id: [] for request_id in prompts}

    def emit(outputs: list[CoreOutput]) -> None:
        for output in outputs:
            assert output.error is None, output.error
            got[output.request_id] += [lp for lp in output.new_logprobs or [] if lp is not None]

    for request_id, prompt in prompts.items():
        core.add_request(GenerationRequest(request_id=request_id, prompt=prompt, sampling=sampling))
    while core.has_work():
        core.step(emit)
    return got


def _largest_difference(got: list[PositionLogprobs], tokens: list[int], expected: torch.Tensor) -> float:
    assert [p.chosen.token_id for p in got] == tokens
    error = 0.0
    for index, position in enumerate(got):
        reference_top = expected[index].topk(TOP_LOGPROBS)
        assert len(position.top) == TOP_LOGPROBS
        for item in (position.chosen, *position.top):
            error = max(error, abs(item.logprob - float(expected[index, item.token_id])))
        # The alternatives are the model's own top ones (compared as values: ids may swap on exact ties).
        assert torch.allclose(torch.tensor([t.logprob for t in position.top]), reference_top.values,
                              atol=TOLERANCE, rtol=0)
    return error


@pytest.mark.parametrize("name, build, requires", _cases())
def test_paged_logprobs_equal_generate(name: str, build: Callable[[Path], Path], requires: tuple[str, ...],
                                       tmp_path: Path) -> None:
    for package in requires:
        pytest.importorskip(package)
    adapter: ModelAdapter = load_model(ModelConfig(model=str(build(tmp_path / name))))
    assert adapter.paged_support() is None
    check = check_paged_engine(adapter, self_check_prompt(adapter), EngineConfig())
    assert check.reason is None and check.num_positions >= 1

    spec = FAMILY_SPECS.get(name)
    if spec is not None and spec.positions == "rope_index":
        _raise_pixel_budget(adapter)
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len, max_images_per_prompt=adapter.max_images_per_prompt)
    prompts = [renderer.render(c) for c in _conversations(adapter.max_images_per_prompt)]
    if spec is not None and spec.image_layout == "one_run":  # the spec's claim: one placeholder run per image
        assert len(prompts[0].image_spans) == len(prompts[0].image_hashes) >= 2
    expected = [reference_logprobs(adapter, p, MAX_TOKENS) for p in prompts]  # before the engine takes the decoder

    # a bidirectional block (PaliGemma: the whole prompt) is computed in one step: the budget must hold the longest
    longest_block = max((end - start for p in prompts for start, end in adapter.attention_blocks(p)), default=0)
    core = PagedEngineCore(adapter, engine_config(max_num_batched_tokens=max(48, longest_block)))
    got = _run(core, {"a": prompts[0], "b": prompts[1]})
    got |= _run(core, {"c": prompts[2]})  # after "a": only the blocks before its second image may be reused
    errors = [_largest_difference(got[r], *expected[i]) for i, r in enumerate("abc")]
    if spec is not None and spec.positions == "rope_index":
        assert adapter.embed_prompt(prompts[0], adapter.encode_images(prompts[0])).rope_delta < 0
    assert max(errors) <= TOLERANCE, f"{name}: largest logprob difference {max(errors):.3g}"
    if adapter.recurrent_layout is not None:
        assert core.stats().prefix_cache_queries == 0  # hybrid decoders run without prefix caching
    elif all(len(p.image_spans) == len(p.image_hashes) >= 2 and p.image_spans[1].start >= 16
             for p in (prompts[0], prompts[2])):
        assert core.stats().prefix_cache_hits > 0  # the third prompt did reuse the first one's leading blocks
