"""Vision attention that is linear in the number of images, for Qwen-VL-style packed vision towers.

Qwen2-VL, Qwen2.5-VL and GLM-4.1V vision towers pack every image's patches (or attention windows) one after another
and describe the segments by `cu_seqlens`; a patch attends only inside its own segment. Without flash-attn,
transformers splits the segments and runs one SDPA call per segment: ~450 small calls per Qwen2.5-VL 448x448
image. A dense T x T block-diagonal mask over the concatenation (what this module did before) is one call, but
quadratic in the total patch count of every image in the call: 16 high-detail images make a mask of ~10^11
entries.

Registered under a name containing "flash", the towers hand us `cu_seq_lens_q` in one call; we group the segments
by length and run one mask-free SDPA call per distinct length over a (segments, heads, length, head_dim) batch.
Work and memory are linear in the number of segments, windowed layers keep their windows, and without a mask
SDPA can take its fused (flash / memory-efficient) kernels on the GPU and its flash kernel on the CPU.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlmserve.models import hf_compat

VISION_ATTENTION_NAME = "vlmserve_varlen_flash_compatible"



@dataclass(frozen=True)
class SegmentGroup:
    """Segments of one length: `num` of them, `length` long; `rows` None when they lie back to back from `first`
    (then q/k/v are a free view), else the index of every row they cover, segment after segment."""

    length: int
    num: int
    first: int
    rows: torch.Tensor | None


def plan_segments(cu_seqlens: torch.Tensor) -> list[SegmentGroup]:
    """Group the segments `cu_seqlens` describes by length (one host sync)."""
    bounds = cu_seqlens.tolist()
    by_length: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    groups = []
    for length, starts in by_length.items():
        back_to_back = all(b - a == length for a, b in itertools.pairwise(starts))
        rows = None
        if not back_to_back:
            offsets = torch.arange(length)
            rows = (torch.tensor(starts).unsqueeze(1) + offsets).reshape(-1).to(cu_seqlens.device)
        groups.append(SegmentGroup(length=length, num=len(starts), first=starts[0], rows=rows))
    return groups


class _PlanCache:
    """The plans of the last few `cu_seqlens` tensors, by identity: a tower passes the same tensor to every layer
    (one for full-attention layers, one for windowed layers), so each plan costs one host sync per forward."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.entries: list[tuple[weakref.ref[torch.Tensor], list[SegmentGroup]]] = []

    def get(self, cu_seqlens: torch.Tensor) -> list[SegmentGroup]:
        for ref, plan in self.entries:
            if ref() is cu_seqlens:
                return plan
        plan = plan_segments(cu_seqlens)
        self.entries = [(weakref.ref(cu_seqlens), plan), *self.entries[: self.size - 1]]
        return plan


_PLANS = _PlanCache(size=8)


def plan_for(cu_seqlens: torch.Tensor) -> list[SegmentGroup]:
    """The (cached) plan of `cu_seqlens`: CUDA-graph capture holds on to it, since the graph reads its indices."""
    return _PLANS.get(cu_seqlens)


def segmented_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: list[SegmentGroup],
                        scaling: float | None) -> torch.Tensor:
    """q/k/v (heads, T, head_dim), every row in exactly one segment of `groups` → (T, heads, head_dim)."""
    heads, total, head_dim = query.shape
    if sum(g.num * g.length for g in groups) != total:
        raise ValueError(f"the segments cover {sum(g.num * g.length for g in groups)} of {total} rows")
    out = query.new_empty(total, heads, head_dim)
    for group in groups:
        span = group.num * group.length
        if group.rows is None:
            q, k, v = (t[:, group.first: group.first + span] for t in (query, key, value))
        else:
            q, k, v = (t.index_select(1, group.rows) for t in (query, key, value))
        # (heads, num*len, d) → (num, heads, len, d): a view, no copy
        q, k, v = (t.unflatten(1, (group.num, group.length)).transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, scale=scaling).transpose(1, 2).reshape(span, heads, head_dim)
        if group.rows is None:
            out[group.first: group.first + span] = o
        else:
            out.index_copy_(0, group.rows, o)
    return out


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                             cu_seq_lens_q: torch.Tensor | None = None, is_causal: bool = False,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """q/k/v (1, heads, T, head_dim) → (1, T, heads, head_dim); segments from `cu_seq_lens_q` attend within."""
    if key.shape[1] != query.shape[1]:  # grouped heads
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    if cu_seq_lens_q is not None and query.shape[0] == 1 and not is_causal and attention_mask is None:
        out = segmented_attention(query[0], key[0], value[0], _PLANS.get(cu_seq_lens_q), scaling)
        return out.unsqueeze(0), None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         is_causal=is_causal and attention_mask is None)
    return out.transpose(1, 2).contiguous(), None


def install_vision_attention(model: torch.nn.Module) -> bool:
    """Switch the vision tower to segmented varlen attention; False when the model has no vision config.

    Only for families whose `FamilySpec.vision_attention` is "varlen" (their towers pass cu_seqlens through the
    flash path: checked in their modeling code); the caller decides from the spec."""
    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is None:
        return False
    hf_compat.register_attention(VISION_ATTENTION_NAME, varlen_attention_forward)
    hf_compat.use_attention(vision_config, VISION_ATTENTION_NAME)
    return True
