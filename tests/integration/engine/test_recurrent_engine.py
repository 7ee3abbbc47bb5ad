"""The paged engine on a hybrid decoder (tiny Qwen3.5: gated delta-net + full attention): each sequence's
recurrent state lives in a slot beside its KV blocks, and whatever the engine does to the sequence — batch it,
chunk its prompt, preempt it, retry a failed step — the tokens equal `generate`'s.

(The per-token logprob equivalence of the family is in tests/integration/models/test_paged_logprobs.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.tiny.registry import FAMILIES
from tests.integration.engine.conftest import engine_config, image, request, run_core, user_turn
from vlmserve.config import ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.paged_check import reference_logprobs
from vlmserve.models.base import ModelAdapter
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import PreparedPrompt

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return FAMILIES["qwen3_5"].build(tmp_path_factory.mktemp("qwen3_5"))


@pytest.fixture(scope="module")
def expected(checkpoint: Path) -> tuple[list[PreparedPrompt], list[list[int]]]:
    reference = load_model(ModelConfig(model=str(checkpoint)))
    renderer = PromptRenderer(reference.processor, image_token_id=reference.image_token_id,
                              max_model_len=reference.max_model_len)
    prompts = [renderer.render([user_turn("Describe this picture" + " please" * i + ".", image(i), image(i + 3))])
               for i in range(5)]
    # NOTE: greedy generate with end tokens neither stopping nor masked (conftest's generate_alone masks them, and
    # this tiny model picks <|im_end|> within 8 tokens of one prompt)
    return prompts, [reference_logprobs(reference, p, MAX_TOKENS)[0] for p in prompts]


@pytest.fixture()
def adapter(checkpoint: Path) -> ModelAdapter:
    return load_model(ModelConfig(model=str(checkpoint)))


def _requests(prompts: list[PreparedPrompt]) -> list[Any]:
    return [request(f"r{i}", p, max_tokens=MAX_TOKENS) for i, p in enumerate(prompts)]


def _assert_everything_returned(core: PagedEngineCore) -> None:
    stats = core.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    slots = core.kv.state_slots
    assert slots is not None and slots.num_free == slots.num_slots


def test_the_hybrid_decoder_keeps_kv_only_for_its_attention_layers(adapter: ModelAdapter) -> None:
    assert adapter.paged_support() is None
    layout, recurrent = adapter.kv_layout, adapter.recurrent_layout
    assert recurrent is not None and recurrent.layers == (0,)
    assert layout.attention_layers == (1,) and layout.num_kv_layers == 1
    core = PagedEngineCore(adapter, engine_config(num_kv_blocks=8))
    assert core.runner.cache.keys[0].numel() == 0 and core.runner.cache.keys[1].shape[0] == 8
    assert not core.kv.enable_prefix_caching


@pytest.mark.parametrize("config", [
    pytest.param({"max_num_batched_tokens": 13}, id="batched-chunked"),
    # two running sequences for five prompts: later prompts take slots that finished ones left with a state and a
    # token count; a fresh prefill must ignore both (not resume, not refuse)
    pytest.param({"max_num_seqs": 2}, id="reused-state-slots"),
])
def test_sequences_equal_generate(adapter: ModelAdapter, expected: tuple, config: dict[str, int]) -> None:
    prompts, reference = expected
    core = PagedEngineCore(adapter, engine_config(**config))
    got = run_core(core, _requests(prompts))
    assert [got[f"r{i}"] for i in range(len(prompts))] == reference
    _assert_everything_returned(core)


def test_preemption_under_a_tiny_kv_budget_recomputes_the_state(adapter: ModelAdapter, expected: tuple) -> None:
    prompts, reference = expected
    longest = max(p.num_tokens for p in prompts) + MAX_TOKENS
    blocks = -(-longest // 4) + 3  # room for one sequence and a bit: the others must take turns
    core = PagedEngineCore(adapter, engine_config(num_kv_blocks=blocks, block_size=4))
    got = run_core(core, _requests(prompts))
    assert core.stats().num_preemptions > 0
    assert [got[f"r{i}"] for i in range(len(prompts))] == reference
    _assert_everything_returned(core)


def test_a_failed_step_retried_one_by_one_applies_its_rows_once(adapter: ModelAdapter, expected: tuple,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The step fails after the recurrent layers ran (in the head); the engine retries each sequence alone. Had the
    failed step kept its states, the retry would start from states one step ahead."""
    prompts, reference = expected
    own_head = adapter.compute_logits
    calls: list[int] = []
    failures = []

    def failing_once(hidden: torch.Tensor) -> torch.Tensor:
        calls.append(hidden.shape[0])
        if len(calls) > 3 and hidden.shape[0] > 1 and not failures:  # a decode step, past every prompt
            failures.append(hidden.shape[0])
            raise RuntimeError("injected")
        return own_head(hidden)

    monkeypatch.setattr(adapter, "compute_logits", failing_once)
    core = PagedEngineCore(adapter, engine_config())
    got = run_core(core, _requests(prompts[:3]))
    assert failures
    assert [got[f"r{i}"] for i in range(3)] == reference[:3]
    _assert_everything_returned(core)
