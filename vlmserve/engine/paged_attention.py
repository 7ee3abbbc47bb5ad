"""Paged-attention operators over a block-paged KV cache: public ops, torch reference, dispatch.

Layout (one cache pair per layer):
  k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]   (model dtype)
A step packs the new tokens of S sequences:
  query             [T, num_q_heads, head_dim]      (rotary already applied)
  key, value        [T, num_kv_heads, head_dim]
  cu_seqlens_q      int32 [S + 1]   sequence s owns query rows cu[s]:cu[s+1]
  seq_lens          int32 [S]       total KV length of s AFTER this step's tokens are written
  block_tables      int32 [S, max_blocks_per_seq]   (unused entries arbitrary)
  slot_mapping      int64 [T]       block_id * block_size + offset; -1 = padding row, not written

Query row j of sequence s (q_len_s rows) sits at absolute position p = seq_lens[s] - q_len_s + j and attends
to the sequence's keys at [max(0, p - window + 1), p] with a sliding window, else [0, p]. Query head h reads
KV head h // (num_q_heads // num_kv_heads). softcap > 0 applies logits = softcap * tanh(logits / softcap).

Bidirectional blocks (Gemma 3's image blocks, PaliGemma's prefix): ``block_bounds = (block_lo, block_hi)``, int32
[T] each, gives every query row the first and last key position of the bidirectional block it lies in (a row in
no block: its own position twice). Row p then also sees the keys after it up to ``block_hi``: its keys are
[lo, max(p, block_hi)] with lo = 0, or p - window + 1 under a sliding window; with ``blocks_spare_window`` the
window does not cut the block either (lo = min(p - window + 1, block_lo): PaliGemma 2's sliding layers OR the
prefix block onto the sliding causal mask, where Gemma 3's AND the window onto it). A block must end inside its
sequence's keys (``block_hi < seq_len``): the scheduler never ends a prefill chunk inside one, so a one-row
sequence's block ends at its own row.

Padding convention (CUDA-graph decode batches padded up to a captured size): a padding sequence owns one
query row (cu_seqlens stays arange(S + 1) for a decode batch), has seq_len 0 and slot -1. Its block-table row
is never read, nothing is written to the cache, and its output row is zeros. Sequences with an empty
cu_seqlens range (q_len 0) are skipped; query rows owned by no sequence are left as they are in ``out``
(zeros when ``out`` is not given). A padding sequence with seq_len 1 and an all-zero block-table row also works
(it reads block 0, slot 0), but costs a read and gives a meaningless row.

Dispatch: CUDA tensors use the Triton kernels (``triton_attention``; a split-KV decode kernel when
``max_q_len == 1``, a tiled tensor-core kernel otherwise); they do no host syncs, so they are CUDA-graph
capturable. Everything else uses the torch reference below, which loops over sequences on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["paged_attention", "reference_paged_attention", "reference_write_kv", "write_kv"]


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write this step's keys/values into their cache slots; rows whose slot is -1 are skipped."""
    _check_kv(key, value, k_cache, v_cache, slot_mapping)
    if key.is_cuda:
        from vlmserve.engine import triton_attention

        triton_attention.write_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        reference_write_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    block_tables: Tensor,
    *,
    scale: float,
    max_q_len: int,
    max_seq_len: int,
    sliding_window: int | None = None,
    softcap: float = 0.0,
    out: Tensor | None = None,
    block_bounds: tuple[Tensor, Tensor] | None = None,
    blocks_spare_window: bool = False,
) -> Tensor:
    """Causal attention of the packed query rows over each sequence's paged KV; returns [T, num_q_heads, head_dim].

    ``max_q_len`` / ``max_seq_len`` are host-side upper bounds (grid sizes); they must not be smaller than the
    real values. ``sliding_window`` None or <= 0 means full attention.
    """
    _check_attention(query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables)
    window = sliding_window if sliding_window is not None and sliding_window > 0 else None
    if out is None:
        out = torch.zeros_like(query)
    if query.is_cuda:
        from vlmserve.engine import triton_attention

        return triton_attention.paged_attention(
            query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale=scale,
            max_q_len=max_q_len, max_seq_len=max_seq_len, sliding_window=window, softcap=softcap, out=out,
            block_bounds=block_bounds, blocks_spare_window=blocks_spare_window,
        )
    return reference_paged_attention(
        query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale=scale,
        sliding_window=window, softcap=softcap, out=out, block_bounds=block_bounds,
        blocks_spare_window=blocks_spare_window,
    )


