"""Qwen-VL-Chat as a transformers `PreTrainedModel`, with the published checkpoint's parameter names.

The language model is Qwen-7B: `transformer.wte`, blocks `transformer.h.N` (RMSNorm `ln_1`, fused `attn.c_attn`
with bias, `attn.c_proj` without, RMSNorm `ln_2`, SwiGLU `mlp.w1`/`mlp.w2`/`mlp.c_proj` where
`c_proj(w1(x) * silu(w2(x)))`), `transformer.ln_f` and an untied `lm_head`. Rotary embedding is the NeoX
"rotate half" kind on the first `rotary_dim` channels of each head, computed in float32.

Two long-context tricks of the original are kept:
- logn attention (`use_logn_attn`): a query at position p > seq_length is scaled by log(p + 1) / log(seq_length).
  It depends on the position alone, so every path here applies it exactly.
- dynamic NTK (`use_dynamic_ntk`): a prompt of L > seq_length tokens raises the rotary base by
  alpha ** (dim / (dim - 2)), alpha = 2 ** ceil(log2(L / seq_length) + 1) - 1, chosen at prefill and kept for
  the whole generation. `QwenVLChatForCausalLM.forward` does this per batch row (the generate path). The bare
  decoder (`text_model`, the paged path) has no notion of a prompt: it takes the factors as `ntk_alphas`, per
  token of a packed step, which the paged engine keeps per sequence from its prompt's length.

Attention runs through `ALL_ATTENTION_FUNCTIONS` with (batch, heads, tokens, head_dim) tensors after rotary and
logn scaling, so an engine can register its own (paged) attention.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from vlmserve.models import hf_compat
from vlmserve.models.qwen_vl_chat.config import QwenVLChatConfig
from vlmserve.models.qwen_vl_chat.visual import Resampler, VisionTransformer, sincos_2d_table


def dynamic_ntk_alpha(num_tokens: int, seq_length: int) -> float:
    """The original's NTK factor for a prompt of `num_tokens` tokens (1.0 up to seq_length)."""
    if num_tokens <= seq_length:
        return 1.0
    return float(max(2 ** math.ceil(math.log(num_tokens / seq_length, 2) + 1) - 1, 1))


