"""Bidirectional blocks on real (tiny) checkpoints: where they come from and what the engine does with a block
that cannot fit one step. Their effect on the numbers is shown by test_paged_logprobs.py (Gemma 3, PaliGemma)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.tiny.registry import FAMILIES
from tests.integration.engine.conftest import (
    engine_config,
    generate_alone,
    image,
    request,
    run_core,
    user_turn,
)
from vlmserve.config import ModelConfig
from vlmserve.engine.client import AsyncEngine
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.protocol import CoreOutput
from vlmserve.errors import ContextLengthError
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")


def _renderer(adapter: object) -> PromptRenderer:
    return PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,  # type: ignore[attr-defined]
                          max_model_len=adapter.max_model_len)  # type: ignore[attr-defined]


def test_gemma3_blocks_are_its_image_runs(tmp_path: Path) -> None:
    adapter = load_model(ModelConfig(model=str(FAMILIES["gemma3"].build(tmp_path / "gemma3"))))
    prompt = _renderer(adapter).render([user_turn("Compare.", image(1), image(2))])
    # the soft tokens of each image, without <start_of_image>/<end_of_image> (token type 0, as in transformers)
    assert adapter.attention_blocks(prompt) == tuple((s.start, s.end) for s in prompt.image_spans)
    assert len(prompt.image_spans) == 2 and not adapter.blocks_spare_window


def test_a_block_longer_than_the_step_budget_is_refused_and_the_engine_keeps_serving(tmp_path: Path) -> None:
    path = FAMILIES["paligemma"].build(tmp_path / "paligemma")
    adapter, reference = load_model(ModelConfig(model=str(path))), load_model(ModelConfig(model=str(path)))
    renderer = _renderer(adapter)
    long = renderer.render([user_turn("Describe this picture in every detail you can see.", image(1))])
    short = renderer.render([user_turn("Hi", image(2))])
    assert adapter.attention_blocks(long) == ((0, long.num_tokens),)  # PaliGemma: the whole prompt
    budget = short.num_tokens + 2
    assert long.num_tokens > budget
    core = PagedEngineCore(adapter, engine_config(max_num_batched_tokens=budget))
    # the client refuses it at the call (a 400 before any byte of a stream) ...
    client = AsyncEngine(core, adapter.tokenizer, max_model_len=core.max_model_len, max_sequences=4)
    with pytest.raises(ContextLengthError, match="--max-num-batched-tokens"):
        client.generate(request("long", long))
    # ... and the core refuses it too when handed one directly
    refused: list[CoreOutput] = []
    core.add_request(request("long", long))
    core.step(refused.extend)
    assert [o.request_id for o in refused] == ["long"] and refused[0].error is not None
    assert f"{long.num_tokens} tokens" in refused[0].error and "--max-num-batched-tokens" in refused[0].error
    assert run_core(core, [request("short", short)])["short"] == generate_alone(reference, short, 8)
