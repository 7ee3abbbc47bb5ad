"""Straightforward float64 re-computations of Qwen-VL-Chat, written from the published description only.

These work on the raw checkpoint tensors (a name -> tensor dict) and the raw config.json dict, never on
vlmserve's modules, so a mistake in the port does not cancel itself out. They favour plainness over speed: the
patch embedding is an unfold + matmul, attention is an explicit softmax per head, rotary embedding rotates channel
pairs (i, i + d/2) with angles computed in float64, logn and NTK factors follow the original's formulas.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _w(state: dict[str, Tensor], name: str) -> Tensor:
    return state[name].to(torch.float64)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """q (Tq, d), k/v (Tk, d): softmax(q k^T / sqrt(d)) v, optionally causal (query i sees keys <= i)."""
    scores = q @ k.T / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
    return (weights / weights.sum(-1, keepdim=True)) @ v


def resize_table(table: Tensor, num_tokens: int) -> Tensor:
    """The original's get_abs_pos: a square position table resized bicubically (align_corners=False)."""
    source, target = math.isqrt(table.shape[0]), math.isqrt(num_tokens)
    if source == target:
        return table
    grid = table.reshape(1, source, source, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(target, target), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(target * target, -1).to(table.dtype)


def sincos_entry(dim: int, side: int, row: int, col: int, channel: int) -> float:
    """One entry of the 2-D sin-cos table: channels [0, dim/2) encode the column, [dim/2, dim) the row."""
    half = dim // 2
    coordinate = col if channel < half else row
    c = channel % half
    quarter = half // 2
    omega = 1.0 / 10000 ** ((c % quarter) / quarter)
    return math.sin(coordinate * omega) if c < quarter else math.cos(coordinate * omega)


def vision_reference(state: dict[str, Tensor], visual: dict[str, Any], pixels: Tensor) -> Tensor:
    """(N, 3, S, S) images -> (N, queries, output_dim) features."""
    p = "transformer.visual."
    patch, width, heads = visual["patch_size"], visual["width"], visual["heads"]
    x = pixels.to(torch.float64)
    patches = F.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2)  # (N, T, 3*p*p), row-major
    x = patches @ _w(state, p + "conv1.weight").reshape(width, -1).T
    x = x + resize_table(_w(state, p + "positional_embedding"), x.shape[1])
    x = layer_norm(x, _w(state, p + "ln_pre.weight"), _w(state, p + "ln_pre.bias"))
    for layer in range(visual["layers"]):
        x = _vision_block(state, f"{p}transformer.resblocks.{layer}.", x, heads)
    features = torch.stack([resampler_reference(state, p + "attn_pool.", image) for image in x])
    features = layer_norm(features, _w(state, p + "ln_post.weight"), _w(state, p + "ln_post.bias"))
    return features @ _w(state, p + "proj")


def _vision_block(state: dict[str, Tensor], p: str, x: Tensor, heads: int) -> Tensor:
    h = layer_norm(x, _w(state, p + "ln_1.weight"), _w(state, p + "ln_1.bias"))
    qkv = h @ _w(state, p + "attn.in_proj.weight").T + _w(state, p + "attn.in_proj.bias")
    head_dim = x.shape[-1] // heads
    outputs = []
    for image in qkv:  # (T, 3 * width), laid out per head as [q, k, v]
        per_head = image.reshape(image.shape[0], heads, 3 * head_dim)
        outputs.append(torch.cat([attend(per_head[:, i, :head_dim], per_head[:, i, head_dim:2 * head_dim],
                                         per_head[:, i, 2 * head_dim:], causal=False) for i in range(heads)], -1))
    x = x + torch.stack(outputs) @ _w(state, p + "attn.out_proj.weight").T + _w(state, p + "attn.out_proj.bias")
    h = layer_norm(x, _w(state, p + "ln_2.weight"), _w(state, p + "ln_2.bias"))
    h = gelu(h @ _w(state, p + "mlp.c_fc.weight").T + _w(state, p + "mlp.c_fc.bias"))
    return x + h @ _w(state, p + "mlp.c_proj.weight").T + _w(state, p + "mlp.c_proj.bias")


