"""How many patches one vision-tower call may take, and what such a call costs in GPU memory.

Patch-packed towers (Qwen2-VL, Qwen2.5-VL, GLM-4.1V: `pixel_values` of shape (patches, features) with one
`image_grid_thw` row per image) encode each image independently of the others in the call, so a call can be cut
at any image boundary without changing any feature. The engine cuts its tower calls at a patch budget, and the
memory profile runs one call at that budget: the tower's activation memory is then measured, not guessed, and no
step (whatever the number and size of the images starting in it) needs more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: a call may hold at least this many patches (16 images of 448x448 for Qwen2.5-VL): fewer, larger calls are
#: what makes the tower fast on a GPU
MIN_PATCH_BUDGET = 16384


@dataclass(frozen=True)
class PatchGeometry:
    """What one patch row of `pixel_values` is, from the image processor's config."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    max_patches_per_image: int
    channels: int = 3

    @property
    def features(self) -> int:
        return self.channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def patch_budget(self) -> int:
        """Patches per tower call: the largest image the processor makes, and at least MIN_PATCH_BUDGET."""
        return max(self.max_patches_per_image, MIN_PATCH_BUDGET)


def patch_geometry(processor: Any) -> PatchGeometry | None:
    """The geometry of a patch-packed image processor (one with `merge_size` and `temporal_patch_size`), or None."""
    image_processor = getattr(processor, "image_processor", None)
    patch = getattr(image_processor, "patch_size", None)
    temporal = getattr(image_processor, "temporal_patch_size", None)
    merge = getattr(image_processor, "merge_size", None)
    size = getattr(image_processor, "size", None)
    max_pixels = getattr(image_processor, "max_pixels", None) or _get(size, "longest_edge")
    if not (isinstance(patch, int) and isinstance(temporal, int) and isinstance(merge, int)
            and isinstance(max_pixels, int) and min(patch, temporal, merge, max_pixels) > 0):
        return None
    return PatchGeometry(patch_size=patch, temporal_patch_size=temporal, merge_size=merge,
                         max_patches_per_image=max_pixels // patch ** 2)


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def split_by_patches(model_inputs: dict[str, Any], budget: int) -> list[dict[str, Any]]:
    """`pixel_values`/`image_grid_thw` cut at image boundaries into consecutive groups of at most `budget`
    patches (an image larger than the budget goes alone). Inputs without a grid come back whole."""
    grid = model_inputs.get("image_grid_thw")
    pixels = model_inputs.get("pixel_values")
    if not isinstance(grid, torch.Tensor) or not isinstance(pixels, torch.Tensor) or grid.dim() != 2:
        return [model_inputs]
    sizes = grid.prod(-1).tolist()
    if sum(sizes) != pixels.shape[0] or sum(sizes) <= budget:
        return [model_inputs]
    groups: list[list[int]] = [[]]
    used = 0
    for index, size in enumerate(sizes):
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += size
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    parts = []
    for group in groups:
        part = dict(model_inputs)
        part["pixel_values"] = pixels[starts[group[0]]: starts[group[-1] + 1]]
        part["image_grid_thw"] = grid[group[0]: group[-1] + 1]
        parts.append(part)
    return parts


def synthetic_inputs(geometry: PatchGeometry, num_patches: int, device: torch.device, dtype: torch.dtype
                     ) -> dict[str, torch.Tensor]:
    """Random pixels of one square-ish image of about `num_patches` patches (a legal grid: sides that are
    multiples of the merge size), for profiling a tower call at the budget."""
    merge = geometry.merge_size
    blocks = max(1, num_patches // merge ** 2)
    height = max(1, int(blocks ** 0.5))
    width = max(1, blocks // height)
    grid = torch.tensor([[1, height * merge, width * merge]], device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    pixels = torch.randn(int(grid.prod()), geometry.features, generator=generator, device=device, dtype=dtype)
    return {"pixel_values": pixels, "image_grid_thw": grid}


def split_video_groups(pixels: torch.Tensor, grid: torch.Tensor, budget: int | None) -> list[dict[str, Any]]:
    """Video tower inputs cut between temporal patch groups into calls of at most `budget` patches (a single
    group larger than the budget goes alone); one call when everything fits or there is no budget."""
    if budget is None or pixels.shape[0] <= budget:
        return [{"pixel_values_videos": pixels, "video_grid_thw": grid}]
    rows = [[1, int(h), int(w)] for t, h, w in grid.tolist() for _ in range(int(t))]
    calls: list[list[list[int]]] = [[]]
    used = 0
    for row in rows:
        size = row[1] * row[2]
        if calls[-1] and used + size > budget:
            calls.append([])
            used = 0
        calls[-1].append(row)
        used += size
    out, start = [], 0
    for call in calls:
        size = sum(h * w for _, h, w in call)
        out.append({"pixel_values_videos": pixels[start:start + size], "video_grid_thw": torch.tensor(call)})
        start += size
    return out
