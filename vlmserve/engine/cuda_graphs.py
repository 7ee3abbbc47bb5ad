"""CUDA graphs of decode steps: the decoder plus lm_head for B sequences of one token each, per padded B.

A transformers decoder launches hundreds of small kernels per step; at small batch the CPU cannot launch them as
fast as the GPU runs them. A captured graph replays them all with one launch. Inputs live in static buffers that
each step fills; a batch of n is padded to the next captured size with rows that write nothing (slot -1) and read
nothing (length 0), which the attention kernels treat as padding.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from vlmserve.engine.attention import AttentionBatch
from vlmserve.engine.kv_cache import KVCache
from vlmserve.models.base import ModelAdapter

logger = logging.getLogger(__name__)

_CANDIDATE_SIZES = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def compiled_decoder(text_model: torch.nn.Module, *, backend: str = "inductor") -> Any:
    """`torch.compile` of the decoder for graph capture: fuses the RMSNorm, rotary, SiLU-mul and residual kernels
    between attention calls. Our paged attention (Triton kernels reading the step's metadata) stays outside the
    compiled graphs, so one compilation (dynamic batch) serves every captured size."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vlmserve.engine import attention

    ALL_ATTENTION_FUNCTIONS.register(attention.ATTENTION_NAME,
                                     torch.compiler.disable(attention.paged_attention_forward))
    return torch.compile(text_model, dynamic=True, backend=backend)


class DecodeGraphs:
    """Captured decode steps for batch sizes up to `max_batch`; `run` replays the smallest that fits."""

    def __init__(self, adapter: ModelAdapter, cache: KVCache, *, max_batch: int, max_model_len: int,
                 compile_decoder: bool = False, computes_logits: bool = True) -> None:
        self._adapter = adapter
        self._computes_logits = computes_logits  # False on tensor-parallel workers: rank 0 alone samples
        self._decoder = compiled_decoder(adapter.text_model) if compile_decoder else adapter.text_model
        self._cache = cache
        self._max_model_len = max_model_len
        self.sizes = sorted({s for s in _CANDIDATE_SIZES if s < max_batch} | {max_batch})
        biggest, device = self.sizes[-1], adapter.device
        hidden = adapter.embed_tokens(torch.zeros(1, dtype=torch.long, device=device)).shape[-1]
        self._rows = adapter.num_position_rows
        max_blocks = -(-max_model_len // cache.block_size)
        self._embeds = torch.zeros(biggest, hidden, dtype=adapter.dtype, device=device)
        self._positions = torch.zeros(self._rows, biggest, dtype=torch.long, device=device)
        self._slots = torch.full((biggest,), -1, dtype=torch.int64, device=device)
        self._cu_seqlens = torch.arange(biggest + 1, dtype=torch.int32, device=device)
        self._seq_lens = torch.zeros(biggest, dtype=torch.int32, device=device)
        self._tables = torch.zeros(biggest, max_blocks, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self._capture(size, pool)
        logger.info("captured %d decode graphs (batch %s) in %.1fs", len(self.sizes),
                    ",".join(map(str, self.sizes)), time.monotonic() - started)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, size: int) -> torch.Tensor:
        batch = AttentionBatch(cache=self._cache, slot_mapping=self._slots[:size],
                               cu_seqlens_q=self._cu_seqlens[:size + 1], seq_lens=self._seq_lens[:size],
                               block_tables=self._tables[:size], max_q_len=1, max_seq_len=self._max_model_len)
        positions = self._positions[:, :size]
        position_ids = positions.unsqueeze(1) if self._rows > 1 else positions
        with batch.active():
            output = self._decoder(inputs_embeds=self._embeds[:size].unsqueeze(0),
                                              position_ids=position_ids, use_cache=False)
        hidden = output.last_hidden_state[0]
        return self._adapter.compute_logits(hidden) if self._computes_logits else hidden

    @torch.inference_mode()
    def _capture(self, size: int, pool: Any) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: kernel compilation, library handles
            for _ in range(2):
                self._forward(size)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._logits[size] = self._forward(size)
        self._graphs[size] = graph

    @torch.inference_mode()
    def run(self, embeds: torch.Tensor, positions: torch.Tensor, attention: AttentionBatch) -> torch.Tensor:
        """Logits (n, vocab) for n single-token sequences (hidden states where no logits are computed);
        `positions` is (rows, n)."""
        n = embeds.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self._embeds[:n].copy_(embeds)
        self._positions[:, :n].copy_(positions)
        self._slots[:n].copy_(attention.slot_mapping)
        self._slots[n:size].fill_(-1)
        self._seq_lens[:n].copy_(attention.seq_lens)
        self._seq_lens[n:size].zero_()
        width = attention.block_tables.shape[1]
        self._tables[:n, :width].copy_(attention.block_tables)
        self._graphs[size].replay()
        return self._logits[size][:n]
