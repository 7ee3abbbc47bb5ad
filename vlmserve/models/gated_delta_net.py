"""Qwen3.5's gated delta-net (linear attention) layers on a packed ragged step.

The model's own forward runs one batch of equal-length rows against a transformers cache object. The paged engine
instead hands a layer the step's rows of several sequences back to back, each at its own point of its prompt or
generation, with each sequence's state (the convolution's left context and the delta-rule state) gathered from the
engine's slot pool. This module runs the same computation per sequence from those states, with the module's own
weights, its own norm and the model's own delta-rule functions (`hf_compat.gated_delta_rules`):

    qkv = silu(causal depthwise conv(in_proj_qkv(x)))        (left context: the sequence's conv state)
    beta = sigmoid(in_proj_b(x)),  g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)
    o, state = gated delta rule(l2norm(q), l2norm(k), v, g, beta, state)     (chunked for prompt chunks,
                                                                            token by token for single rows)
    y = out_proj(norm(o, gate=in_proj_z(x)))

Single-row sequences (decode) run as one batch; longer chunks run one sequence at a time (a reference
implementation: correctness first, see the NOTE in `packed_forward`). The per-layer load-time self-check
(`engine.paged_check`) compares the result with the model's own `generate`, so a transformers release that changes
the layer's math is refused rather than served wrong.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vlmserve.models import hf_compat
from vlmserve.models.base import RecurrentLayout


def recurrent_layout(decoder: torch.nn.Module) -> RecurrentLayout | None:
    """The per-sequence state of the decoder's gated delta-net layers; None where it has none."""
    modules = hf_compat.linear_attention_modules(decoder)
    if not modules:
        return None
    first: Any = next(iter(modules.values()))
    kernel = int(first.conv1d.kernel_size[0])
    return RecurrentLayout(layers=tuple(modules), conv_shape=(int(first.conv_dim), kernel - 1),
                           state_shape=(int(first.num_v_heads), int(first.head_k_dim), int(first.head_v_dim)))


def packed_forward(module: Any, hidden: torch.Tensor, segments: list[tuple[int, int]],
                   conv: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ModelAdapter.run_recurrent` for one gated delta-net layer: `hidden` (rows, hidden), sequence i at rows
    `segments[i]` from `conv[i]` (channels, kernel - 1) and `state[i]` (heads, key dim, value dim); returns
    (output rows, conv states after, delta-rule states after)."""
    chunk_rule, token_rule = hf_compat.gated_delta_rules(module)
    mixed = module.in_proj_qkv(hidden)  # (rows, channels)
    beta = module.in_proj_b(hidden).sigmoid()
    g = -module.A_log.float().exp() * F.softplus(module.in_proj_a(hidden).float() + module.dt_bias)
    core = hidden.new_empty(hidden.shape[0], module.num_v_heads, module.head_v_dim)
    new_conv, new_state = torch.empty_like(conv), torch.empty_like(state)
    singles = [i for i, (start, end) in enumerate(segments) if end - start == 1]
    # NOTE: sequences with several rows (prompt chunks) run one at a time; a varlen kernel (FLA's cu_seqlens
    # entry points) would take them in one call. Decode rows, the common case, run as one batch.
    groups = [singles] + [[i] for i, (start, end) in enumerate(segments) if end - start > 1]
    for group in groups:
        if not group:
            continue
        length = segments[group[0]][1] - segments[group[0]][0]
        first = segments[group[0]][0]
        rows = (torch.arange(first, first + length, device=hidden.device) if length > 1
                else torch.tensor([segments[i][0] for i in group], device=hidden.device))
        qkv, new_conv[group] = _causal_conv(module, mixed[rows].view(len(group), length, -1), conv[group])
        query, key, value = _split_heads(module, qkv)
        rule = token_rule if length == 1 else chunk_rule
        out, final = rule(query, key, value, g=g[rows].view(len(group), length, -1),
                          beta=beta[rows].view(len(group), length, -1), initial_state=state[group],
                          output_final_state=True, use_qk_l2norm_in_kernel=True)
        core[rows] = out.reshape(-1, module.num_v_heads, module.head_v_dim).to(core.dtype)
        new_state[group] = final.to(new_state.dtype)
    gate = module.in_proj_z(hidden).reshape(-1, module.head_v_dim)
    normed = module.norm(core.reshape(-1, module.head_v_dim), gate)
    return module.out_proj(normed.reshape(hidden.shape[0], -1)), new_conv, new_state


def _causal_conv(module: Any, mixed: torch.Tensor, conv: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences, rows, channels) inputs after their (sequences, channels, kernel - 1) left context → the
    activated convolution output (sequences, rows, channels) and the new left context."""
    window = torch.cat([conv.to(mixed.dtype), mixed.transpose(1, 2)], dim=-1)
    weight = module.conv1d.weight
    out = F.conv1d(window.to(weight.dtype), weight, module.conv1d.bias, groups=window.shape[1])
    if module.activation not in ("silu", "swish"):
        raise NotImplementedError(f"gated delta-net with a {module.activation} convolution activation")
    return F.silu(out).to(mixed.dtype).transpose(1, 2), window[:, :, window.shape[-1] - conv.shape[-1]:]


def _split_heads(module: Any, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequences, rows, channels) → query, key, value (sequences, rows, value heads, dim), key heads repeated up
    to the value heads."""
    batch, rows = qkv.shape[:2]
    query, key, value = torch.split(qkv, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    query = query.reshape(batch, rows, -1, module.head_k_dim)
    key = key.reshape(batch, rows, -1, module.head_k_dim)
    repeat = module.num_v_heads // module.num_k_heads
    if repeat > 1:
        query, key = query.repeat_interleave(repeat, dim=2), key.repeat_interleave(repeat, dim=2)
    return query, key, value.reshape(batch, rows, -1, module.head_v_dim)
