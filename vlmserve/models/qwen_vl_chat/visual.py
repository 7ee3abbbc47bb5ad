"""Qwen-VL's vision tower: a ViT-bigG-style encoder and a cross-attention resampler to a fixed number of queries.

Module and parameter names follow the published checkpoint (`transformer.visual.*`):

- `conv1` (patch embedding, no bias), `positional_embedding` (a learned 16x16 grid, 256 rows, resized bicubically
  to the actual patch grid on every call), `ln_pre`;
- `transformer.resblocks.N`: pre-norm blocks with `ln_1`, `attn.in_proj` / `attn.out_proj`, `ln_2`,
  `mlp.c_fc` -> exact GELU -> `mlp.c_proj`. The fused qkv projection is laid out per head:
  [head0 q, head0 k, head0 v, head1 q, ...], unlike torch's MultiheadAttention;
- `attn_pool` (the resampler): learned `query` rows with fixed 2-D sin-cos `pos_embed`, `kv_proj` (no bias),
  `ln_q`, `ln_kv` and a torch MultiheadAttention `attn` with output_dim // 128 heads. Queries get `pos_embed`,
  keys get `pos_embed` resized to the patch grid, values get nothing;
- `ln_post` and `proj`, applied as `x @ proj` (not a Linear: the matrix is used untransposed).

All LayerNorms use eps 1e-6.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: rows of the learned patch position table in the published tower (a 16x16 grid, whatever the image size)
POSITION_GRID_ROWS = 256
LAYER_NORM_EPS = 1e-6


def resize_grid_embedding(table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """A (side*side, C) position table resized bicubically to a (s*s, C) one for s*s == num_tokens.

    The interpolation runs in float32 and the result comes back in the table's dtype, as in the original.
    """
    source = int(math.sqrt(table.shape[0]))
    target = int(math.sqrt(num_tokens))
    if source == target:
        return table
    grid = table.float().reshape(1, source, source, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(target, target), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(target * target, -1).to(table.dtype)


def sincos_2d_table(dim: int, side: int) -> np.ndarray:
    """Fixed (side*side, dim) 2-D sin-cos table (MAE style): first half encodes the column, second the row."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embeddings need a width divisible by 4, got {dim}")
    # meshgrid with columns first: coords[0] varies along a row (x), coords[1] down the columns (y)
    coords = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
    halves = [_sincos_1d(dim // 2, c.reshape(-1)) for c in coords]
    return np.concatenate(halves, axis=1)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    frequencies = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
    angles = np.outer(positions, frequencies)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


class VisualSelfAttention(nn.Module):
    """Multi-head self-attention with the checkpoint's per-head interleaved qkv projection."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"vision width {width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        # (B, T, heads, 3, head_dim): each head's q, k and v sit next to each other in the fused output
        qkv = self.in_proj(x).view(batch, tokens, self.num_heads, 3, self.head_dim)
        query, key, value = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        # NOTE: plain SDPA on purpose: the engines swap the *text* model's attention, never the vision tower's.
        out = F.scaled_dot_product_attention(query, key, value)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class VisualBlock(nn.Module):
    """One pre-norm encoder block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        mlp_width = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = VisualSelfAttention(width, num_heads)
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualEncoder(nn.Module):
    """The stack of blocks, named `transformer.resblocks` in the checkpoint."""

    def __init__(self, width: int, num_layers: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(width, num_heads, mlp_ratio) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class Resampler(nn.Module):
    """Cross-attention from `num_queries` learned queries to the patch features (the checkpoint's `attn_pool`)."""

    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int) -> None:
        super().__init__()
        side = int(math.sqrt(num_queries))
        if side * side != num_queries:
            raise ValueError(f"the resampler needs a square number of queries, got {num_queries}")
        # Fixed, but stored in the checkpoint (a parameter without gradient in the original).
        table = torch.from_numpy(sincos_2d_table(embed_dim, side)).float()
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj: nn.Module = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, embed_dim // 128, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key_pos = resize_grid_embedding(self.pos_embed, x.shape[1])
        x = self.ln_kv(self.kv_proj(x))
        queries = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(x.shape[0], -1, -1)
        out, _ = self.attn(queries, x + key_pos, x, need_weights=False)
        return out


class VisionTransformer(nn.Module):
    """Images (B, 3, S, S), CLIP-normalised, to (B, num_queries, output_dim) features for the language model."""

    def __init__(self, visual: dict[str, Any], num_queries: int) -> None:
        super().__init__()
        width = int(visual["width"])
        patch_size = int(visual["patch_size"])
        output_dim = int(visual["output_dim"])
        self.image_size = int(visual["image_size"])
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(POSITION_GRID_ROWS, width))
        self.ln_pre = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = VisualEncoder(width, int(visual["layers"]), int(visual["heads"]),
                                         float(visual["mlp_ratio"]))
        self.attn_pool = Resampler(num_queries, output_dim, kv_dim=width)
        self.ln_post = nn.LayerNorm(output_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(torch.zeros(output_dim, output_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, patches, width), patches in row-major order
        x = x + resize_grid_embedding(self.positional_embedding, x.shape[1])
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(self.attn_pool(x))
        return x @ self.proj
