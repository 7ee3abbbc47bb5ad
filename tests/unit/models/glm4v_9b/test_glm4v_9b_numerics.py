"""Our GLM-4V-9B against a straightforward reference written here from the published equations.

The reference works on the raw checkpoint tensors in float64 with plain tensor ops (no modules of ours):
patchify-as-matmul, hand-written LayerNorm / RMSNorm / GELU(erf) / SiLU, rotary as complex multiplication of
interleaved pairs, per-head key/value groups picked by index, and, for the full forward, the original's own way of
splicing the image into the UNEXPANDED prompt (`embeds[:boi] + image rows + embeds[eoi + 1:]`, positions
`pos[:boi + 1] + [pos[boi + 1]] * N + pos[eoi:]`), whereas our model works on the expanded prompt.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from vlmserve.models.glm4v_9b import ChatGLMForConditionalGeneration

Weights = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def weights(glm_checkpoint: Path) -> Weights:
    tensors: Weights = {}
    for shard in sorted(glm_checkpoint.glob("model-*.safetensors")):
        tensors.update({k: v.double() for k, v in load_file(str(shard)).items()})
    return tensors


# --- the reference -------------------------------------------------------------------------------------------


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ w.T
    return y if b is None else y + b


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        t = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def vision_reference(w: Weights, config: dict[str, Any], pixels: torch.Tensor) -> torch.Tensor:
    vc, pre = config["vision_config"], "transformer.vision."
    batch, patch, width = pixels.shape[0], vc["patch_size"], vc["hidden_size"]
    grid, heads = pixels.shape[-1] // patch, vc["num_heads"]
    flat = pixels.reshape(batch, 3, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5).reshape(batch, grid**2, -1)
    x = linear(flat, w[pre + "patch_embedding.proj.weight"].reshape(width, -1), w[pre + "patch_embedding.proj.bias"])
    cls = w[pre + "patch_embedding.cls_embedding"].expand(batch, 1, width)
    x = torch.cat([cls, x], 1) + w[pre + "patch_embedding.position_embedding.weight"]
    for j in range(vc["num_hidden_layers"]):
        p = f"{pre}transformer.layers.{j}."
        qkv = linear(x, w[p + "attention.query_key_value.weight"], w[p + "attention.query_key_value.bias"])
        qkv = qkv.reshape(batch, -1, 3, heads, width // heads)
        q, k, v = (qkv[:, :, n].transpose(1, 2) for n in range(3))
        a = attention(q, k, v, (width // heads) ** -0.5, causal=False).transpose(1, 2).reshape(batch, -1, width)
        a = linear(a, w[p + "attention.dense.weight"], w[p + "attention.dense.bias"])
        x = x + layer_norm(a, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], vc["layer_norm_eps"])
        m = linear(gelu(linear(x, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])), w[p + "mlp.fc2.weight"],
                   w[p + "mlp.fc2.bias"])
        x = x + layer_norm(m, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"],
                           vc["layer_norm_eps"])
    half = grid // 2  # the 2x2 stride-2 convolution as a matmul over 2x2 blocks, (in, kh, kw) order
    blocks = x[:, 1:].reshape(batch, half, 2, half, 2, width).permute(0, 1, 3, 5, 2, 4).reshape(batch, half**2, -1)
    y = linear(blocks, w[pre + "conv.weight"].reshape(config["hidden_size"], -1), w[pre + "conv.bias"])
    g = pre + "linear_proj."
    y = linear(y, w[g + "linear_proj.weight"])
    y = gelu(layer_norm(y, w[g + "norm1.weight"], w[g + "norm1.bias"], 1e-5))
    y = linear(silu(linear(y, w[g + "gate_proj.weight"])) * linear(y, w[g + "dense_h_to_4h.weight"]),
               w[g + "dense_4h_to_h.weight"])
    boi = w[pre + "boi"].expand(batch, 1, -1)
    eoi = w[pre + "eoi"].expand(batch, 1, -1)
    return torch.cat([boi, y, eoi], 1) / vc["scaling_factor"]


def rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate dims (0,1), (2,3), ... of the first half of each head as complex numbers."""
    rot = x.shape[-1] // 2
    theta = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    z = torch.complex(x[..., 0:rot:2].double(), x[..., 1:rot:2].double())
    angle = positions.double()[:, None, :, None] * theta
    z = z * torch.polar(torch.ones_like(angle), angle)
    out = x.double().clone()
    out[..., 0:rot:2], out[..., 1:rot:2] = z.real, z.imag
    return out