def logn_scale(position_ids: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Per-token query scale of logn attention: log(p + 1) / log(seq_length) past seq_length, else 1."""
    count = (position_ids + 1).to(torch.float32)
    return torch.where(count > seq_length, torch.log(count) / math.log(seq_length), torch.ones_like(count))


class QwenRMSNorm(nn.Module):
    """RMSNorm normalising in float32, then casting back before the weight, as the original does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class QwenRotaryEmbedding(nn.Module):
    """cos/sin tables (batch, tokens, rotary_dim) in float32 for explicit positions and per-row NTK factors."""

    def __init__(self, config: QwenVLChatConfig) -> None:
        super().__init__()
        self.dim = config.rotary_dim
        self.base = float(config.rotary_emb_base)

    def inverse_frequencies(self, alpha: float, device: torch.device) -> torch.Tensor:
        base = self.base * alpha ** (self.dim / (self.dim - 2))
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

    def forward(self, position_ids: torch.Tensor, alphas: list[float] | torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`alphas`: one NTK factor per batch row (a list), or per token of a one-row packed batch (a tensor of
        shape (tokens,): the paged engine's rows of several sequences, each with its own factor)."""
        device = position_ids.device
        if isinstance(alphas, torch.Tensor):
            # the same float32 tables as per-row factors give, one per distinct factor, picked per token
            distinct, which = torch.unique(alphas, return_inverse=True)
            tables = torch.stack([self.inverse_frequencies(float(a), device) for a in distinct.tolist()])
            inv_freq = tables[which].unsqueeze(0)  # (1, tokens, dim / 2)
        elif alphas is None:
            inv_freq = self.inverse_frequencies(1.0, device).expand(position_ids.shape[0], -1).unsqueeze(1)
        else:
            inv_freq = torch.stack([self.inverse_frequencies(a, device) for a in alphas]).unsqueeze(1)
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq
        table = torch.cat([freqs, freqs], dim=-1)
        return table.cos(), table.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x (B, heads, T, D) in float32; pass the rest through."""
    rot_dim = cos.shape[-1]
    rotated, passed = x[..., :rot_dim].float(), x[..., rot_dim:]
    first, second = rotated.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), passed], dim=-1)


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention (the "eager" implementation); keys and values have every query head."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class QwenAttention(nn.Module):
    """Self-attention with the fused `c_attn` (q, k, v blocks in that order) and the output `c_proj`."""

    def __init__(self, config: QwenVLChatConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.is_causal = True
        projection = self.num_heads * self.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection)
        self.c_proj = nn.Linear(projection, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                query_scale: torch.Tensor | None, attention_mask: torch.Tensor | None,
                past_key_values: Cache | None = None, **kwargs: Any) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, self.num_heads, self.head_dim)
        query, key, value = (t.view(shape).transpose(1, 2) for t in self.c_attn(hidden_states).chunk(3, dim=-1))
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if query_scale is not None:
            query = query * query_scale[:, None, :, None].to(query.dtype)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention = hf_compat.attention_function(self.config, eager_attention)
        output, _ = attention(self, query, key, value, attention_mask,
                              dropout=self.config.attn_dropout_prob if self.training else 0.0,
                              scaling=self.scaling, **kwargs)
        return self.c_proj(output.reshape(batch, tokens, -1))


class QwenMLP(nn.Module):
    """SwiGLU: `w2` is the gated (SiLU) branch, `w1` the linear one, each intermediate_size // 2 wide."""

    def __init__(self, config: QwenVLChatConfig) -> None:
        super().__init__()
        bias = not config.no_bias
        self.w1 = nn.Linear(config.hidden_size, config.mlp_hidden_size, bias=bias)
        self.w2 = nn.Linear(config.hidden_size, config.mlp_hidden_size, bias=bias)
        self.c_proj = nn.Linear(config.mlp_hidden_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QwenBlock(nn.Module):
    """Pre-norm decoder block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: QwenVLChatConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = QwenRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QwenAttention(config, layer_idx)
        self.ln_2 = QwenRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QwenMLP(config)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), **kwargs)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class QwenVLChatPreTrainedModel(PreTrainedModel):
    """Shared plumbing: config class, weight init and the attention backends the model accepts."""

    config_class = QwenVLChatConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["QwenBlock", "VisualBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, QwenRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, nn.MultiheadAttention):
            module.in_proj_weight.normal_(0.0, std)
            module.in_proj_bias.zero_()
        elif isinstance(module, Resampler):
            module.query.normal_(0.0, 0.02)
            side = math.isqrt(module.query.shape[0])
            module.pos_embed.copy_(torch.from_numpy(sincos_2d_table(module.query.shape[1], side)))
        elif isinstance(module, VisionTransformer):
            module.positional_embedding.normal_(0.0, module.positional_embedding.shape[1] ** -0.5)
            module.proj.normal_(0.0, module.proj.shape[0] ** -0.5)


class QwenVLChatModel(QwenVLChatPreTrainedModel):
    """`transformer`: the token embeddings, the decoder blocks, the final norm and the vision tower.

    Its forward is the text decoder alone (embeddings in, hidden states out); the vision tower is driven by
    `QwenVLChatForCausalLM.get_image_features`.
    """

    def __init__(self, config: QwenVLChatConfig) -> None:
        super().__init__(config)
        self.wte: nn.Module = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(QwenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = QwenRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.visual = VisionTransformer(config.visual, config.num_image_queries)
        self.rotary_emb = QwenRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.wte = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                ntk_alphas: list[float] | torch.Tensor | None = None, **kwargs: Any) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        past_key_values = hf_compat.cache_argument(past_key_values, kwargs)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        positions: torch.Tensor
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            positions = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        else:  # (rows, batch, tokens) has a single row in this family
            positions = position_ids[0] if position_ids.dim() == 3 else position_ids
        mask = hf_compat.causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     cache_value=past_key_values, position_ids=positions)
        rows = positions.expand(inputs_embeds.shape[0], -1)
        position_embeddings = self.rotary_emb(rows, ntk_alphas)
        query_scale = logn_scale(rows, self.config.seq_length) if self.config.use_logn_attn else None
        hidden = inputs_embeds
        for block in self.h:
            hidden = block(hidden, position_embeddings=position_embeddings, query_scale=query_scale,
                           attention_mask=mask, past_key_values=past_key_values, position_ids=positions,
                           **kwargs)
        return hf_compat.with_cache(BaseModelOutputWithPast, past_key_values, last_hidden_state=self.ln_f(hidden))


class QwenVLChatForCausalLM(QwenVLChatPreTrainedModel, GenerationMixin):
    """The whole model: `transformer` (decoder + vision tower) and `lm_head`, usable with `generate`."""

    def __init__(self, config: QwenVLChatConfig) -> None:
        super().__init__(config)
        self.transformer = QwenVLChatModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Per-row NTK factors chosen at the last prefill, kept for the decode steps that follow it.
        self._ntk_alphas: list[float] | None = None
        self.post_init()

    @property
    def text_model(self) -> QwenVLChatModel:
        return self.transformer

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """One (num_image_queries, hidden_size) tensor per image of `pixel_values` (N, 3, S, S)."""
        return list(self.transformer.visual(pixel_values.to(self.dtype)).unbind(0))

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                             pixel_values: torch.Tensor) -> torch.Tensor:
        """Put image i's features on the i-th run of <imgpad> tokens (row-major over the batch)."""
        features = torch.cat(self.get_image_features(pixel_values)).to(inputs_embeds.dtype)
        slots = (input_ids == self.config.image_pad_id).unsqueeze(-1)
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"{int(slots.sum())} <imgpad> tokens but {features.shape[0]} image features")
        return inputs_embeds.masked_scatter(slots, features)

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.transformer.wte(input_ids)
            if pixel_values is not None:
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, pixel_values)
        past_key_values = hf_compat.cache_argument(past_key_values, kwargs)
        output = self.transformer(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                  ntk_alphas=self._ntk_factors(inputs_embeds, attention_mask, past_key_values),
                                  **kwargs)
        hidden = output.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return hf_compat.with_cache(CausalLMOutputWithPast, hf_compat.output_cache(output), logits=self.lm_head(hidden))

    def _ntk_factors(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                     past_key_values: Cache | None) -> list[float] | None:
        if not self.config.use_dynamic_ntk:
            return None
        batch, tokens = inputs_embeds.shape[:2]
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            # A prefill: each row's factor follows its own prompt length (padding excluded).
            lengths = attention_mask.sum(-1).tolist() if attention_mask is not None and attention_mask.dim() == 2 \
                else [tokens] * batch
            self._ntk_alphas = [dynamic_ntk_alpha(int(n), self.config.seq_length) for n in lengths]
        alphas = self._ntk_alphas
        if alphas is None or len(alphas) != batch or all(a == 1.0 for a in alphas):
            return None
        return alphas
