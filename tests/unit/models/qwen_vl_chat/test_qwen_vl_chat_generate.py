"""`GenerationMixin.generate` on the port: the same tokens as a greedy loop over full forward passes."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from qwen_vl_chat_prompts import TWO_IMAGES, prepare


def greedy_by_full_forwards(model: Any, ids: list[int], pixel_values: torch.Tensor | None, steps: int,
                            stops: frozenset[int]) -> list[int]:
    """No cache: every step re-runs the whole sequence, images included, and takes the argmax."""
    generated: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + generated]), pixel_values=pixel_values).logits
        generated.append(int(logits[0, -1].argmax()))
        if generated[-1] in stops:
            break
    return generated


def test_generate_equals_a_greedy_loop_over_full_forwards(qwen_vl_chat_adapter: Any) -> None:
    adapter = qwen_vl_chat_adapter
    prompt = prepare(adapter, TWO_IMAGES, [Image.new("RGB", (64, 64), (200, 30, 30)),
                                           Image.new("RGB", (32, 80), (30, 30, 200))])
    inputs = adapter.collate([prompt])
    with torch.no_grad():
        out = adapter.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    generated = out[0, prompt.num_tokens:].tolist()
    expected = greedy_by_full_forwards(adapter.model, prompt.token_ids, inputs["pixel_values"], 8,
                                       adapter.eos_token_ids)
    assert generated[:len(expected)] == expected
    assert len(expected) == 8 or expected[-1] in adapter.eos_token_ids


def test_batched_generate_matches_each_prompt_alone(qwen_vl_chat_adapter: Any) -> None:
    adapter = qwen_vl_chat_adapter
    prompts = [prepare(adapter, "Name three colors.", []),
               prepare(adapter, TWO_IMAGES, [Image.new("RGB", (48, 48), (0, 128, 0)),
                                             Image.new("RGB", (48, 48), (128, 0, 128))])]
    settings = {"max_new_tokens": 6, "do_sample": False, "min_new_tokens": 6}
    with torch.no_grad():
        together = adapter.model.generate(**adapter.collate(prompts), **settings)
        alone = [adapter.model.generate(**adapter.collate([p]), **settings) for p in prompts]
    for row, single in zip(together, alone, strict=True):
        assert row[-6:].tolist() == single[0, -6:].tolist()
