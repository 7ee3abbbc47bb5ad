"""Prompts prepared the way the serving pipeline prepares them, shared by the adapter and generate tests."""

from __future__ import annotations

from typing import Any

from PIL import Image

from vlmserve.types import ImageSpan, PreparedPrompt


def prepare(adapter: Any, content: Any, images: list[Image.Image]) -> PreparedPrompt:
    """What the prompt pipeline hands the engine: token ids, the processor's tensors and the image spans."""
    text = adapter.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = adapter.processor(text=[text], images=images or None, return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    pad = adapter.image_token_id
    starts = [i for i, t in enumerate(ids) if t == pad and (i == 0 or ids[i - 1] != pad)]
    spans = tuple(ImageSpan(start=s, end=s + 256, index=n) for n, s in enumerate(starts))
    inputs = {k: v for k, v in batch.items() if k != "input_ids"}
    return PreparedPrompt(token_ids=ids, model_inputs=inputs, image_hashes=tuple(f"h{n}" for n in range(len(spans))),
                          image_spans=spans)


TWO_IMAGES = [{"type": "image"}, {"type": "text", "text": "Which is larger?"}, {"type": "image"}]


def images(*colors: tuple[int, int, int]) -> list[Image.Image]:
    return [Image.new("RGB", (50 + 10 * n, 40), color) for n, color in enumerate(colors)]
