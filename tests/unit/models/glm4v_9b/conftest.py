"""A tiny GLM-4V-9B checkpoint (built once per session) and its loaded adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def glm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny.glm4v_9b import build_glm4v_9b

    return build_glm4v_9b(tmp_path_factory.mktemp("models") / "tiny-glm-4v-9b")


@pytest.fixture(scope="session")
def glm_adapter(glm_checkpoint: Path) -> Any:
    from vlmserve.models.glm4v_9b import load

    return load(glm_checkpoint, device="cpu", dtype=torch.float32, max_model_len=None)


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """A non-square image with structure (a gradient and a square), so image features vary by pixel."""
    image = Image.new("RGB", (90, 60), (20, 40, 200))
    for x in range(90):
        for y in range(60):
            image.putpixel((x, y), (x * 2, y * 3, (x + y) % 256))
    return image

