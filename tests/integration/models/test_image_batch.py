"""The vision tower over several prompts at once: the same features as one prompt at a time, in one call where the
inputs pack, and the paged engine uses it for the prompts that start their prefill in the same step."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.tiny.registry import FAMILIES
from tests.integration.engine.conftest import prompts_with_images, request, run_core
from vlmserve.config import EngineConfig, ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.models.base import ModelAdapter
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer

#: family -> whether its image inputs pack into one call (llava_next's carry per-image sizes: one call each)
CASES = {"qwen2_5_vl": True, "glm4v": True, "llava": True, "internvl": True, "llava_next": False}


def _load(family: str, root: Path) -> tuple[ModelAdapter, PromptRenderer]:
    adapter = load_model(ModelConfig(model=str(FAMILIES[family].build(root / family))))
    return adapter, PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                                   max_model_len=adapter.max_model_len)


def _count_tower_calls(adapter: Any) -> list[int]:
    calls: list[int] = []
    tower = adapter._base.get_image_features

    @functools.wraps(tower)  # the adapter matches inputs to the tower's signature
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return tower(*args, **kwargs)

    adapter._base.get_image_features = counted
    return calls


# InternVL's processor hands numpy a torch tensor (np.cumsum), which warns under numpy 2
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
@pytest.mark.parametrize("family", sorted(CASES))
def test_batch_equals_one_prompt_at_a_time(family: str, tmp_path: Path) -> None:
    adapter, renderer = _load(family, tmp_path)
    prompts = prompts_with_images(renderer, 3)  # different image sizes
    alone = [adapter.encode_images(p) for p in prompts]
    calls = _count_tower_calls(adapter)
    batched = adapter.encode_image_batch(prompts)
    assert len(calls) == (1 if CASES[family] else 3)
    assert [len(f) for f in batched] == [len(f) for f in alone] == [1, 1, 1]
    for got, want in zip(batched, alone, strict=True):
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_engine_runs_the_tower_once_for_prompts_starting_together(tmp_path: Path) -> None:
    adapter, renderer = _load("qwen2_5_vl", tmp_path)
    prompts = prompts_with_images(renderer, 4)
    calls = _count_tower_calls(adapter)
    core = PagedEngineCore(adapter, EngineConfig(max_num_batched_tokens=4096))
    run_core(core, [request(f"r{i}", p, max_tokens=2) for i, p in enumerate(prompts)])
    assert len(calls) == 1
    assert core.stats().image_cache_misses == 4
    # the same images again: all from the embedding cache, no tower call
    run_core(core, [request(f"again{i}", p, max_tokens=2) for i, p in enumerate(prompts)])
    assert len(calls) == 1