def block_reference(w: Weights, config: dict[str, Any], i: int, x: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
    p, eps = f"transformer.encoder.layers.{i}.", config["layernorm_epsilon"]
    heads, groups, dim = config["num_attention_heads"], config["multi_query_group_num"], config["kv_channels"]
    batch, length, _ = x.shape
    qkv = linear(rms_norm(x, w[p + "input_layernorm.weight"], eps), w[p + "self_attention.query_key_value.weight"],
                 w[p + "self_attention.query_key_value.bias"])
    q = qkv[..., : heads * dim].reshape(batch, length, heads, dim).transpose(1, 2)
    k = qkv[..., heads * dim : (heads + groups) * dim].reshape(batch, length, groups, dim).transpose(1, 2)
    v = qkv[..., (heads + groups) * dim :].reshape(batch, length, groups, dim).transpose(1, 2)
    q, k = rope_reference(q, positions, 10000.0), rope_reference(k, positions, 10000.0)
    group_of_head = [h // (heads // groups) for h in range(heads)]
    a = attention(q, k[:, group_of_head], v[:, group_of_head], dim**-0.5, causal=True)
    x = x + linear(a.transpose(1, 2).reshape(batch, length, -1), w[p + "self_attention.dense.weight"])
    up = linear(rms_norm(x, w[p + "post_attention_layernorm.weight"], eps), w[p + "mlp.dense_h_to_4h.weight"])
    ffn = config["ffn_hidden_size"]
    return x + linear(silu(up[..., :ffn]) * up[..., ffn:], w[p + "mlp.dense_4h_to_h.weight"])


def forward_reference(w: Weights, config: dict[str, Any], ids: list[int], pixels: torch.Tensor | None,
                      num_image_tokens: int) -> torch.Tensor:
    """Logits of the original's forward for an UNEXPANDED prompt (boi, one placeholder, eoi)."""
    embeds = w["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]
    positions = torch.arange(len(ids))
    if pixels is not None:
        b, e = ids.index(config["boi_token_id"]), ids.index(config["eoi_token_id"])
        assert e - b == 2
        image = vision_reference(w, config, pixels.double())[0]
        embeds = torch.cat([embeds[:b], image, embeds[e + 1 :]])
        positions = torch.cat([positions[: b + 1], positions[b + 1].repeat(num_image_tokens), positions[e:]])
    x = embeds[None]
    for i in range(config["num_layers"]):
        x = block_reference(w, config, i, x, positions[None])
    x = rms_norm(x, w["transformer.encoder.final_layernorm.weight"], config["layernorm_epsilon"])
    return linear(x, w["transformer.output_layer.weight"])[0]


# --- the comparisons -------------------------------------------------------------------------------------------


def test_vision_tower_matches_reference(glm_adapter: Any, weights: Weights, photo: Any) -> None:
    pixels = glm_adapter.processor(text=["<|begin_of_image|><|endoftext|><|end_of_image|>"], images=[photo],
                                   return_tensors="pt")["pixel_values"]
    ours = torch.stack(glm_adapter.model.get_image_features(pixels))
    expected = vision_reference(weights, glm_adapter.config.to_dict(), pixels.double())
    assert ours.shape == (1, glm_adapter.config.num_image_tokens + 2, glm_adapter.config.hidden_size)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)


def test_rotary_matches_complex_rotation(glm_adapter: Any) -> None:
    from vlmserve.models.glm4v_9b.language import apply_glm_rotary

    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, glm_adapter.config.kv_channels)
    positions = torch.tensor([[0, 1, 2, 2, 7000], [3, 3, 3, 4, 5]])
    cos, sin = glm_adapter.model.text_model.rotary(positions, torch.float32)
    ours = apply_glm_rotary(x, cos, sin)
    torch.testing.assert_close(ours.double(), rope_reference(x, positions, 10000.0), rtol=1e-4, atol=1e-4)
    half = x.shape[-1] // 2
    assert torch.equal(ours[..., half:], x[..., half:])  # the second half of each head is not rotated


def test_one_decoder_block_matches_reference(glm_adapter: Any, weights: Weights) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 6, glm_adapter.config.hidden_size)
    positions = torch.tensor([[0, 1, 2, 2, 2, 3], [0, 1, 2, 3, 4, 5]])
    encoder = glm_adapter.model.text_model
    with torch.no_grad():
        ours = encoder.layers[1](x, position_embeddings=encoder.rotary(positions, x.dtype), attention_mask=None)
    expected = block_reference(weights, glm_adapter.config.to_dict(), 1, x.double(), positions)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_image", [True, False])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_full_forward_matches_reference(glm_checkpoint: Path, glm_adapter: Any, weights: Weights, photo: Any,
                                        with_image: bool, attn_implementation: str) -> None:
    processor, config = glm_adapter.processor, glm_adapter.config
    content: list[dict[str, Any]] = [{"type": "text", "text": "Describe the picture in one sentence."}]
    if with_image:
        content.append({"type": "image"})
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text], images=[photo] if with_image else None, return_tensors="pt")
    model = ChatGLMForConditionalGeneration.from_pretrained(glm_checkpoint, attn_implementation=attn_implementation)
    with torch.no_grad():
        ours = model(**inputs).logits[0]
    expected = forward_reference(weights, config.to_dict(), processor.encode(text, expand_images=False),
                                 inputs.get("pixel_values"), config.num_image_tokens)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)
