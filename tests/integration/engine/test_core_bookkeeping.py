"""The paged core's bookkeeping around a step: aborts of unknown requests, the finished/aborted counters, outputs
without logprobs, and the prompt's tensors dropped as soon as the prompt is computed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.engine.conftest import engine_config, image, request, user_turn
from vlmserve.config import ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.protocol import CoreOutput
from vlmserve.models.base import ModelAdapter
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import PreparedPrompt


@pytest.fixture(scope="module")
def adapter(tiny_qwen2_vl: Path) -> ModelAdapter:
    return load_model(ModelConfig(model=str(tiny_qwen2_vl)))


@pytest.fixture(scope="module")
def prompt(adapter: ModelAdapter) -> PreparedPrompt:
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len)
    return renderer.render([user_turn("Describe the picture.", image(0))])


def test_counters_aborts_and_outputs(adapter: ModelAdapter, prompt: PreparedPrompt) -> None:
    core = PagedEngineCore(adapter, engine_config())
    outputs: list[CoreOutput] = []
    core.abort_request("never-sent")  # e.g. a client gone after its request finished: ignored
    core.step(outputs.extend)
    for name in ("a", "b", "c", "d"):
        core.add_request(request(name, prompt, max_tokens=2 if name in "ab" else 50))
    core.step(outputs.extend)
    sequences = dict(core._sequences)
    assert set(sequences) == {"a", "b", "c", "d"}
    checked = set()
    for _ in range(10):  # the prompts take a few steps (96 tokens each)
        for name, sequence in sequences.items():  # dropped in the very step that computed the whole prompt
            if name in core._sequences and sequence.num_computed_tokens == sequence.num_prompt_tokens:
                assert sequence.prompt_embeds is None and sequence.prompt_positions is None
                checked.add(name)
        if checked == set(sequences):
            break
        core.step(outputs.extend)
    assert checked == set(sequences)
    core.abort_request("c")
    core.abort_request("d")
    while core.has_work():
        core.step(outputs.extend)
    stats = core.stats()
    assert (stats.num_finished, stats.num_aborted) == (2, 2)
    assert {o.request_id for o in outputs} == {"a", "b", "c", "d"}
    assert all(o.new_logprobs is None for o in outputs)  # none asked for logprobs
