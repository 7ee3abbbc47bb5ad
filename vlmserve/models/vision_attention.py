"""One attention call per vision layer for Qwen-VL-style vision towers, instead of one per window.

Qwen2-VL, Qwen2.5-VL and GLM-4.1V vision towers pack an image's patches (or its attention windows) as variable
length segments described by `cu_seqlens`. Without flash-attn, transformers splits them and runs one SDPA call
per segment: a Qwen2.5-VL 448x448 image makes ~450 small calls per image, which dominates its encoding time on a
GPU. Registered under a name containing "flash", the towers hand us `cu_seq_lens_q` in one call instead; we run
one SDPA call with a block-diagonal mask, which is the same attention.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vlmserve.models import hf_compat

VISION_ATTENTION_NAME = "vlmserve_varlen_flash_compatible"

#: families whose vision tower passes cu_seqlens through the flash path (checked in their modeling code)
VARLEN_VISION_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl", "glm4v"})


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                             cu_seq_lens_q: torch.Tensor | None = None, is_causal: bool = False,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """q/k/v (1, heads, T, head_dim) → (1, T, heads, head_dim); segments from `cu_seq_lens_q` attend within."""
    mask = attention_mask
    if cu_seq_lens_q is not None:
        length = query.shape[2]
        segment = torch.bucketize(torch.arange(length, device=query.device), cu_seq_lens_q[1:], right=True)
        mask = segment.unsqueeze(0) == segment.unsqueeze(1)
    if key.shape[1] != query.shape[1]:  # grouped heads
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         is_causal=is_causal and mask is None)
    return out.transpose(1, 2).contiguous(), None


def install_vision_attention(model: torch.nn.Module, family: str) -> bool:
    """Switch the vision tower of a supported family to one-call varlen attention; False if not supported."""
    if family not in VARLEN_VISION_FAMILIES:
        return False
    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is None:
        return False
    hf_compat.register_attention(VISION_ATTENTION_NAME, varlen_attention_forward)
    hf_compat.use_attention(vision_config, VISION_ATTENTION_NAME)
    return True
