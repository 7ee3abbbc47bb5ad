"""A checkpoint's processor loads the same from every file layout transformers 5 reads, with or without torchvision.

Per family, one tiny checkpoint is built in the Hub's layout and rewritten into each layout of
tests/fixtures/tiny/layouts.py (the nested one by transformers' own `save_pretrained`). Each must load through
`vlmserve.models.hf_processor.load_processor` into the same processor class with the same chat template and
settings, and turn the same chat + image into the same token ids and pixels as the Hub layout.

"Without torchvision" is this machine's state (torchvision does not import beside torch 2.13 CPU), where the
loader assembles an image-only processor; "with torchvision" runs transformers' own `AutoProcessor` path and
only runs where torchvision imports (skipped here: there is no honest way to make it importable on this box).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.fixtures.tiny.layouts import LAYOUTS, VIDEO_PROCESSOR_SETTINGS, make_layout
from tests.fixtures.tiny.registry import FAMILIES

# Qwen2-VL and GLM-4.1V: video families (nested video settings, separate video config; GLM's Hub layout already
# carries one); LLaVA: image-only, with processor-level settings (patch_size, feature strategy) that must survive
# every layout.
LAYOUT_FAMILIES = ("qwen2_vl", "glm4v", "llava")

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _torchvision_importable() -> bool:
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


@pytest.fixture(scope="module")
def hub_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """family -> (hub-layout dir, its processor loaded by vlmserve)."""
    from vlmserve.models.hf_processor import load_processor

    root = tmp_path_factory.mktemp("layouts")
    built = {}
    for family in LAYOUT_FAMILIES:
        path = FAMILIES[family].build(root / family / "hub")
        built[family] = (path, load_processor(path))
    return built


def _chat_inputs(processor: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (40, 56, 3), generator=generator, dtype=torch.uint8).numpy()
    inputs = processor(text=[text], images=[Image.fromarray(pixels)], return_tensors="pt")
    return {"text": text, **inputs}


def _settings(processor: Any) -> dict[str, Any]:
    """The processor-level settings its class keeps as attributes (LLaVA's patch_size, image_token, ...)."""
    return {key: value for key, value in processor.to_dict().items()
            if key not in ("image_processor", "video_processor", "processor_class", "tokenizer")}


@pytest.mark.parametrize("torchvision", ["absent", "present"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", LAYOUT_FAMILIES)
def test_every_layout_loads_the_same_processor(hub_checkpoints: dict[str, tuple[Path, Any]], tmp_path: Path,
                                               family: str, layout: str, torchvision: str) -> None:
    if (torchvision == "present") != _torchvision_importable():
        pytest.skip(f"torchvision is {'not ' if torchvision == 'present' else ''}importable here")
    if layout == "separate_video" and family not in VIDEO_PROCESSOR_SETTINGS:
        pytest.skip(f"{family} has no video processor")
    from vlmserve.models.hf_processor import load_processor

    hub_dir, reference = hub_checkpoints[family]
    path = make_layout(hub_dir, tmp_path / layout, layout, processor=reference, family=family)
    processor = load_processor(path)

    assert type(processor).__name__ == type(reference).__name__
    assert processor.chat_template == reference.chat_template
    assert _settings(processor) == _settings(reference)
    expected, got = _chat_inputs(reference), _chat_inputs(processor)
    assert got["text"] == expected["text"]
    assert torch.equal(got["input_ids"], expected["input_ids"])
    torch.testing.assert_close(got["pixel_values"], expected["pixel_values"])


def test_nested_layout_keeps_the_fine_tunes_image_settings(hub_checkpoints: dict[str, tuple[Path, Any]],
                                                           tmp_path: Path) -> None:
    """A fine-tune that changed its image budget keeps it: the nested settings are read, not the defaults."""
    from vlmserve.models.hf_processor import load_processor

    hub_dir, _ = hub_checkpoints["qwen2_vl"]
    fine_tuned = load_processor(hub_dir)
    fine_tuned.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
    path = make_layout(hub_dir, tmp_path / "nested", "nested", processor=fine_tuned, family="qwen2_vl")
    processor = load_processor(path)
    assert processor.image_processor.size == fine_tuned.image_processor.size
    inputs = _chat_inputs(processor)
    # 56x56 pixels at most: a (4 x 4)-patch grid, 4 tokens after the 2x2 merge.
    assert int(inputs["image_grid_thw"].prod()) <= 16
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_token_id).sum()) == int(inputs["image_grid_thw"].prod()) // 4
