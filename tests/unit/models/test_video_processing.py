"""GridVideoProcessor (torchvision-free video preprocessing) against transformers' own image preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from vlmserve.models.video_processing import GridVideoProcessor


def _frame(seed: int, size: tuple[int, int] = (90, 61)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_a_still_video_is_preprocessed_exactly_like_the_image() -> None:
    """Qwen2-VL repeats an image over its temporal patch: a 2-frame video of that image must give the same patches
    in the same order (same resize, normalisation and merge-order layout) and the same grid."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=112 * 112)
    video_processor = GridVideoProcessor.for_checkpoint(Path("/nonexistent"), image_processor)
    frame = _frame(0)
    image = image_processor(images=[frame], return_tensors="pt")
    video = video_processor([[frame, frame]])
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist()
    torch.testing.assert_close(video["pixel_values_videos"], image["pixel_values"], rtol=0, atol=1e-5)


def test_frames_pair_up_in_time_and_odd_counts_repeat_the_last(tmp_path: Path) -> None:
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
         "size": {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}}))
    processor = GridVideoProcessor.for_checkpoint(tmp_path, image_processor=None)
    assert processor.image_mean == [0.5] * 3 and processor.max_pixels == 56 * 56
    frames = [_frame(i, (56, 56)) for i in range(3)]
    out = processor([frames, frames[:2]], video_metadata=["m1", "m2"], return_metadata=True)
    assert out["video_grid_thw"].tolist() == [[2, 4, 4], [1, 4, 4]]
    assert out["video_metadata"] == ["m1", "m2"]
    first, second = out["pixel_values_videos"][:32], out["pixel_values_videos"][32:]
    torch.testing.assert_close(first[:16], second)  # frames 0 and 1 make the same first group in both videos
    # the second group of the 3-frame video is frame 2 twice: both temporal halves of every patch are equal
    group = first[16:].reshape(16, 3, 2, 14 * 14)
    torch.testing.assert_close(group[:, :, 0], group[:, :, 1])


def test_frame_processor_resizes_crops_and_stacks() -> None:
    from vlmserve.models.video_processing import FrameVideoProcessor

    crop = FrameVideoProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                               image_mean=[0.0] * 3, image_std=[1.0] * 3)
    wide = Image.new("RGB", (96, 48), (0, 0, 0))
    wide.paste((255, 255, 255), (40, 0, 56, 48))  # a white bar in the middle third
    out = crop([[wide, wide, wide]])["pixel_values_videos"]
    assert out.shape == (1, 3, 3, 32, 32)  # (videos, frames, channels, height, width)
    assert float(out[0, 0, :, :, 16].mean()) > 0.9 and float(out[0, 0, :, :, 0].mean()) < 0.1  # centre kept
    fixed = FrameVideoProcessor(size={"height": 24, "width": 40}, crop_size=None, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3)
    assert fixed([wide])["pixel_values_videos"].shape == (1, 1, 3, 24, 40)


def test_settings_survive_the_processors_own_save(tmp_path: Path) -> None:
    """A fine-tune saves the processor it loaded (video processor nested in processor_config.json); reading that
    back gives the same video settings."""
    processor = GridVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, min_pixels=1024, max_pixels=4096)
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": processor.to_dict()}))
    assert GridVideoProcessor.for_checkpoint(tmp_path, image_processor=None).__dict__ == processor.__dict__