def resampler_reference(state: dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    """x (T, width) -> (queries, output_dim): one cross-attention from learned queries to the patches."""
    kv = layer_norm(x @ _w(state, p + "kv_proj.weight").T, _w(state, p + "ln_kv.weight"),
                    _w(state, p + "ln_kv.bias"))
    pos = _w(state, p + "pos_embed")
    q = layer_norm(_w(state, p + "query"), _w(state, p + "ln_q.weight"), _w(state, p + "ln_q.bias")) + pos
    k = kv + resize_table(pos, kv.shape[0])
    wq, wk, wv = _w(state, p + "attn.in_proj_weight").chunk(3)
    bq, bk, bv = _w(state, p + "attn.in_proj_bias").chunk(3)
    q, k, v = q @ wq.T + bq, k @ wk.T + bk, kv @ wv.T + bv
    heads = q.shape[-1] // 128
    d = q.shape[-1] // heads
    out = torch.cat([attend(q[:, i * d:(i + 1) * d], k[:, i * d:(i + 1) * d], v[:, i * d:(i + 1) * d], False)
                     for i in range(heads)], -1)
    return out @ _w(state, p + "attn.out_proj.weight").T + _w(state, p + "attn.out_proj.bias")


def ntk_alpha(prompt_len: int, seq_length: int) -> float:
    """The original: alpha = max(2 ** ceil(log2(L / seq_length) + 1) - 1, 1)."""
    return max(2 ** math.ceil(math.log(prompt_len / seq_length, 2) + 1) - 1, 1)


def rotate(x: Tensor, positions: list[int], base: float, rot_dim: int) -> Tensor:
    """x (T, D): channel pairs (i, i + rot_dim/2) turned by position * base ** (-2i / rot_dim); the rest kept."""
    half = rot_dim // 2
    exponents = torch.tensor([-2.0 * i / rot_dim for i in range(half)], dtype=torch.float64)
    theta = torch.tensor(positions, dtype=torch.float64)[:, None] * torch.pow(torch.tensor(base, dtype=torch.float64),
                                                                              exponents)[None, :]
    a, b = x[:, :half], x[:, half:rot_dim]
    turned_a = a * torch.cos(theta) - b * torch.sin(theta)
    turned_b = b * torch.cos(theta) + a * torch.sin(theta)
    return torch.cat([turned_a, turned_b, x[:, rot_dim:]], dim=-1)


def block_reference(state: dict[str, Tensor], config: dict[str, Any], layer: int, x: Tensor,
                    positions: list[int], alpha: float = 1.0) -> Tensor:
    """One decoder block over a whole causal sequence x (T, H) with the given positions."""
    p = f"transformer.h.{layer}."
    eps, heads, d = config["layer_norm_epsilon"], config["num_attention_heads"], config["kv_channels"]
    rot_dim = d if config["rotary_pct"] == 1.0 else int(d * config["rotary_pct"])
    base = config["rotary_emb_base"] * alpha ** (rot_dim / (rot_dim - 2))
    seq_length = config["seq_length"]
    logn = [math.log(pos + 1, seq_length) if config["use_logn_attn"] and pos + 1 > seq_length else 1.0
            for pos in positions]
    h = rms_norm(x, _w(state, p + "ln_1.weight"), eps)
    q, k, v = (h @ _w(state, p + "attn.c_attn.weight").T + _w(state, p + "attn.c_attn.bias")).chunk(3, -1)
    heads_out = []
    for i in range(heads):
        qi = rotate(q[:, i * d:(i + 1) * d], positions, base, rot_dim) * torch.tensor(logn, dtype=x.dtype)[:, None]
        ki = rotate(k[:, i * d:(i + 1) * d], positions, base, rot_dim)
        heads_out.append(attend(qi, ki, v[:, i * d:(i + 1) * d], causal=True))
    x = x + torch.cat(heads_out, -1) @ _w(state, p + "attn.c_proj.weight").T
    h = rms_norm(x, _w(state, p + "ln_2.weight"), eps)
    gate = h @ _w(state, p + "mlp.w2.weight").T
    up = h @ _w(state, p + "mlp.w1.weight").T
    return x + (up * gate * torch.sigmoid(gate)) @ _w(state, p + "mlp.c_proj.weight").T


def logits_reference(state: dict[str, Tensor], config: dict[str, Any], input_ids: list[int],
                     pixels: Tensor | None = None, alpha: float | None = None) -> Tensor:
    """(T, vocab) logits of one unpadded sequence; images fill the positions strictly between <img> and </img>.

    `alpha` defaults to the NTK factor of the whole sequence (what the original computes without a cache).
    """
    x = _w(state, "transformer.wte.weight")[torch.tensor(input_ids)]
    start, end = config["visual"]["image_start_id"], config["visual"]["image_start_id"] + 1
    if pixels is not None:
        features = vision_reference(state, config["visual"], pixels)
        opens = [i for i, t in enumerate(input_ids) if t == start]
        closes = [i for i, t in enumerate(input_ids) if t == end]
        for image, (a, b) in enumerate(zip(opens, closes, strict=True)):
            x[a + 1:b] = features[image]
    if alpha is None:
        alpha = ntk_alpha(len(input_ids), config["seq_length"]) if config["use_dynamic_ntk"] else 1.0
    positions = list(range(len(input_ids)))
    for layer in range(config["num_hidden_layers"]):
        x = block_reference(state, config, layer, x, positions, alpha)
    x = rms_norm(x, _w(state, "transformer.ln_f.weight"), config["layer_norm_epsilon"])
    return x @ _w(state, "lm_head.weight").T
