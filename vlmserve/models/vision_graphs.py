"""CUDA graphs of the Qwen2-VL / Qwen2.5-VL vision tower, one per exact set of image grids.

Eagerly, the 32-block Qwen2.5-VL tower over one 448x448 image launches ~800 small kernels and is launch-bound
(~29 ms on an H100 for ~2 ms of arithmetic). Its forward has host syncs only where it derives its metadata from
`image_grid_thw` (positions, segment bounds, window order), and transformers lets a caller pass that metadata in
precomputed. With it precomputed (and our attention's segment plans made during warm-up), the forward is a fixed
sequence of kernels per grid tuple, which a CUDA graph replays with one launch. A server sees few distinct grid
tuples (W1: k images of one size), so a small cache of graphs covers it; anything else runs eagerly.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from vlmserve.models import vision_attention

logger = logging.getLogger(__name__)

#: families whose tower forward takes all its grid-derived metadata as precomputed kwargs (checked in 5.17)
GRAPHABLE_VISION_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl"})


def precomputed_kwargs(visual: Any, grid_thw: torch.Tensor) -> dict[str, Any]:
    """Everything the tower derives from `grid_thw` with host syncs, computed now (transformers' own helpers)."""
    from transformers.utils.generic import get_max_seqlen
    from transformers.vision_utils import (
        get_vision_attention_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, visual.config)
    kwargs: dict[str, Any] = {"position_ids": get_vision_position_ids(grid_thw, visual.spatial_merge_size),
                              "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
    if getattr(visual, "window_size", None):  # Qwen2.5-VL's windowed layers
        window_index, cu_window_seqlens = get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size)
        kwargs.update(window_index=window_index, cu_window_seqlens=cu_window_seqlens,
                      max_window_seqlen=get_max_seqlen(cu_window_seqlens, visual.config))
    # transformers builds the window order on the CPU (eagerly, indexing copies it over); a graph cannot copy
    return {k: v.to(grid_thw.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def run_tower(visual: Any, pixel_values: torch.Tensor, grid_thw: torch.Tensor, kwargs: dict[str, Any]
              ) -> torch.Tensor:
    """The tower's merged features (image tokens, hidden) with precomputed metadata."""
    return visual(pixel_values, grid_thw=grid_thw, **kwargs).pooler_output


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    pixels: torch.Tensor  # static input
    features: torch.Tensor  # static output
    keep: tuple[Any, ...]  # metadata and segment plans the graph reads by address


class VisionGraphs:
    """Captured tower calls keyed by the tuple of image grids; at most `max_graphs` (least recently used go) and
    at most `max_patches` patches each."""

    def __init__(self, visual: Any, *, max_graphs: int = 12, max_patches: int = 8192) -> None:
        self._visual = visual
        self._max_graphs = max_graphs
        self._max_patches = max_patches
        self._graphs: OrderedDict[tuple[tuple[int, ...], ...], _Graph] = OrderedDict()
        self._pool: Any = None
        self.num_captures = 0

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """The tower's features through a graph, or None when this call is not graphed (run it eagerly)."""
        key = tuple(tuple(int(v) for v in row) for row in grid_thw.tolist())
        if pixel_values.shape[0] > self._max_patches:
            return None
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, pixel_values)
            self._graphs[key] = entry
            if len(self._graphs) > self._max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        entry.pixels.copy_(pixel_values)
        entry.graph.replay()
        return entry.features.clone()  # the next replay of any graph in the pool may overwrite it

    def _capture(self, key: tuple[tuple[int, ...], ...], example: torch.Tensor) -> _Graph:
        device = example.device
        grid = torch.tensor(key, device=device)
        kwargs = precomputed_kwargs(self._visual, grid)
        pixels = example.detach().clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: kernel choice, and our attention's segment plans
            for _ in range(2):
                run_tower(self._visual, pixels, grid, kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        plans = tuple(vision_attention.plan_for(t) for t in kwargs.values() if isinstance(t, torch.Tensor)
                      and t.dtype == torch.int32)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            features = run_tower(self._visual, pixels, grid, kwargs)
        self.num_captures += 1
        logger.debug("captured the vision tower for grids %s", key)
        return _Graph(graph=graph, pixels=pixels, features=features, keep=(grid, kwargs, plans))