def reference_write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Torch version of ``write_kv`` (boolean indexing: syncs on CUDA, so not graph-capturable)."""
    is_written = slot_mapping >= 0
    slots = slot_mapping[is_written]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    # NOTE: view(-1, ...) needs the cache contiguous over (block, slot); the engine allocates it that way.
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[is_written].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[is_written].to(v_cache.dtype)


def reference_paged_attention(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    block_tables: Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float = 0.0,
    out: Tensor | None = None,
    block_bounds: tuple[Tensor, Tensor] | None = None,
    blocks_spare_window: bool = False,
) -> Tensor:
    """Torch reference (fp32 math): one batched matmul per sequence over all its heads.

    Used on CPU and as the oracle for the Triton kernels. It reads ``cu_seqlens_q``/``seq_lens`` on the host.
    """
    if out is None:
        out = torch.zeros_like(query)
    cu_seqlens = cu_seqlens_q.tolist()
    lengths = seq_lens.tolist()
    spare = blocks_spare_window and sliding_window is not None
    decode_seqs = []
    for seq, seq_len in enumerate(lengths):
        q_start, q_end = cu_seqlens[seq], cu_seqlens[seq + 1]
        if q_end == q_start:
            continue
        if seq_len == 0:  # padding sequence: no keys, zero output
            out[q_start:q_end] = 0
        elif seq_len < q_end - q_start:
            raise ValueError(f"sequence {seq}: seq_len {seq_len} < q_len {q_end - q_start}")
        elif q_end - q_start == 1:
            decode_seqs.append(seq)
        else:
            bounds = None if block_bounds is None else (block_bounds[0][q_start:q_end], block_bounds[1][q_start:q_end])
            out[q_start:q_end] = _attend_one(
                query[q_start:q_end], k_cache, v_cache, block_tables[seq], seq_len,
                scale=scale, sliding_window=sliding_window, softcap=softcap, block_bounds=bounds, spare=spare,
            ).to(out.dtype)
    if decode_seqs:
        # Single-row sequences in one padded batch: per-sequence op overhead dominates tiny CPU models.
        rows = [cu_seqlens[seq] for seq in decode_seqs]
        # A one-row sequence's block ends at its row (see the module docstring): only its start can matter.
        first_keys = block_bounds[0][rows] if spare and block_bounds is not None else None
        out[rows] = _attend_single_rows(
            query[rows], k_cache, v_cache, block_tables[decode_seqs], [lengths[seq] for seq in decode_seqs],
            scale=scale, sliding_window=sliding_window, softcap=softcap, block_starts=first_keys,
        ).to(out.dtype)
    return out


def _attend_single_rows(
    query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, lengths: list[int], *,
    scale: float, sliding_window: int | None, softcap: float, block_starts: Tensor | None = None,
) -> Tensor:
    """One query row per sequence ([n, H, D], the row at position seq_len - 1), keys padded to the longest."""
    num_rows, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = max(lengths)
    num_blocks = -(-max_len // block_size)
    seq_lens = torch.tensor(lengths, device=query.device)[:, None]
    blocks = block_tables[:, :num_blocks].long()
    # Entries past a sequence's last block are arbitrary: point them at block 0 (masked out below).
    blocks = torch.where(torch.arange(num_blocks, device=query.device) * block_size < seq_lens, blocks, 0)
    keys = k_cache[blocks].reshape(num_rows, -1, num_kv_heads, head_dim)[:, :max_len].float()
    values = v_cache[blocks].reshape(num_rows, -1, num_kv_heads, head_dim)[:, :max_len].float()
    q = query.float().view(num_rows, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    scores = torch.einsum("nkgd,nlkd->nkgl", q, keys) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    key_positions = torch.arange(max_len, device=query.device)[None, :]
    allowed = key_positions < seq_lens
    if sliding_window is not None:
        in_window = key_positions >= seq_lens - sliding_window
        if block_starts is not None:
            in_window |= key_positions >= block_starts.to(seq_lens.device)[:, None]
        allowed &= in_window
    probs = torch.softmax(scores.masked_fill(~allowed[:, None, None, :], float("-inf")), dim=-1)
    return torch.einsum("nkgl,nlkd->nkgd", probs, values).reshape(num_rows, num_q_heads, head_dim)


def _attend_one(
    query: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_len: int, *,
    scale: float, sliding_window: int | None, softcap: float, block_bounds: tuple[Tensor, Tensor] | None = None,
    spare: bool = False,
) -> Tensor:
    """Attention of one sequence's query rows [q_len, H, D] over its first ``seq_len`` cached keys."""
    q_len, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    # [kv_heads, seq_len, D]
    keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1).float()
    values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1).float()
    # Query heads of one KV group side by side: [kv_heads, group * q_len, D] (heads are kv-major).
    q = query.float().view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    scores = torch.matmul(q.reshape(num_kv_heads, group * q_len, head_dim), keys.transpose(1, 2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    positions = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
    key_positions = torch.arange(seq_len, device=query.device)[None, :]
    last = positions
    if block_bounds is not None:
        last = torch.maximum(positions, block_bounds[1][:, None].long())
        if int(last.max()) >= seq_len:
            raise ValueError(f"a bidirectional block ends at {int(last.max())}, past the sequence's {seq_len} keys")
    allowed = key_positions <= last
    if sliding_window is not None:
        in_window = key_positions > positions - sliding_window
        if spare and block_bounds is not None:
            in_window |= key_positions >= block_bounds[0][:, None].long()
        allowed &= in_window
    scores = scores.view(num_kv_heads, group, q_len, seq_len).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(num_kv_heads, group * q_len, seq_len)
    attended = torch.matmul(probs, values)  # [kv_heads, group * q_len, D]
    return attended.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(q_len, num_q_heads, head_dim)


def _check_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    # Shape checks only: they read host metadata and never sync.
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key/value must both be [T, kv_heads, head_dim], got {tuple(key.shape)}, {tuple(value.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not match key rows {tuple(key.shape)}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}")


def _check_attention(
    query: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens: Tensor, block_tables: Tensor,
) -> None:
    if query.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"bad shapes: query {tuple(query.shape)}, caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)}")
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads {num_q_heads}x{head_dim} do not fit KV heads {num_kv_heads}x{k_cache.shape[3]}")
    num_seqs = seq_lens.shape[0]
    if cu_seqlens_q.shape != (num_seqs + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"metadata mismatch: cu_seqlens_q {tuple(cu_seqlens_q.shape)}, seq_lens {tuple(seq_lens.shape)}, "
            f"block_tables {tuple(block_tables.shape)}"
        )
