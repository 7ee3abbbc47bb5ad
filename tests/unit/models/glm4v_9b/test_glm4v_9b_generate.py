"""GLM-4V-9B through `GenerationMixin.generate` (the fallback engine's path) with a DynamicCache."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from vlmserve.types import PreparedPrompt

NEW_TOKENS = 8


def prepare(adapter: Any, question: str, image: Image.Image | None) -> PreparedPrompt:
    """What vlmserve.multimodal.prompt builds: expanded token ids plus the processor's other tensors."""
    content: list[dict[str, Any]] = [{"type": "text", "text": question}]
    if image is not None:
        content.append({"type": "image"})
    text = adapter.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = adapter.processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
    token_ids = inputs.pop("input_ids")[0].tolist()
    inputs.pop("attention_mask")
    return PreparedPrompt(token_ids=token_ids, model_inputs=dict(inputs))


def greedy_by_full_forwards(model: Any, prompt: PreparedPrompt) -> list[int]:
    """No cache: every step runs the whole sequence (image included) and takes the argmax."""
    ids = torch.tensor([prompt.token_ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(input_ids=ids, use_cache=False, **prompt.model_inputs).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def generate(adapter: Any, prompts: list[PreparedPrompt]) -> list[list[int]]:
    batch = adapter.collate(prompts)
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = adapter.model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, width:].tolist()


@pytest.mark.parametrize("with_image", [True, False])
def test_generate_equals_greedy_loop_over_full_forwards(glm_adapter: Any, photo: Image.Image,
                                                         with_image: bool) -> None:
    prompt = prepare(glm_adapter, "What is in this picture?", photo if with_image else None)
    (generated,) = generate(glm_adapter, [prompt])
    assert generated == greedy_by_full_forwards(glm_adapter.model, prompt)


def test_batched_generation_equals_alone(glm_adapter: Any, photo: Image.Image) -> None:
    prompts = [prepare(glm_adapter, "Describe the image in one sentence, please.", photo),
               prepare(glm_adapter, "Hi", None),
               prepare(glm_adapter, "What colors?", photo.rotate(90))]
    together = generate(glm_adapter, prompts)
    alone = [generate(glm_adapter, [p])[0] for p in prompts]
    assert together == alone
    assert len({tuple(t) for t in together}) > 1  # the random model does not answer everything alike


def test_forward_leaves_the_attention_mask_alone(glm_adapter: Any, photo: Image.Image) -> None:
    batch = glm_adapter.collate([prepare(glm_adapter, "Hi", photo)])
    before = batch["attention_mask"].clone()
    with torch.no_grad():
        glm_adapter.model(**batch)
    assert torch.equal(batch["attention_mask"], before)


def test_bfloat16_runs_and_tracks_float32(glm_checkpoint: Any, glm_adapter: Any, photo: Image.Image) -> None:
    from vlmserve.models.glm4v_9b import load

    adapter16 = load(glm_checkpoint, device="cpu", dtype=torch.bfloat16, max_model_len=None)
    assert {p.dtype for p in adapter16.model.parameters()} == {torch.bfloat16}
    prompt = prepare(adapter16, "What is in this picture?", photo)
    batch = adapter16.collate([prompt])
    assert batch["pixel_values"].dtype == torch.bfloat16
    with torch.no_grad():
        logits16 = adapter16.model(**batch).logits[0, -1].float()
        logits32 = glm_adapter.model(**glm_adapter.collate([prompt])).logits[0, -1]
    assert torch.isfinite(logits16).all()
    assert torch.corrcoef(torch.stack([logits16, logits32]))[0, 1] > 0.99
    assert len(generate(adapter16, [prompt])[0]) == NEW_TOKENS
