"""Video preprocessing without torchvision, in the processor's video slot: Qwen-style grids and LLaVA frames.

transformers' video processors are written on torchvision (absent or broken beside many torch builds), so for the
families on `VIDEO_FAMILIES` the processor's `video_processor` is replaced by `GridVideoProcessor`: the same
steps as `Qwen2VLVideoProcessor` — `smart_resize` to a multiple of patch x merge, rescale, normalise, frames
grouped by `temporal_patch_size` (the last frame repeated to fill a group), patches in the vision tower's merge
order — on frames the media loader has already sampled and budgeted. The processor's own `__call__` then does
the rest as it would with its own video processor: the video token expansion (with Qwen3-VL's per-frame
timestamps from `video_metadata`), `mm_token_type_ids`, Qwen2.5-VL's `second_per_grid_ts`.

LLaVA-OneVision and LLaVA-NeXT-Video take `FrameVideoProcessor`: frames resized (and centre-cropped) to the
checkpoint's fixed size, as their own video processors do, stacked as (videos, frames, channels, height, width).

The checkpoint's video `size` bounds pixels per frame for Qwen2/2.5-VL and the whole video (sampled frames,
rounded up to the temporal patch, times the frame's pixels) for Qwen3-VL and GLM-4.1V/4.5V, as their own video
processors bound them; our own budget (`--max-video-pixels`) applies before either.

NOTE: frames are resized with Pillow's bicubic filter, as the Pil image processors resize images; torchvision's
resize (what transformers' video processors use) differs in the last bits of some pixels. Newer transformers'
opt-in `cap_pixels_per_frame` (a per-frame share of `max_video_tokens`) is not applied.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import PushToHubMixin

from vlmserve.models.hf_processor import read_json

#: model types whose processors take videos through `GridVideoProcessor`
GRID_VIDEO_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe"})
#: families whose video frames are written with the image token (told apart by `mm_token_type_ids` == 2); their
#: own forward cannot take images and videos in one prompt, so neither do we
SHARED_TOKEN_VIDEO_FAMILIES = frozenset({"glm4v", "glm4v_moe"})
#: of those, the families whose video processors bound the whole video's pixels, not each frame's
WHOLE_VIDEO_BOUND_FAMILIES = frozenset({"qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe"})
#: model types whose processors take videos through `FrameVideoProcessor` (frames resized like their images)
FRAME_VIDEO_FAMILIES = frozenset({"llava_next_video", "llava_onevision"})
VIDEO_FAMILIES = GRID_VIDEO_FAMILIES | FRAME_VIDEO_FAMILIES

_SETTINGS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor")


class _SavedWithTheProcessor(PushToHubMixin):
    """What `ProcessorMixin.save_pretrained` needs of a sub-processor (a fine-tune saves the processor it loaded):
    its settings as a dict, nested under `video_processor` in processor_config.json, which `for_checkpoint` reads
    back."""

    _auto_class = None

    def to_dict(self) -> dict[str, Any]:
        return {"video_processor_type": type(self).__name__, **self._settings()}

    def _settings(self) -> dict[str, Any]:
        raise NotImplementedError


class GridVideoProcessor(_SavedWithTheProcessor):
    """Sampled RGB frames (PIL images) → `pixel_values_videos` (patches, features) and `video_grid_thw`."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, *, patch_size: int, temporal_patch_size: int, merge_size: int, image_mean: list[float],
                 image_std: list[float], min_pixels: int, max_pixels: int, rescale_factor: float = 1 / 255,
                 whole_video_bound: bool = False) -> None:
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.rescale_factor = rescale_factor
        #: min/max pixels bound frames x pixels per frame (Qwen3-VL, GLM-4.1V), not each frame (Qwen2-VL)
        self.whole_video_bound = whole_video_bound

    def _settings(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                "merge_size": self.merge_size, "image_mean": self.image_mean, "image_std": self.image_std,
                "rescale_factor": self.rescale_factor,
                "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}

    @classmethod
    def for_checkpoint(cls, path: Path, image_processor: Any, *, whole_video_bound: bool = False
                       ) -> GridVideoProcessor:
        """Settings from the checkpoint's video processor config (either layout), else its image processor's."""
        saved = _video_settings(path)
        found: dict[str, Any] = {name: saved.get(name, getattr(image_processor, name, None)) for name in _SETTINGS}
        settings: dict[str, Any] = {k: v for k, v in found.items() if v is not None}
        size = saved.get("size") or getattr(image_processor, "size", None) or {}
        min_pixels = saved.get("min_pixels") or size.get("shortest_edge") or 56 * 56
        max_pixels = saved.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 768
        return cls(min_pixels=int(min_pixels), max_pixels=int(max_pixels), whole_video_bound=whole_video_bound,
                   **settings)

    def __call__(self, videos: Any, *, video_metadata: Any = None, return_metadata: bool = False,
                 return_tensors: Any = None, **ignored: Any) -> Any:
        from transformers import BatchFeature

        batch = _as_video_list(videos)
        pieces = [self._patches(frames) for frames in batch]
        data: dict[str, Any] = {
            "pixel_values_videos": torch.cat([patches for patches, _ in pieces]),
            "video_grid_thw": torch.tensor([grid for _, grid in pieces], dtype=torch.long),
        }
        feature = BatchFeature(data=data)
        if return_metadata:
            metadata = video_metadata if isinstance(video_metadata, list) else [video_metadata] * len(batch)
            feature["video_metadata"] = metadata
        return feature

    def _patches(self, frames: list[Any]) -> tuple[torch.Tensor, list[int]]:
        from PIL import Image
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        width, height = frames[0].size
        if self.whole_video_bound:
            new_height, new_width = fit_video(len(frames), height, width, temporal=self.temporal_patch_size,
                                              factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        else:
            new_height, new_width = smart_resize(height, width, factor=factor, min_pixels=self.min_pixels,
                                                 max_pixels=self.max_pixels)
        size = (new_width, new_height)
        stacked = np.stack([np.asarray(frame.convert("RGB").resize(size, Image.Resampling.BICUBIC))
                            for frame in frames]).astype(np.float32)
        mean, std = np.array(self.image_mean, np.float32), np.array(self.image_std, np.float32)
        normalised = ((stacked * np.float32(self.rescale_factor) - mean) / std).astype(np.float32)
        video = torch.from_numpy(normalised).permute(0, 3, 1, 2)  # (frames, channels, height, width)
        if pad := -video.shape[0] % self.temporal_patch_size:
            video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
        t, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        grid_t, grid_h, grid_w = video.shape[0] // t, new_height // p, new_width // p
        patches = video.reshape(grid_t, t, 3, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(grid_t * grid_h * grid_w, 3 * t * p * p), [grid_t, grid_h, grid_w]


def fit_video(num_frames: int, height: int, width: int, *, temporal: int, factor: int, min_pixels: int,
              max_pixels: int) -> tuple[int, int]:
    """(height, width) in multiples of `factor`, near the frame's aspect ratio, such that the video's pixels —
    frames rounded to a multiple of `temporal`, times the frame's pixels — lie within [min_pixels, max_pixels]:
    the rule of Qwen3-VL's and GLM-4.1V's video processors (a frame thinner than `factor` first scaled up to it)."""
    if min(height, width) < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a video frame's aspect ratio must be below 200, got {max(height, width) / min(height, width)}")
    frames = max(temporal, round(num_frames / temporal) * temporal)
    new_height, new_width = round(height / factor) * factor, round(width / factor) * factor
    if frames * new_height * new_width > max_pixels:
        shrink = math.sqrt(num_frames * height * width / max_pixels)
        new_height = max(factor, math.floor(height / shrink / factor) * factor)
        new_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif frames * new_height * new_width < min_pixels:
        grow = math.sqrt(min_pixels / (num_frames * height * width))
        new_height, new_width = math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
    return new_height, new_width


class FrameVideoProcessor(_SavedWithTheProcessor):
    """Sampled RGB frames → `pixel_values_videos` (videos, frames, channels, height, width), each frame resized to
    the checkpoint's fixed size (LLaVA-OneVision) or its shortest edge and then centre-cropped (LLaVA-NeXT-Video),
    rescaled and normalised: the steps of those families' torchvision video processors."""

    model_input_names = ["pixel_values_videos"]

    def __init__(self, *, size: dict[str, int], crop_size: dict[str, int] | None, image_mean: list[float],
                 image_std: list[float], rescale_factor: float = 1 / 255) -> None:
        self.size = dict(size)
        self.crop_size = dict(crop_size) if crop_size else None
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.rescale_factor = rescale_factor

    def _settings(self) -> dict[str, Any]:
        return {"size": self.size, "crop_size": self.crop_size, "do_center_crop": self.crop_size is not None,
                "image_mean": self.image_mean, "image_std": self.image_std, "rescale_factor": self.rescale_factor}

    @classmethod
    def for_checkpoint(cls, path: Path, image_processor: Any) -> FrameVideoProcessor:
        saved = _video_settings(path)

        def setting(name: str) -> Any:
            return saved.get(name, getattr(image_processor, name, None))

        crop = setting("crop_size") if saved.get("do_center_crop", getattr(image_processor, "do_center_crop", True)) \
            else None
        return cls(size=dict(setting("size")), crop_size=crop, image_mean=setting("image_mean"),
                   image_std=setting("image_std"), rescale_factor=setting("rescale_factor") or 1 / 255)

    def __call__(self, videos: Any, *, return_tensors: Any = None, **ignored: Any) -> Any:
        from transformers import BatchFeature

        batch = [torch.stack([self._frame(frame) for frame in frames]) for frames in _as_video_list(videos)]
        if len({video.shape for video in batch}) != 1:
            raise ValueError("the videos of one prompt must have the same number of frames for this model")
        return BatchFeature(data={"pixel_values_videos": torch.stack(batch)})

    def _frame(self, frame: Any) -> torch.Tensor:
        from PIL import Image

        image = frame.convert("RGB")
        if "height" in self.size and "width" in self.size:
            image = image.resize((self.size["width"], self.size["height"]), Image.Resampling.BICUBIC)
        else:
            edge = self.size["shortest_edge"]
            scale = edge / min(image.size)
            image = image.resize((max(edge, round(image.width * scale)), max(edge, round(image.height * scale))),
                                 Image.Resampling.BICUBIC)
        if self.crop_size is not None:
            width, height = self.crop_size["width"], self.crop_size["height"]
            left, top = (image.width - width) // 2, (image.height - height) // 2
            image = image.crop((left, top, left + width, top + height))
        pixels = np.asarray(image).astype(np.float32) * np.float32(self.rescale_factor)
        mean, std = np.array(self.image_mean, np.float32), np.array(self.image_std, np.float32)
        return torch.from_numpy(((pixels - mean) / std).astype(np.float32)).permute(2, 0, 1)


def _as_video_list(videos: Any) -> list[list[Any]]:
    """`videos` as processors receive them (one video = a list of frames, or a list of such) → list of videos."""
    if isinstance(videos, (list, tuple)) and videos and isinstance(videos[0], (list, tuple)):
        return [list(video) for video in videos]
    return [list(videos)]


def _video_settings(path: Path) -> dict[str, Any]:
    """The video processor's saved settings: nested in processor_config.json (transformers 5's own save) or the
    Hub's video_preprocessor_config.json; {} when the checkpoint has neither."""
    nested = read_json(path / "processor_config.json").get("video_processor")
    if isinstance(nested, dict):
        return nested
    return read_json(path / "video_preprocessor_config.json")


def install_video_processor(processor: Any, path: Path, model_type: str) -> bool:
    """Put our video processor in `processor`'s video slot when the family takes videos (see VIDEO_FAMILIES)."""
    image_processor = getattr(processor, "image_processor", None)
    if model_type not in VIDEO_FAMILIES or image_processor is None or not hasattr(processor, "video_token"):
        return False
    if model_type in GRID_VIDEO_FAMILIES:
        processor.video_processor = GridVideoProcessor.for_checkpoint(
            path, image_processor, whole_video_bound=model_type in WHOLE_VIDEO_BOUND_FAMILIES)
    else:
        processor.video_processor = FrameVideoProcessor.for_checkpoint(path, image_processor)
    return True
