"""GridVideoProcessor (torchvision-free video preprocessing) against transformers' own image preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


# The families' own video processors need torchvision: where it imports (the CI's torchvision stage), our
# processor path must give what transformers' own gives from the same checkpoint — the published checkpoints'
# video settings, at a tiny scale — and the same sampled video with its metadata.
_CLIP = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
_QWEN2 = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
          "size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}}
_SAVED = {
    "qwen2_vl": _QWEN2,
    "qwen2_5_vl": _QWEN2,  # + second_per_grid_ts from the sampling rate
    # whole-video bounds: 4 frames of 64x96 are 24,576 pixels, over 16,384 though each frame fits
    "qwen3_vl": {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                 "size": {"shortest_edge": 4096, "longest_edge": 16384}},
    "glm4v": {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
              "size": {"shortest_edge": 112 * 112 * 4, "longest_edge": 28 * 28 * 2 * 64}},  # 4 frames: grown
    "llava_onevision": {"size": {"height": 32, "width": 32}, "do_center_crop": False},
    "llava_next_video": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
                         "do_center_crop": True},
}


@pytest.mark.parametrize("name", sorted(_SAVED))
def test_a_video_prompt_is_prepared_as_the_familys_own_processor_prepares_it(name: str, tmp_path: Path) -> None:
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        pytest.skip("the families' own video processors need torchvision")
    from transformers import AutoProcessor

    from tests.fixtures.tiny.registry import FAMILIES
    from tests.fixtures.videos import make_video
    from vlmserve.models.hf_processor import load_processor
    from vlmserve.multimodal.prompt import video_metadata
    from vlmserve.multimodal.video import VideoLimits, decode_video

    path = FAMILIES[name].build(tmp_path / name)
    config = path / "video_preprocessor_config.json"
    saved = json.loads(config.read_text()) if config.exists() else {}
    config.write_text(json.dumps({**saved, **_CLIP, **_SAVED[name]}))
    ours, theirs = load_processor(path), AutoProcessor.from_pretrained(path)
    assert type(ours.video_processor).__module__ == "vlmserve.models.video_processing"
    video = decode_video(make_video(8, size=(84, 56), fps=4, seed=0), VideoLimits(60, 16, 10**6, 10**6), fps=2,
                         max_frames=16, param="p")  # 4 frames sampled at 2 fps
    text = theirs.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                                                                        "text": "What happens?"}]}],
                                      add_generation_prompt=True)
    inputs = {"text": [text], "videos": [list(video.frames)], "video_metadata": [video_metadata(video)],
              "return_tensors": "pt"}
    got, expected = dict(ours(**inputs)), dict(theirs(**inputs, do_sample_frames=False))
    pixels = "pixel_values_videos"
    assert sorted(got) == sorted(expected)
    for key in sorted(set(got) - {pixels, "video_metadata"}):  # ids (timestamps too), grids, token types, times
        assert got[key].tolist() == expected[key].tolist(), key
    assert got[pixels].shape == expected[pixels].shape
    # Pillow's bicubic resize against torchvision's: a few pixels differ by one 8-bit level (seen: mean 6e-5)
    difference = (got[pixels] - expected[pixels]).abs()
    one_level = 1 / 255 / min(_CLIP["image_std"])
    assert float(difference.max()) <= one_level * 1.001 and float(difference.mean()) < 1e-3
