"""The paged engine on tiny random models of four families: equal to plain `generate`, whatever the batching."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.integration.engine.conftest import (
    ENGINE_FAMILIES,
    Loaded,
    engine_config,
    generate_alone,
    image,
    prompts_with_images,
    request,
    run_core,
    user_turn,
)
from vlmserve.config import ModelConfig
from vlmserve.engine.attention import AttentionBatch
from vlmserve.engine.core import PagedEngineCore
from vlmserve.models.base import ModelAdapter
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import ChatMessage, TextPart

MAX_TOKENS = 8


@pytest.fixture(scope="module", params=ENGINE_FAMILIES)
def family(request: pytest.FixtureRequest, loaded: Callable[[str], Loaded]) -> Loaded:
    return loaded(request.param)


@pytest.fixture(scope="module")
def expected(family: Loaded) -> tuple[list, list[list[int]]]:
    prompts = prompts_with_images(family.renderer, 8)
    return prompts, [generate_alone(family.reference, p, MAX_TOKENS) for p in prompts]


def test_family_runs_on_the_paged_engine(family: Loaded) -> None:
    assert family.adapter.paged_support() is None


def test_eight_concurrent_requests_equal_generate_alone(family: Loaded, expected: tuple) -> None:
    prompts, reference = expected
    assert len({p.num_tokens for p in prompts}) > 1  # prompt lengths differ
    core = PagedEngineCore(family.adapter, engine_config())
    got = run_core(core, [request(f"r{i}", p, max_tokens=MAX_TOKENS) for i, p in enumerate(prompts)])
    assert [got[f"r{i}"] for i in range(8)] == reference
    assert core.stats().num_kv_blocks_free == core.stats().num_kv_blocks_total  # everything returned


def test_chunked_prefill_and_no_prefix_cache_give_the_same_tokens(family: Loaded, expected: tuple) -> None:
    prompts, reference = expected
    core = PagedEngineCore(family.adapter, engine_config(max_num_batched_tokens=7, enable_prefix_caching=False))
    got = run_core(core, [request(f"r{i}", p, max_tokens=MAX_TOKENS) for i, p in enumerate(prompts)])
    assert [got[f"r{i}"] for i in range(8)] == reference
    assert core.stats().prefix_cache_hits == 0


class EagerDecodeGraphs:
    """Stands in for `DecodeGraphs` on the CPU: the same call, run eagerly; records the batch of each call."""

    max_batch = 64

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.batches: list[int] = []

    def run(self, embeds: torch.Tensor, positions: torch.Tensor, attention: AttentionBatch) -> torch.Tensor:
        self.batches.append(embeds.shape[0])
        position_ids = positions.unsqueeze(1) if self.adapter.num_position_rows > 1 else positions
        with attention.active():
            output = self.adapter.text_model(inputs_embeds=embeds.unsqueeze(0), position_ids=position_ids,
                                             use_cache=False)
        return self.adapter.compute_logits(output.last_hidden_state[0])


def test_decode_rows_split_from_prefill_rows_give_the_same_tokens(family: Loaded, expected: tuple) -> None:
    """With decode graphs, a step that mixes prefill chunks and decode tokens runs as two forwards (see
    `ModelRunner.execute`); the tokens must not change."""
    prompts, reference = expected
    core = PagedEngineCore(family.adapter, engine_config(max_num_batched_tokens=24))
    graphs = EagerDecodeGraphs(family.adapter)
    core.runner._graphs = graphs  # type: ignore[assignment]
    split_steps = []
    partition = core.runner._partition

    def recording_partition(chunks: list) -> tuple[list, list]:
        graphed, eager = partition(chunks)
        split_steps.append(bool(graphed) and bool(eager))
        return graphed, eager

    core.runner._partition = recording_partition  # type: ignore[method-assign]
    got = run_core(core, [request(f"r{i}", p, max_tokens=MAX_TOKENS) for i, p in enumerate(prompts)])
    assert [got[f"r{i}"] for i in range(8)] == reference
    assert any(split_steps), "no step mixed prefill and decode"
    assert max(graphs.batches) > 1


def test_preemption_keeps_outputs_identical(family: Loaded, expected: tuple) -> None:
    prompts, reference = expected
    longest = max(p.num_tokens for p in prompts) + MAX_TOKENS
    blocks = -(-longest // 4) + 4  # room for one sequence and a bit: eight must take turns
    core = PagedEngineCore(family.adapter, engine_config(num_kv_blocks=blocks, block_size=4))
    got = run_core(core, [request(f"r{i}", p, max_tokens=MAX_TOKENS) for i, p in enumerate(prompts)])
    assert core.stats().num_preemptions > 0
    assert [got[f"r{i}"] for i in range(8)] == reference


def test_multi_turn_with_the_same_image_hits_both_caches(family: Loaded) -> None:
    picture = image(3, (70, 70))
    first = [user_turn("What is this?", picture)]
    second = [*first, ChatMessage("assistant", (TextPart("A picture of a square."),)),
              ChatMessage("user", (TextPart("And what colour is it?"),))]
    prompts = [family.renderer.render(first), family.renderer.render(second)]
    outputs = {}
    for caching in (True, False):
        core = PagedEngineCore(family.adapter, engine_config(enable_prefix_caching=caching))
        outputs[caching] = [run_core(core, [request(f"t{i}", p)])[f"t{i}"] for i, p in enumerate(prompts)]
        stats = core.stats()
        if caching:
            image_end = max(span.end for span in prompts[1].image_spans)
            assert stats.prefix_cache_hits >= image_end // 16 * 16  # the image's blocks were reused
            assert stats.image_cache_hits >= 1  # the vision tower did not run again
        else:
            assert stats.prefix_cache_hits == 0
    assert outputs[True] == outputs[False]
    assert outputs[True][1] == generate_alone(family.reference, prompts[1], 8)


def test_same_text_different_image_never_shares_image_blocks(family: Loaded) -> None:
    text = "Same words for both."
    prompts = [family.renderer.render([user_turn(text, image(i, (70, 70)))]) for i in (1, 2)]
    core = PagedEngineCore(family.adapter, engine_config())
    got = [run_core(core, [request(f"d{i}", p)])[f"d{i}"] for i, p in enumerate(prompts)]
    assert got[1] == generate_alone(family.reference, prompts[1], 8)
    first_image_token = min(span.start for span in prompts[1].image_spans)
    assert core.stats().prefix_cache_hits <= first_image_token  # only blocks before the image were shared


def _paged_families() -> list[str]:
    from tests.fixtures.tiny.registry import FAMILIES
    from vlmserve.models.families import FAMILY_SPECS

    return sorted(name for name, f in FAMILIES.items() if f.paged_blocker is None and f.missing() is None
                  and name not in ENGINE_FAMILIES and name in FAMILY_SPECS)


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`hidden_state` is deprecated:FutureWarning")  # Mllama's own vision layers
@pytest.mark.parametrize("name", _paged_families())
def test_every_paged_family_equals_generate(name: str, tmp_path: Path) -> None:
    """Beyond the four families above: three concurrent requests, token for token equal to generate alone."""
    from tests.fixtures.tiny.registry import FAMILIES

    for package in FAMILIES[name].requires:
        pytest.importorskip(package)
    path = FAMILIES[name].build(tmp_path / name)
    adapter, reference = load_model(ModelConfig(model=str(path))), load_model(ModelConfig(model=str(path)))
    if adapter.paged_support() is not None:
        pytest.skip(f"{name} runs on the generate fallback: {adapter.paged_support()}")
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len)
    prompts = prompts_with_images(renderer, 3)
    core = PagedEngineCore(adapter, engine_config(max_num_batched_tokens=64))
    got = run_core(core, [request(f"f{i}", p, max_tokens=5) for i, p in enumerate(prompts)])
    assert [got[f"f{i}"] for i in range(3)] == [generate_alone(reference, p, 5) for p in prompts]
