"""GLM-4V-9B's language model: the GLM-4-9B decoder as the original `modeling_chatglm.py` computes it.

Facts this module reproduces (checked against the published code and serving ports):

- RMSNorm in float32 with eps `layernorm_epsilon` (1.5625e-07 in the checkpoint); the weight multiplies in float32
  and the result is cast back to the input dtype;
- `query_key_value` is one Linear (with bias when `add_qkv_bias`) whose output splits into
  [32 query heads x 128 | 2 key groups x 128 | 2 value groups x 128] (multi-query attention with groups);
- rotary embedding on the first half of every head's dims only (64 of 128), rotating interleaved pairs
  (d0, d1), (d2, d3), ... by position * base^(-2i/64) with base = 10000 * rope_ratio; the other half passes through;
- scaled dot-product attention with scale 1/sqrt(head_dim), causal;
- `dense_h_to_4h` makes 2 x ffn_hidden_size; the first half is the gate: silu(a) * b, then `dense_4h_to_h`;
- pre-norm residual blocks; a final RMSNorm (`final_layernorm`) when `post_layer_norm`.

Attention runs through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` with (batch, heads, tokens, head_dim)
tensors after rotary, `module.layer_idx` and `module.num_key_value_groups` set, so the paged engine can swap in its
own attention without knowing this architecture.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from vlmserve.models import hf_compat
from vlmserve.models.glm4v_9b.config import ChatGLMConfig


class GlmRMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, weight applied before casting back."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


class GlmRotaryEmbedding(nn.Module):
    """cos/sin for ChatGLM's partial, interleaved rotary embedding."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.rotary_dim = config.kv_channels // 2
        self.base = 10000.0 * float(config.rope_ratio)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin of shape (B, 1, T, rotary_dim / 2), in `dtype`."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = 1.0 / (self.base ** (exponents / self.rotary_dim))
        angles = position_ids.float()[..., None] * inv_freq  # (B, T, rotary_dim / 2)
        # NOTE: the original caches cos/sin in the model dtype (bf16 on GPU) before multiplying; so do we.
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_glm_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the first 2 * cos.shape[-1] dims of x (B, heads, T, head_dim)."""
    rot = 2 * cos.shape[-1]
    pairs = x[..., :rot].unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x[..., rot:]), dim=-1)


def _repeat_kv(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    return x if num_groups == 1 else x.repeat_interleave(num_groups, dim=1)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention for `_attn_implementation == "eager"`; softmax in float32 like the original."""
    groups = int(module.num_key_value_groups)  # type: ignore[arg-type]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None and query.shape[2] > 1:
        q_len, kv_len = query.shape[2], key.shape[2]
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = F.softmax(scores.float(), dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class SelfAttention(nn.Module):
    """ChatGLM self-attention with grouped (multi-query) keys and values."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.kv_channels
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        projection = self.num_heads * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, projection + 2 * self.num_kv_heads * self.head_dim,
                                         bias=config.add_bias_linear or config.add_qkv_bias)
        self.dense = nn.Linear(projection, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: Any = None, past_key_values: Any = None, **kwargs: Any) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        query, key, value = self.query_key_value(hidden_states).split([q_size, kv_size, kv_size], dim=-1)
        query = query.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key = key.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = value.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_glm_rotary(query, cos, sin), apply_glm_rotary(key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention = hf_compat.attention_function(self.config, eager_attention_forward)
        dropout = self.config.attention_dropout if self.training else 0.0
        output, _ = attention(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling,
                              **kwargs)
        return self.dense(output.reshape(batch, length, -1))


class MLP(nn.Module):
    """SwiGLU: `dense_h_to_4h` -> [gate | up] -> silu(gate) * up -> `dense_4h_to_h`."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


def _norm(config: ChatGLMConfig) -> nn.Module:
    if config.rmsnorm:
        return GlmRMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class GLMBlock(nn.Module):
    """One decoder layer (`transformer.encoder.layers.N`)."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.post_norm_residual = config.apply_residual_connection_post_layernorm
        self.input_layernorm = _norm(config)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        residual = normed if self.post_norm_residual else hidden_states
        hidden_states = residual + self.self_attention(normed, **kwargs)
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.post_norm_residual else hidden_states
        return residual + self.mlp(normed)


class GLMTransformer(nn.Module):
    """The decoder stack (`transformer.encoder`); also the paged engine's `text_model`.

    Call as `encoder(inputs_embeds=(B, T, H), position_ids=(B, T))`; returns `BaseModelOutputWithPast` whose
    `last_hidden_state` has the final norm applied.
    """

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        if config.post_layer_norm:
            self.final_layernorm = _norm(config)
        self.rotary = GlmRotaryEmbedding(config)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: Any = None, past_key_values: Any = None, **kwargs: Any) -> BaseModelOutputWithPast:
        kwargs.pop("use_cache", None)  # the cache object itself says whether to cache
        past_key_values = hf_compat.cache_argument(past_key_values, kwargs)
        if position_ids is None:
            # NOTE: plain positions are right only without images before; image prompts always pass positions
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past
        if position_ids.ndim == 3:  # (rows, B, T): this family has a single row
            position_ids = position_ids[0]
        if isinstance(attention_mask, dict):
            mask = attention_mask["full_attention"]
        else:
            # NOTE: positions are not passed: image tokens share one position, which would look like packed
            # sequences to the mask builder; the mask here is causal by token index.
            mask = hf_compat.causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, cache_value=past_key_values,
                                         position_ids=None)
        position_embeddings = self.rotary(position_ids, inputs_embeds.dtype)
        hidden_states = inputs_embeds
        for layer in self.layers:
            # NOTE: position_ids stay out of the attention kwargs: flash-style kernels read jumps in them as
            # boundaries of packed sequences, and image rows repeat one position.
            hidden_states = layer(hidden_states, position_embeddings=position_embeddings, attention_mask=mask,
                                  past_key_values=past_key_values, **kwargs)
        if self.config.post_layer_norm:
            hidden_states = self.final_layernorm(hidden_states)
        return hf_compat.with_cache(BaseModelOutputWithPast, past_key_values,
                                    last_hidden_state=cast(torch.FloatTensor, hidden_states))
