"""The adapter's paged-engine pieces reproduce the full model: prompt logits, chunked prefill and decoding."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from vlmserve.types import PreparedPrompt

from .test_glm4v_9b_generate import NEW_TOKENS, generate, prepare


def run_text_model(adapter: Any, embeds: torch.Tensor, positions: torch.Tensor,
                   cache: DynamicCache | None = None) -> torch.Tensor:
    with torch.no_grad():
        out = adapter.text_model(inputs_embeds=embeds[None], position_ids=positions, past_key_values=cache)
    return adapter.compute_logits(out.last_hidden_state[0])


def test_prompt_pieces_reproduce_full_forward_logits(glm_adapter: Any, photo: Image.Image) -> None:
    prompt = prepare(glm_adapter, "What is in this picture?", photo)
    images = glm_adapter.encode_images(prompt)
    config = glm_adapter.config
    assert [tuple(e.shape) for e in images] == [(config.num_image_tokens + 2, config.hidden_size)]
    embedded = glm_adapter.embed_prompt(prompt, images)
    assert embedded.inputs_embeds.shape == (prompt.num_tokens, config.hidden_size)
    assert embedded.positions.shape == (1, prompt.num_tokens)
    assert embedded.rope_delta == -(config.num_image_tokens - 1)
    logits = run_text_model(glm_adapter, embedded.inputs_embeds, embedded.positions)
    with torch.no_grad():
        full = glm_adapter.model(input_ids=torch.tensor([prompt.token_ids]), **prompt.model_inputs).logits[0]
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    # the engine may pass (rows, 1, T) positions
    torch.testing.assert_close(run_text_model(glm_adapter, embedded.inputs_embeds, embedded.positions[None]), full)


def test_chunked_prefill_and_decode_reproduce_generate(glm_adapter: Any, photo: Image.Image) -> None:
    prompt = prepare(glm_adapter, "Describe the image.", photo)
    embedded = glm_adapter.embed_prompt(prompt, glm_adapter.encode_images(prompt))
    cache = DynamicCache(config=glm_adapter.config)
    cut = glm_adapter.image_spans(prompt.token_ids)[0].start + 5  # the first chunk ends inside the image
    run_text_model(glm_adapter, embedded.inputs_embeds[:cut], embedded.positions[:, :cut], cache)
    logits = run_text_model(glm_adapter, embedded.inputs_embeds[cut:], embedded.positions[:, cut:], cache)
    tokens = [int(logits[-1].argmax())]
    for index in range(prompt.num_tokens, prompt.num_tokens + NEW_TOKENS - 1):
        position = torch.tensor([[index + embedded.rope_delta]])
        logits = run_text_model(glm_adapter, glm_adapter.embed_tokens(torch.tensor(tokens[-1:])), position, cache)
        tokens.append(int(logits[-1].argmax()))
    assert tokens == generate(glm_adapter, [prompt])[0]


def test_text_only_prompt_has_plain_positions(glm_adapter: Any) -> None:
    prompt = prepare(glm_adapter, "Hi", None)
    assert glm_adapter.encode_images(prompt) == []
    embedded = glm_adapter.embed_prompt(prompt, [])
    assert embedded.positions.tolist() == [list(range(prompt.num_tokens))] and embedded.rope_delta == 0


def test_layout_and_limits(glm_adapter: Any, photo: Image.Image) -> None:
    config = glm_adapter.config
    layout = glm_adapter.kv_layout
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (config.num_layers, 2, config.kv_channels)
    assert glm_adapter.paged_support() is None and glm_adapter.num_position_rows == 1
    assert glm_adapter.max_model_len == config.seq_length
    assert glm_adapter.eos_token_ids == frozenset(config.eos_token_id)
    prompt: PreparedPrompt = prepare(glm_adapter, "x", photo)
    (span,) = glm_adapter.image_spans(prompt.token_ids)
    assert prompt.token_ids[span.start] == config.boi_token_id and prompt.token_ids[span.end - 1] == config.eoi_token_id
    assert span.end - span.start == config.num_image_tokens + 2
    assert glm_adapter.image_token_id == glm_adapter.processor.image_token_id == config.pad_token_id
    layers = glm_adapter.text_model.layers
    assert [layer.self_attention.layer_idx for layer in layers] == list(range(config.num_layers))
    assert layers[0].self_attention.num_key_value_groups == config.num_attention_heads // 2
