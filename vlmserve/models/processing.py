"""Small pieces the native processors (GLM-4V-9B, Qwen-VL-Chat) share with the Hugging Face processor surface."""

from __future__ import annotations

from typing import Any


def flatten_images(images: Any) -> list[Any]:
    """`images` as processors accept them (one image, a list, or a list per prompt) → one flat list."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    flat: list[Any] = []
    for item in images:
        flat.extend(flatten_images(item) if isinstance(item, (list, tuple)) else [item])
    return flat


def pad_token_rows(rows: list[list[int]], pad_id: int, *, left: bool) -> dict[str, Any]:
    """`input_ids` and `attention_mask` for token rows of different lengths, padded on one side."""
    width = max((len(row) for row in rows), default=0)
    input_ids, attention_mask = [], []
    for row in rows:
        filler = [pad_id] * (width - len(row))
        ones, zeros = [1] * len(row), [0] * len(filler)
        input_ids.append(filler + row if left else row + filler)
        attention_mask.append(zeros + ones if left else ones + zeros)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
