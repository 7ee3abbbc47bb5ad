"""One-call varlen vision attention gives the same image features as transformers' per-window calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from tests.fixtures.tiny.registry import FAMILIES
from vlmserve.models.hf_processor import load_processor
from vlmserve.models.vision_attention import VARLEN_VISION_FAMILIES, install_vision_attention


@pytest.mark.parametrize("family", sorted(VARLEN_VISION_FAMILIES))
def test_varlen_vision_attention_matches_per_window(family: str, tmp_path: Path) -> None:
    path = FAMILIES[family].build(tmp_path / family)
    processor = load_processor(path)
    images = [Image.effect_noise((224, 168), 40).convert("RGB"), Image.effect_noise((112, 196), 60).convert("RGB")]
    inputs = processor.image_processor(images=images, return_tensors="pt")
    stock = AutoModelForImageTextToText.from_pretrained(path).eval()
    ours = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert install_vision_attention(ours, family)
    assert ours.config.vision_config._attn_implementation != stock.config.vision_config._attn_implementation
    with torch.inference_mode():
        want = stock.model.get_image_features(**inputs).pooler_output
        got = ours.model.get_image_features(**inputs).pooler_output
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
