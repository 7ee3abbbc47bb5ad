"""Our paged attention, registered with transformers' attention interface.

Every transformers decoder whose attention goes through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`
calls `paged_attention_forward` once per layer with that layer's rotary-embedded q, k, v for the packed step.
It writes the step's keys and values into the layer's cache blocks, then attends over each sequence's blocks.
A sequence reads only its own rows of the step and blocks written by earlier, completed steps (the prefix cache
hands out a block only after its step completed: `kv_cache_manager`), so no order between the rows of one step,
or between the forwards a step is split into, matters.

The step's metadata (slots, block tables, lengths) is set by the model runner around the forward call through
`AttentionBatch.active()`; the model itself knows nothing of it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vlmserve.engine.kv_cache import KVCache
from vlmserve.engine.paged_attention import paged_attention, write_kv
from vlmserve.engine.recurrent_state import RecurrentStep
from vlmserve.models.cross_attention import CROSS_ATTENTION_MARK, CrossSegment, cross_attention_forward
from vlmserve.models.hf_compat import register_attention, use_attention

ATTENTION_NAME = "vlmserve_paged"


@dataclass
class AttentionBatch:
    """Where one step's tokens go in the cache and what each sequence may read."""

    cache: KVCache
    slot_mapping: torch.Tensor  # int64 [T]
    cu_seqlens_q: torch.Tensor  # int32 [S + 1]
    seq_lens: torch.Tensor  # int32 [S]
    block_tables: torch.Tensor  # int32 [S, max_blocks]
    max_q_len: int
    max_seq_len: int
    #: the step's view of the recurrent-state pool (hybrid decoders only; see `engine.recurrent_state`)
    recurrent: RecurrentStep | None = None
    #: per query row, the first and last key of the bidirectional block it lies in (see `paged_attention`);
    #: None for a causal step
    block_bounds: tuple[torch.Tensor, torch.Tensor] | None = None
    #: sliding-window layers leave those blocks whole (PaliGemma 2) rather than cut them (Gemma 3)
    blocks_spare_window: bool = False
    #: per sequence of the step, its rows and cross-attention K/V (Mllama only; see `models.cross_attention`)
    cross: list[CrossSegment] | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        global _current
        previous, _current = _current, self
        try:
            yield
        finally:
            _current = previous


_current: AttentionBatch | None = None


def current_batch() -> AttentionBatch | None:
    """The active step's metadata; None outside an engine step."""
    return _current


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                            sliding_window: int | None = None, softcap: float | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention signature: q/k/v (1, heads, T, head_dim) → output (1, T, heads, head_dim)."""
    batch = _current
    if batch is None:
        raise RuntimeError("paged attention called outside an engine step")
    if module.__dict__.get(CROSS_ATTENTION_MARK):  # Mllama's cross-attention: the request's vision K/V, not the cache
        return cross_attention_forward(module, query, key, value, attention_mask, scaling)
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    k_cache, v_cache = batch.cache.keys[layer], batch.cache.values[layer]
    write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
    out = paged_attention(
        q.contiguous(), k_cache, v_cache, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables,
        scale=scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1]), max_q_len=batch.max_q_len,
        max_seq_len=batch.max_seq_len, sliding_window=sliding_window, softcap=float(softcap or 0.0),
        block_bounds=batch.block_bounds, blocks_spare_window=batch.blocks_spare_window)
    return out.unsqueeze(0), None


def install(text_model: torch.nn.Module) -> None:
    """Register our attention and switch the decoder (only the decoder) to it."""
    register_attention(ATTENTION_NAME, paged_attention_forward)
    use_attention(text_model.config, ATTENTION_NAME)
