"""The vision tower with precomputed metadata (what its CUDA graphs capture): the same features, no host sync
inside the forward, and the graph cache's keying, eviction and output copies (a CPU stand-in for capture)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from PIL import Image

from tests.fixtures.tiny.registry import FAMILIES
from vlmserve.config import ModelConfig
from vlmserve.models import vision_graphs
from vlmserve.models.loader import load_model
from vlmserve.models.vision_attention import plan_for
from vlmserve.models.vision_graphs import (
    GRAPHABLE_VISION_FAMILIES,
    VisionGraphs,
    precomputed_kwargs,
    run_tower,
)


def _load(family: str, root: Path) -> Any:
    return load_model(ModelConfig(model=str(FAMILIES[family].build(root / family))))


def _inputs(adapter: Any, sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    images = [Image.effect_noise(size, 30 + i).convert("RGB") for i, size in enumerate(sizes)]
    return dict(adapter.processor.image_processor(images=images, return_tensors="pt"))


def _no_host_sync(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("host sync inside the tower forward")


@pytest.mark.parametrize("family", sorted(GRAPHABLE_VISION_FAMILIES))
def test_precomputed_metadata_gives_the_same_features_without_host_syncs(family: str, tmp_path: Path) -> None:
    adapter = _load(family, tmp_path)
    inputs = _inputs(adapter, [(224, 168), (112, 196)])
    visual, grid = adapter._base.visual, inputs["image_grid_thw"]
    with torch.inference_mode():
        want = adapter._image_features(inputs)
        kwargs = precomputed_kwargs(visual, grid)
        for cu in (v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dtype == torch.int32):
            plan_for(cu)  # what the graph's warm-up does
        with mock.patch.object(torch.Tensor, "tolist", _no_host_sync), \
                mock.patch.object(torch.Tensor, "item", _no_host_sync):
            got = run_tower(visual, inputs["pixel_values"], grid, kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: replay recomputes into the static output."""

    def __init__(self, replay: Any) -> None:
        self.replay = replay


def _eager_capture(self: VisionGraphs, key: Any, example: torch.Tensor) -> Any:
    grid = torch.tensor(key)
    kwargs = precomputed_kwargs(self._visual, grid)
    pixels = example.clone()
    features = run_tower(self._visual, pixels, grid, kwargs)
    self.num_captures += 1
    return vision_graphs._Graph(graph=_EagerGraph(lambda: features.copy_(run_tower(self._visual, pixels, grid, kwargs))),
                                pixels=pixels, features=features, keep=(grid, kwargs))


def test_graph_cache_keys_by_grids_evicts_the_oldest_and_returns_copies(tmp_path: Path) -> None:
    adapter = _load("qwen2_5_vl", tmp_path)
    first, second = _inputs(adapter, [(224, 168)]), _inputs(adapter, [(112, 196), (140, 140)])
    same_grid = _inputs(adapter, [(224, 168)])  # same size, other pixels
    graphs = VisionGraphs(adapter._base.visual, max_graphs=1, max_patches=10_000)
    with mock.patch.object(VisionGraphs, "_capture", _eager_capture), torch.inference_mode():
        out_first = graphs(first["pixel_values"], first["image_grid_thw"])
        out_again = graphs(same_grid["pixel_values"], same_grid["image_grid_thw"])
        assert graphs.num_captures == 1  # one grid tuple, one capture
        out_second = graphs(second["pixel_values"], second["image_grid_thw"])
        graphs(first["pixel_values"], first["image_grid_thw"])
        assert graphs.num_captures == 3  # max_graphs=1: the first grid was evicted
        assert graphs(first["pixel_values"][:1].expand(20_000, -1), torch.tensor([[1, 100, 200]])) is None
    for got, inputs in ((out_first, first), (out_again, same_grid), (out_second, second)):
        torch.testing.assert_close(got, adapter._image_features(inputs), rtol=1e-5, atol=1e-5)
