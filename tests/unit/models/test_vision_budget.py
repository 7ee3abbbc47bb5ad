"""Tower calls cut at a patch budget: the cut is at image boundaries and within the budget."""

from __future__ import annotations

import torch

from vlmserve.models.vision_budget import PatchGeometry, split_by_patches, synthetic_inputs


def _inputs(grids: list[list[int]]) -> dict[str, torch.Tensor]:
    grid = torch.tensor(grids)
    return {"pixel_values": torch.arange(int(grid.prod(-1).sum())).unsqueeze(1).float(), "image_grid_thw": grid}


def test_split_keeps_images_whole_and_within_the_budget() -> None:
    inputs = _inputs([[1, 4, 4], [1, 2, 4], [1, 8, 8], [1, 2, 2], [1, 2, 2]])  # 16, 8, 64, 4, 4 patches
    parts = split_by_patches(inputs, budget=24)
    assert [p["image_grid_thw"].tolist() for p in parts] == [[[1, 4, 4], [1, 2, 4]], [[1, 8, 8]], [[1, 2, 2], [1, 2, 2]]]
    assert [p["pixel_values"].shape[0] for p in parts] == [24, 64, 8]  # the 64-patch image goes alone
    torch.testing.assert_close(torch.cat([p["pixel_values"] for p in parts]), inputs["pixel_values"])


def test_inputs_within_the_budget_or_without_a_grid_come_back_whole() -> None:
    inputs = _inputs([[1, 4, 4], [1, 2, 4]])
    assert split_by_patches(inputs, budget=24) == [inputs]
    plain = {"pixel_values": torch.zeros(3, 3, 8, 8)}
    assert split_by_patches(plain, budget=1) == [plain]


def test_synthetic_inputs_make_a_legal_grid_near_the_budget() -> None:
    geometry = PatchGeometry(patch_size=14, temporal_patch_size=2, merge_size=2, max_patches_per_image=1000)
    inputs = synthetic_inputs(geometry, 1000, torch.device("cpu"), torch.float32)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert t == 1 and h % 2 == 0 and w % 2 == 0 and 900 <= h * w <= 1000
    assert inputs["pixel_values"].shape == (h * w, 3 * 2 * 14 * 14)
