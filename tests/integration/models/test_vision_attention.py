"""Segmented varlen vision attention: the same image features as transformers' per-window calls, the same
features for an image whatever else shares its tower call, and the same attention as a dense block mask."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText

from tests.fixtures.tiny.registry import FAMILIES
from vlmserve.models.families import VARLEN_VISION_FAMILIES
from vlmserve.models.hf_processor import load_processor
from vlmserve.models.vision_attention import (
    install_vision_attention,
    plan_segments,
    segmented_attention,
)

#: different sizes, so windowed layers see windows of several lengths interleaved across images
SIZES = [(224, 168), (112, 196), (224, 168), (140, 140)]


def _images() -> list[Image.Image]:
    return [Image.effect_noise(size, 40 + 10 * i).convert("RGB") for i, size in enumerate(SIZES)]


@pytest.mark.parametrize("family", sorted(VARLEN_VISION_FAMILIES))
def test_segmented_vision_attention_matches_stock_and_one_image_at_a_time(family: str, tmp_path: Path) -> None:
    path = FAMILIES[family].build(tmp_path / family)
    processor = load_processor(path)
    images = _images()
    stock = AutoModelForImageTextToText.from_pretrained(path).eval()
    ours = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert install_vision_attention(ours)
    assert ours.config.vision_config._attn_implementation != stock.config.vision_config._attn_implementation
    with torch.inference_mode():
        inputs = processor.image_processor(images=images, return_tensors="pt")
        want = stock.model.get_image_features(**inputs).pooler_output
        got = ours.model.get_image_features(**inputs).pooler_output
        alone = [ours.model.get_image_features(**processor.image_processor(images=[image], return_tensors="pt"))
                 .pooler_output[0] for image in images]
    assert len(got) == len(want) == len(alone) == len(images)
    for g, w, a in zip(got, want, alone, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-5)


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int]) -> torch.Tensor:
    segment = torch.bucketize(torch.arange(q.shape[1]), torch.tensor(cu[1:]), right=True)
    mask = segment.unsqueeze(0) == segment.unsqueeze(1)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask).transpose(0, 1)


@pytest.mark.parametrize("lengths", [[16, 16, 16], [5, 9, 5, 5, 9, 1, 7], [33]])
def test_segmented_attention_equals_a_dense_block_mask(lengths: list[int]) -> None:
    generator = torch.Generator().manual_seed(sum(lengths))
    total = sum(lengths)
    q, k, v = (torch.randn(3, total, 8, generator=generator) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    groups = plan_segments(cu)
    assert len(groups) == len(set(lengths))  # one SDPA call per distinct length
    got = segmented_attention(q, k, v, groups, scaling=None)
    torch.testing.assert_close(got.double(), _dense_reference(q, k, v, cu.tolist()), rtol=1e-5, atol=1e-5)


def test_segments_must_cover_every_row() -> None:
    q = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="cover 8 of 10"):
        segmented_attention(q, q, q, plan_segments(torch.tensor([0, 4, 8])), scaling=None)


@pytest.mark.parametrize("family", sorted(VARLEN_VISION_FAMILIES))
def test_tower_calls_cut_at_the_patch_budget_give_the_same_features(family: str, tmp_path: Path) -> None:
    from vlmserve.config import ModelConfig
    from vlmserve.models.loader import load_model

    adapter = load_model(ModelConfig(model=str(FAMILIES[family].build(tmp_path / family))))
    geometry = adapter.vision_geometry  # type: ignore[attr-defined]
    assert geometry is not None
    inputs = dict(adapter.processor.image_processor(images=_images(), return_tensors="pt"))
    whole = adapter._image_features(inputs)  # type: ignore[attr-defined]
    patches = inputs["image_grid_thw"].prod(-1)
    calls: list[int] = []
    tower = adapter._tower  # type: ignore[attr-defined]
    adapter._tower = lambda part: calls.append(int(part["image_grid_thw"].prod(-1).sum())) or tower(part)  # type: ignore[attr-defined]
    adapter.vision_geometry = dataclasses.replace(geometry, max_patches_per_image=int(patches[:2].sum()))  # type: ignore[attr-defined]
    with mock.patch("vlmserve.models.vision_budget.MIN_PATCH_BUDGET", 0):
        cut = adapter._image_features(inputs)  # type: ignore[attr-defined]
        assert adapter.run_vision_at_budget()
    assert len(calls) >= 3 and max(calls[:-1]) <= int(patches[:2].sum()) and sum(calls[:-1]) == int(patches.sum())
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-5)
