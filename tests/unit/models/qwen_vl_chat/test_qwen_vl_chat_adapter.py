"""The adapter's paged-engine pieces, its generate-engine inputs and the attention seam of the decoder."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from qwen_vl_chat_prompts import TWO_IMAGES, prepare
from qwen_vl_chat_prompts import images as _images
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vlmserve.models.qwen_vl_chat.adapter import QwenVLChatAdapter
from vlmserve.types import PreparedPrompt


def full_logits(adapter: Any, prompt: PreparedPrompt, extra: list[int] | None = None) -> torch.Tensor:
    ids = torch.tensor([prompt.token_ids + (extra or [])])
    with torch.no_grad():
        return adapter.model(input_ids=ids, pixel_values=prompt.model_inputs.get("pixel_values")).logits[0]


def paged_prefill(adapter: Any, prompt: PreparedPrompt, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    embedding = adapter.embed_prompt(prompt, adapter.encode_images(prompt))
    with torch.no_grad():
        out = adapter.text_model(inputs_embeds=embedding.inputs_embeds[None], position_ids=embedding.positions,
                                 **kwargs)
    return adapter.compute_logits(out.last_hidden_state[0]), out


def test_paged_pieces_reproduce_the_full_forward(qwen_vl_chat_adapter: Any) -> None:
    prompt = prepare(qwen_vl_chat_adapter, TWO_IMAGES, _images((255, 0, 0), (0, 0, 255)))
    features = qwen_vl_chat_adapter.encode_images(prompt)
    assert [tuple(f.shape) for f in features] == [(256, 128)] * 2
    embedding = qwen_vl_chat_adapter.embed_prompt(prompt, features)
    assert embedding.positions.shape == (1, prompt.num_tokens) and embedding.rope_delta == 0
    logits, _ = paged_prefill(qwen_vl_chat_adapter, prompt)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, full_logits(qwen_vl_chat_adapter, prompt), rtol=1e-5, atol=1e-5)


def test_paged_decode_steps_continue_the_prompt(qwen_vl_chat_adapter: Any) -> None:
    adapter = qwen_vl_chat_adapter
    prompt = prepare(adapter, TWO_IMAGES, _images((255, 255, 0), (0, 255, 255)))
    cache = DynamicCache(config=adapter.model.config)
    logits, _ = paged_prefill(adapter, prompt, past_key_values=cache)
    generated: list[int] = []
    for step in range(3):
        generated.append(int(logits[-1].argmax()))
        position = torch.tensor([[prompt.num_tokens + step]])
        with torch.no_grad():
            out = adapter.text_model(inputs_embeds=adapter.embed_tokens(torch.tensor([generated[-1:]])),
                                     position_ids=position, past_key_values=cache)
        logits = adapter.compute_logits(out.last_hidden_state[0])
    expected = full_logits(adapter, prompt, generated)[-1]
    torch.testing.assert_close(logits[-1], expected, rtol=1e-5, atol=1e-5)


def test_prompts_packed_in_one_call_match_each_alone(qwen_vl_chat_adapter: Any) -> None:
    adapter = qwen_vl_chat_adapter
    prompts = [prepare(adapter, TWO_IMAGES, _images((10, 200, 30), (90, 0, 90))),
               prepare(adapter, "No image in this one.", [])]
    embeddings = [adapter.embed_prompt(p, adapter.encode_images(p)) for p in prompts]
    packed = torch.cat([e.inputs_embeds for e in embeddings])[None]
    positions = torch.cat([e.positions for e in embeddings], dim=-1)
    with torch.no_grad():
        hidden = adapter.text_model(inputs_embeds=packed, position_ids=positions).last_hidden_state[0]
    logits = adapter.compute_logits(hidden).split([p.num_tokens for p in prompts])
    for prompt, part in zip(prompts, logits, strict=True):
        torch.testing.assert_close(part, full_logits(adapter, prompt), rtol=1e-5, atol=1e-5)


def test_attention_goes_through_the_registered_interface(qwen_vl_chat_adapter: Any) -> None:
    calls: list[dict[str, Any]] = []

    def recording(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
                  **kwargs: Any) -> Any:
        calls.append({"layer": module.layer_idx, "groups": module.num_key_value_groups, "shape": tuple(query.shape),
                      "kv": tuple(key.shape), "marker": kwargs.get("marker")})
        return sdpa_attention_forward(module, query, key, value, mask, **{k: v for k, v in kwargs.items()
                                                                           if k != "marker"})

    AttentionInterface.register("vlmserve_test_recording", recording)
    config = qwen_vl_chat_adapter.model.config
    previous = config._attn_implementation
    config._attn_implementation = "vlmserve_test_recording"
    try:
        with torch.no_grad():
            qwen_vl_chat_adapter.text_model(inputs_embeds=torch.randn(1, 7, 128),
                                            position_ids=torch.arange(7)[None], marker="seen")
    finally:
        config._attn_implementation = previous
    assert [c["layer"] for c in calls] == [0, 1]
    assert all(c["shape"] == c["kv"] == (1, 4, 7, 32) and c["groups"] == 1 and c["marker"] == "seen"
               for c in calls)


def test_collate_left_pads_and_stacks_every_image(qwen_vl_chat_adapter: Any) -> None:
    prompts = [prepare(qwen_vl_chat_adapter, "Short.", []),
               prepare(qwen_vl_chat_adapter, TWO_IMAGES, _images((1, 2, 3), (4, 5, 6)))]
    batch = qwen_vl_chat_adapter.collate(prompts)
    width = prompts[1].num_tokens
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["input_ids"][0, -prompts[0].num_tokens:].tolist() == prompts[0].token_ids
    assert batch["attention_mask"][0].tolist() == [0] * (width - prompts[0].num_tokens) + [1] * prompts[0].num_tokens
    assert batch["pixel_values"].shape[0] == 2


def test_layout_and_engine_choice(qwen_vl_chat_adapter: Any) -> None:
    adapter = qwen_vl_chat_adapter
    layout = adapter.kv_layout
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (2, 4, 32)
    assert adapter.num_position_rows == 1
    assert adapter.max_model_len == 2048 and adapter.paged_support() is None
    longer = QwenVLChatAdapter(adapter.model, adapter.processor, max_model_len=4096)
    assert longer.paged_support() is None  # dynamic NTK is kept per sequence (test_qwen_vl_chat_long_context.py)


@pytest.mark.parametrize("images", [0, 1])
def test_embed_prompt_refuses_features_that_do_not_fit(qwen_vl_chat_adapter: Any, images: int) -> None:
    prompt = prepare(qwen_vl_chat_adapter, TWO_IMAGES, _images((0, 0, 0), (9, 9, 9)))
    features = qwen_vl_chat_adapter.encode_images(prompt)[:images]
    with pytest.raises(RuntimeError, match="imgpad"):
        qwen_vl_chat_adapter.embed_prompt(prompt, features)


def test_serving_loader_and_prompt_renderer_use_the_native_port(qwen_vl_chat_dir: Any) -> None:
    from PIL import Image

    from vlmserve.config import ModelConfig
    from vlmserve.models.loader import load_model
    from vlmserve.multimodal.prompt import PromptRenderer
    from vlmserve.types import ChatMessage, ImagePart, TextPart

    adapter = load_model(ModelConfig(model=str(qwen_vl_chat_dir), device="cpu"))
    assert isinstance(adapter, QwenVLChatAdapter) and adapter.dtype == torch.float32
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len)
    image = Image.new("RGB", (40, 30), (9, 99, 199))
    prompt = renderer.render([ChatMessage("user", (ImagePart(image, "a"), TextPart("And?"), ImagePart(image, "b")))])
    assert [(s.end - s.start, s.index) for s in prompt.image_spans] == [(256, 0), (256, 1)]
    assert all(set(prompt.token_ids[s.start:s.end]) == {adapter.image_token_id} for s in prompt.image_spans)
    assert prompt.model_inputs["pixel_values"].shape[0] == 2
    text = adapter.processor.decode(prompt.token_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: ")
    assert text.endswith("</img>\n<|im_end|>\n<|im_start|>assistant\n")
