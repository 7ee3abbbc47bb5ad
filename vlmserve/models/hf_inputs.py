"""Processor outputs as a transformers VLM's forward, tower and decoder take them: several prompts batched for
`generate` (left-padded), images of several prompts packed for one tower call, tensors moved to the model's
device and dtype, and inputs matched to a function's parameters by name."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from vlmserve.types import PreparedPrompt

#: keys of the processor output that run along the token axis (left-padded when batching)
PER_TOKEN_KEYS = ("attention_mask", "mm_token_type_ids", "token_type_ids")
#: keys of the processor output that belong to videos (encoded by `encode_videos`, never with the images)
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def collate_prompts(prompts: list[PreparedPrompt], pad_token_id: int, device: torch.device,
                    dtype: torch.dtype) -> dict[str, Any]:
    """The prompts' model inputs as one left-padded batch (the generate engine's forward input)."""
    width = max(p.num_tokens for p in prompts)
    batch: dict[str, Any] = {
        "input_ids": torch.tensor([[pad_token_id] * (width - p.num_tokens) + p.token_ids for p in prompts]),
        "attention_mask": torch.tensor([[0] * (width - p.num_tokens) + [1] * p.num_tokens for p in prompts]),
    }
    keys = {k for p in prompts for k in p.model_inputs}
    for key in sorted(keys - {"input_ids", "attention_mask"}):
        values = [p.model_inputs.get(key) for p in prompts]
        if key in PER_TOKEN_KEYS:
            batch[key] = torch.cat([_left_pad(v, p.num_tokens, width) for v, p in zip(values, prompts, strict=True)])
        else:
            present = [v for v in values if v is not None]
            batch[key] = torch.cat(present) if isinstance(present[0], torch.Tensor) else _flatten(present)
    return {k: to_device(v, device, dtype) for k, v in batch.items()}


def _left_pad(value: torch.Tensor | None, length: int, width: int) -> torch.Tensor:
    if value is None:
        value = torch.zeros(1, length, dtype=torch.long)
    return torch.nn.functional.pad(value, (width - value.shape[-1], 0))


def _flatten(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(v if isinstance(v, list) else [v])
    return out


def to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device)


def packed_image_inputs(inputs: list[dict[str, Any]], packable: frozenset[str]) -> dict[str, Any] | None:
    """The image inputs of several prompts as one, concatenated along the first axis, or None where that would
    not mean "these images, one after another": keys beyond the family's packable ones (sizes, masks, patch
    counts), pixels of different shapes without a grid to tell them apart, or prompts without images."""
    keys = {k for model_inputs in inputs for k in model_inputs
            if k not in {*PER_TOKEN_KEYS, *VIDEO_KEYS, "input_ids"}}
    if not keys or not keys <= packable or "pixel_values" not in keys:
        return None
    merged: dict[str, Any] = {}
    for key in keys:
        values = [model_inputs.get(key) for model_inputs in inputs]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if len(tensors) != len(values):
            return None
        if len({tuple(v.shape[1:]) for v in tensors}) != 1:
            return None
        merged[key] = torch.cat(tensors)
    if "image_grid_thw" not in keys and merged["pixel_values"].dim() != 4:
        return None  # without a grid, only (images, channels, height, width) pixels are plainly image after image
    return merged


def matching_kwargs(fn: Any, inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The subset of `inputs` that `fn` accepts by name, moved to the model's device."""
    names = inspect.signature(fn).parameters
    return {k: to_device(v, device, dtype) for k, v in inputs.items() if k in names}
