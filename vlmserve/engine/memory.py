"""How many KV blocks fit on the GPU: weights are loaded, so measure a worst-case step and give the rest to KV."""

from __future__ import annotations

import logging

import torch

from vlmserve.config import EngineConfig
from vlmserve.engine import attention
from vlmserve.engine.attention import AttentionBatch
from vlmserve.engine.kv_cache import KVCache
from vlmserve.models.base import ModelAdapter

logger = logging.getLogger(__name__)

#: kept free for the vision tower's activations, CUDA graphs and allocator fragmentation
_RESERVE_BYTES = 3 * 2**30


@torch.inference_mode()
def profile_num_blocks(adapter: ModelAdapter, config: EngineConfig) -> int:
    device = adapter.device
    layout = adapter.kv_layout
    tokens = config.max_num_batched_tokens
    block_size = config.block_size
    scratch = KVCache.allocate(layout, -(-tokens // block_size), block_size, dtype=adapter.dtype, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    attention.install(adapter.text_model)
    hidden = adapter.embed_tokens(torch.zeros(1, dtype=torch.long, device=device)).shape[-1]
    embeds = torch.randn(1, tokens, hidden, dtype=adapter.dtype, device=device)
    rows = adapter.num_position_rows
    positions = torch.arange(tokens, device=device).expand(rows, 1, tokens) if rows > 1 else \
        torch.arange(tokens, device=device).unsqueeze(0)
    batch = AttentionBatch(
        cache=scratch, slot_mapping=torch.arange(tokens, device=device),
        cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(-(-tokens // block_size), dtype=torch.int32, device=device).unsqueeze(0),
        max_q_len=tokens, max_seq_len=tokens)
    with batch.active():
        out = adapter.text_model(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    adapter.compute_logits(out.last_hidden_state[0, -config.max_num_seqs:])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del scratch, out, embeds
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    available = total * config.kv_cache_memory_fraction - peak - _RESERVE_BYTES
    per_block = KVCache.bytes_per_block(layout, block_size, adapter.dtype)
    num_blocks = int(available // per_block)
    logger.info("GPU memory: %.1f GiB total, %.1f GiB peak after a %d-token step, %d KV blocks (%.1f GiB)",
                total / 2**30, peak / 2**30, tokens, num_blocks, num_blocks * per_block / 2**30)
    if num_blocks < 1:
        raise RuntimeError("no GPU memory left for the KV cache; lower --max-num-batched-tokens or raise "
                           "--kv-cache-memory-fraction")
    return num_blocks
