"""How many KV blocks fit on the GPU: weights are loaded, so measure a worst-case step and give the rest to KV."""

from __future__ import annotations

import logging

import torch

from vlmserve.config import EngineConfig
from vlmserve.engine import attention, recurrent_state
from vlmserve.engine.attention import AttentionBatch
from vlmserve.engine.kv_cache import KVCache
from vlmserve.models.base import ModelAdapter

logger = logging.getLogger(__name__)

#: kept free for the vision tower's activations, CUDA graphs and allocator fragmentation, where the tower's own
#: peak cannot be measured (adapters without a per-call patch budget)
_RESERVE_BYTES = 3 * 2**30
#: kept free beside the measured tower peak: CUDA graphs and allocator fragmentation
_GRAPH_RESERVE_BYTES = 1 * 2**30


def profile_vision_bytes(adapter: ModelAdapter) -> int | None:
    """GPU memory one vision-tower call at the adapter's patch budget allocates beyond what is allocated already
    (the engine never makes a larger call); None where the adapter has no budget."""
    device = adapter.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        if not adapter.run_vision_at_budget():
            return None
    except torch.OutOfMemoryError as exc:
        raise RuntimeError("the vision tower cannot encode one call of the largest image the processor makes on "
                           "this GPU; lower the processor's max_pixels or serve on a larger card") from exc
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak


@torch.inference_mode()
def profile_num_blocks(adapter: ModelAdapter, config: EngineConfig) -> int:
    device = adapter.device
    layout = adapter.kv_layout
    tokens = config.max_num_batched_tokens
    block_size = config.block_size
    vision = profile_vision_bytes(adapter)
    reserve = _RESERVE_BYTES if vision is None else vision + _GRAPH_RESERVE_BYTES
    scratch = KVCache.allocate(layout, -(-tokens // block_size), block_size, dtype=adapter.dtype, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    attention.install(adapter.text_model)
    if adapter.recurrent_layout is not None:  # the scratch step's recurrent layers start from zeros, keep nothing
        recurrent_state.install(adapter, attention.current_batch)
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
    recurrent = adapter.recurrent_layout  # the state pool (engine.recurrent_state) is allocated beside the KV
    states = 0 if recurrent is None else (config.max_num_seqs + 1) * recurrent.bytes_per_sequence(adapter.dtype)
    available = total * config.kv_cache_memory_fraction - peak - reserve - states
    per_block = KVCache.bytes_per_block(layout, block_size, adapter.dtype)
    num_blocks = int(available // per_block)
    logger.info("GPU memory: %.1f GiB total, %.1f GiB peak after a %d-token step, %.1f GiB kept for the vision "
                "tower (%s), %d KV blocks (%.1f GiB)", total / 2**30, peak / 2**30, tokens, reserve / 2**30,
                "measured at its patch budget" if vision is not None else "flat guess", num_blocks,
                num_blocks * per_block / 2**30)
    if num_blocks < 1:
        raise RuntimeError("no GPU memory left for the KV cache; lower --max-num-batched-tokens or raise "
                           "--kv-cache-memory-fraction")
    return num_blocks
