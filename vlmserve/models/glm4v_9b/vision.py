"""GLM-4V-9B's vision tower: an EVA2-CLIP ViT, a 2x2 stride-2 convolution and a gated projection into the LM.

Module and parameter names follow the original `visual.py` so the checkpoint's `transformer.vision.*` tensors
load unchanged. Facts the layout depends on (checked against the published code and module tree):

- patches: Conv2d(3, 1792, 14, stride 14); a learned CLS row is prepended and a learned position table of
  (80*80 + 1) rows is *added* (no interpolation: the input size is fixed at 1120x1120);
- each of the 63 layers is post-norm inside the residual: x + LN(attn(x)), then x + LN(mlp(x));
  attention is bidirectional over all 6401 rows; the MLP is fc1 -> GELU -> fc2;
- the CLS row is dropped, the 80x80 grid goes through Conv2d(1792, 4096, 2, stride 2) to 40x40 = 1600 rows,
  then the GLU: linear_proj -> LayerNorm -> GELU -> silu(gate_proj(x)) * dense_h_to_4h(x) -> dense_4h_to_h;
- learned begin/end-of-image rows are put around the 1600 rows and everything is divided by `scaling_factor`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from vlmserve.models.glm4v_9b.config import ChatGLMConfig


class PatchEmbedding(nn.Module):
    """Patch convolution, CLS row and the absolute position table."""

    def __init__(self, vision: dict) -> None:
        super().__init__()
        hidden = vision["hidden_size"]
        self.proj = nn.Conv2d(vision["in_channels"], hidden, kernel_size=vision["patch_size"],
                              stride=vision["patch_size"])
        self.cls_embedding = nn.Parameter(torch.zeros(1, hidden))
        self.position_embedding = nn.Embedding(vision["num_positions"], hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.proj(images).flatten(2).transpose(1, 2)  # (B, grid*grid, hidden)
        cls = self.cls_embedding.expand(patches.shape[0], -1, -1)
        rows = torch.cat((cls, patches), dim=1)
        return rows + self.position_embedding.weight.unsqueeze(0)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with a fused (q, k, v) projection laid out [q heads | k heads | v heads]."""

    def __init__(self, vision: dict) -> None:
        super().__init__()
        hidden = vision["hidden_size"]
        self.num_heads = vision["num_heads"]
        self.head_dim = hidden // self.num_heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.query_key_value(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class VisionMLP(nn.Module):
    """fc1 -> activation (`hidden_act`, GELU in the checkpoint) -> fc2."""

    def __init__(self, vision: dict) -> None:
        super().__init__()
        self.activation_fn = ACT2FN[vision["hidden_act"]]
        self.fc1 = nn.Linear(vision["hidden_size"], vision["intermediate_size"])
        self.fc2 = nn.Linear(vision["intermediate_size"], vision["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class VisionLayer(nn.Module):
    """One EVA2-CLIP layer; NOTE: the norms sit on the branch outputs, not on the branch inputs."""

    def __init__(self, vision: dict) -> None:
        super().__init__()
        eps = vision["layer_norm_eps"]
        self.input_layernorm = nn.LayerNorm(vision["hidden_size"], eps=eps)
        self.attention = VisionAttention(vision)
        self.mlp = VisionMLP(vision)
        self.post_attention_layernorm = nn.LayerNorm(vision["hidden_size"], eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class VisionTransformer(nn.Module):
    """The stack of EVA2-CLIP layers (`transformer.vision.transformer.layers.N`)."""

    def __init__(self, vision: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(vision) for _ in range(vision["num_hidden_layers"])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """The projection into the language model's width (named `linear_proj` in the checkpoint)."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        hidden, ffn = config.hidden_size, config.ffn_hidden_size
        self.linear_proj = nn.Linear(hidden, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)  # NOTE: torch's default eps (1e-5), as in the original
        self.act1 = nn.GELU()
        self.dense_h_to_4h = nn.Linear(hidden, ffn, bias=False)
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """Pixels (B, 3, S, S) -> (B, 1 + grid/2 * grid/2 + 1, hidden): boi row, image rows, eoi row."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        vision = config.vision_config
        self.patch_embedding = PatchEmbedding(vision)
        self.transformer = VisionTransformer(vision)
        self.linear_proj = GLU(config)
        self.conv = nn.Conv2d(vision["hidden_size"], config.hidden_size, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.scaling_factor = float(vision["scaling_factor"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.patch_embedding(images))[:, 1:]  # drop the CLS row
        batch, length, width = x.shape
        grid = round(length**0.5)
        # rows are the patch grid in row-major order: back to (B, C, grid, grid) for the 2x2 convolution
        x = self.conv(x.reshape(batch, grid, grid, width).permute(0, 3, 1, 2))
        x = self.linear_proj(x.flatten(2).transpose(1, 2))
        x = torch.cat((self.boi.expand(batch, -1, -1), x, self.eoi.expand(batch, -1, -1)), dim=1)
        return x / self.scaling_factor
