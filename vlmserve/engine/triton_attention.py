"""Triton kernels for paged attention (layout and semantics: see ``paged_attention``).

- ``_write_kv_kernel``: one program per token row, skips slot -1.
- ``_decode_kernel`` (+ ``_reduce_kernel``): one query row per sequence. A program owns (sequence, KV head,
  KV split) and packs the query heads of that KV group into the M rows of ``tl.dot``, so each KV block is read
  once per group. Small batches split the KV range over several programs (split-KV); the split size is taken
  from the real seq_len inside the kernel, so a graph captured with a large ``max_seq_len`` still spreads short
  sequences over all splits.
- ``_prefill_kernel``: any q_len. A program owns (query tile, KV head); its M rows are (token, head-in-group)
  pairs, BLOCK_Q = BLOCK_M // group tokens. Tiles are numbered over the packed batch without host syncs:
  sequence s owns tiles starting at cu[s] // BLOCK_Q + s (found by binary search), so the grid is
  T // BLOCK_Q + S. KV tiles that every row sees fully skip the mask.
- Bidirectional blocks (``block_bounds``): each query row sees the keys [lo_q, hi_q], where hi_q reaches past its
  own position to the end of its block and lo_q is where its sliding window (or, with ``blocks_spare_window``,
  its block) starts. The tile ranges come from the tile's smallest and largest bounds, so causal steps tile as
  before.

Host wrappers take only host ints for grids: no ``.item()``, CUDA-graph capturable.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    # exp2-based tanh: no libdevice call, so the CPU interpreter runs it too; saturates cleanly at +-1.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _load2d(ptrs, row_mask, d_mask, ROW_MASKED: tl.constexpr, D_PADDED: tl.constexpr):
    # Masks vary along rows only unless head_dim is padded, so loads along head_dim stay vectorised.
    if D_PADDED:
        return tl.load(ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    elif ROW_MASKED:
        return tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, k_cache, v_cache, table_row, kv_head_off_k, kv_head_off_v, offs_d, d_mask,
    start, seq_len, lo_q, hi_q, scale, softcap, stride_kb, stride_kt, stride_vb, stride_vt,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, D_PADDED: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
):
    """One online-softmax step over keys [start, start + BLOCK_N); row r sees keys [lo_q[r], hi_q[r]] (lo_q only
    with USE_WINDOW); scores kept in the log2 domain."""
    offs_n = start + tl.arange(0, BLOCK_N)
    kv_valid = offs_n < seq_len
    if MASKED:
        block_ids = tl.load(table_row + offs_n // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
    else:
        block_ids = tl.load(table_row + offs_n // BLOCK_SIZE).to(tl.int64)
    in_block = offs_n % BLOCK_SIZE
    k_rows = block_ids * stride_kb + in_block * stride_kt + kv_head_off_k
    k = _load2d(k_cache + k_rows[:, None] + offs_d[None, :], kv_valid, d_mask, MASKED, D_PADDED)
    s = tl.dot(q, tl.trans(k))
    if USE_SOFTCAP:  # noqa: SIM108 (a constexpr branch; the compiler drops the other side)
        s = (softcap * LOG2E) * _tanh(s * (scale / softcap))
    else:
        s = s * (scale * LOG2E)
    if MASKED:
        allowed = (offs_n[None, :] <= hi_q[:, None]) & kv_valid[None, :]
        if USE_WINDOW:
            allowed = allowed & (offs_n[None, :] >= lo_q[:, None])
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row may have seen only masked keys so far: keep exponents finite (exp2(-inf) = 0, not NaN).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_rows = block_ids * stride_vb + in_block * stride_vt + kv_head_off_v
    v = _load2d(v_cache + v_rows[:, None] + offs_d[None, :], kv_valid, d_mask, MASKED, D_PADDED)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    out, part_acc, part_m, part_l, query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, block_lo,
    scale, softcap, window, num_q_heads, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IS_SPLIT: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, BLOCKS_SPARE_WINDOW: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(cu_seqlens_q + seq)
    if tl.load(cu_seqlens_q + seq + 1) == q_row:
        return
    seq_len = tl.load(seq_lens + seq)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    D_PADDED: tl.constexpr = BLOCK_D != HEAD_DIM
    heads = kv_head * GROUP + offs_m
    row_valid = offs_m < GROUP
    q = _load2d(query + q_row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], row_valid, d_mask, True,
                D_PADDED)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(seq_len - window, 0)
        if BLOCKS_SPARE_WINDOW:  # a one-row sequence's block ends at its row; it may start before the window
            kv_lo = tl.maximum(tl.minimum(kv_lo, tl.load(block_lo + q_row)), 0)
    # Whole BLOCK_N tiles per split, sized from this sequence's real length.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len - kv_lo, BLOCK_N), num_splits)
    start = kv_lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    pos_q = tl.zeros([BLOCK_M], dtype=tl.int32) + seq_len - 1
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = block_tables + seq * stride_bt
    # Every key of [kv_lo, seq_len) is visible to the single query row: only the ragged last tile is masked.
    for tile_start in range(start, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache, v_cache, table_row, kv_head * stride_kh, kv_head * stride_vh, offs_d, d_mask,
            tile_start, seq_len, pos_q, pos_q, scale, softcap, stride_kb, stride_kt, stride_vb, stride_vt,
            BLOCK_SIZE, BLOCK_N, False, D_PADDED, False, USE_SOFTCAP)
    for tile_start in range(full_end, end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache, v_cache, table_row, kv_head * stride_kh, kv_head * stride_vh, offs_d, d_mask,
            tile_start, seq_len, pos_q, pos_q, scale, softcap, stride_kb, stride_kt, stride_vb, stride_vt,
            BLOCK_SIZE, BLOCK_N, True, D_PADDED, False, USE_SOFTCAP)
    if not IS_SPLIT:
        result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, result.to(out.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])
    else:
        # Partials are unnormalised; [S, num_q_heads, num_splits] (+ BLOCK_D for acc), contiguous.
        part = (seq * num_q_heads + heads) * num_splits + split
        tl.store(part_m + part, m_i, mask=row_valid)
        tl.store(part_l + part, l_i, mask=row_valid)
        tl.store(part_acc + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_valid[:, None])


@triton.jit
def _reduce_kernel(
    out, part_acc, part_m, part_l, cu_seqlens_q, num_q_heads, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(cu_seqlens_q + seq)
    if tl.load(cu_seqlens_q + seq + 1) == q_row:
        return
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    split_valid = offs_s < num_splits
    part = (seq * num_q_heads + head) * num_splits + offs_s
    m = tl.load(part_m + part, mask=split_valid, other=float("-inf"))
    l_part = tl.load(part_l + part, mask=split_valid, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    acc = tl.load(part_acc + part[:, None] * BLOCK_D + offs_d[None, :], mask=split_valid[:, None], other=0.0)
    numerator = tl.sum(acc * weight[:, None], 0)
    denominator = tl.sum(l_part * weight, 0)
    result = numerator / tl.where(denominator == 0.0, 1.0, denominator)
    tl.store(out + q_row * stride_ot + head * stride_oh + offs_d, result.to(out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.jit
def _find_sequence(cu_seqlens_q, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with cu[s] // BLOCK_Q + s <= tile (that start index is strictly increasing in s)."""
    lo = tile * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        is_before = tl.load(cu_seqlens_q + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(is_before, mid, lo)
        hi = tl.where(is_before, hi, mid - 1)
    return lo


@triton.jit
def _prefill_kernel(
    out, query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, block_lo, block_hi, scale, softcap, window,
    num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    USE_BLOCKS: tl.constexpr, BLOCKS_SPARE_WINDOW: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    D_PADDED: tl.constexpr = BLOCK_D != HEAD_DIM
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(cu_seqlens_q, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + seq)
    context = seq_len - q_len
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    tok = q_tile * BLOCK_Q + offs_m // GROUP
    heads = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    pos_q = tl.where(row_valid, context + tok, -1)
    rows = (q_start + tok)[:, None]
    q = _load2d(query + rows * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], row_valid, d_mask, True,
                D_PADDED)
    hi_q = pos_q
    lo_q = pos_q - window + 1
    if USE_BLOCKS:
        # A block ends inside the sequence's keys (the scheduler's rule); the clamp only keeps reads in bounds.
        row_hi = tl.load(block_hi + q_start + tok, mask=row_valid, other=-1)
        hi_q = tl.where(row_valid, tl.minimum(tl.maximum(row_hi, pos_q), seq_len - 1), -1)
        if BLOCKS_SPARE_WINDOW:
            lo_q = tl.minimum(lo_q, tl.load(block_lo + q_start + tok, mask=row_valid, other=0))
    far: tl.constexpr = 1 << 30
    min_hi = tl.min(tl.where(row_valid, hi_q, far), 0)
    max_hi = tl.max(hi_q, 0)
    kv_lo = 0
    t_full_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(tl.min(tl.where(row_valid, lo_q, far), 0), 0) // BLOCK_N * BLOCK_N
        t_full_lo = tl.cdiv(tl.maximum(tl.max(tl.where(row_valid, lo_q, -far), 0), 0) - kv_lo, BLOCK_N)
    num_tiles = tl.cdiv(max_hi + 1 - kv_lo, BLOCK_N)
    t_full_lo = tl.minimum(t_full_lo, num_tiles)
    # Tiles in [t_full_lo, t_full_hi) lie inside every row's window and before every row's last key.
    t_full_hi = tl.minimum(tl.maximum((min_hi + 1 - kv_lo) // BLOCK_N, t_full_lo), num_tiles)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = block_tables + seq * stride_bt
    for t in range(0, t_full_lo):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache, v_cache, table_row, kv_head * stride_kh, kv_head * stride_vh, offs_d, d_mask,
            kv_lo + t * BLOCK_N, seq_len, lo_q, hi_q, scale, softcap, stride_kb, stride_kt, stride_vb, stride_vt,
            BLOCK_SIZE, BLOCK_N, True, D_PADDED, USE_WINDOW, USE_SOFTCAP)
    for t in range(t_full_lo, t_full_hi):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache, v_cache, table_row, kv_head * stride_kh, kv_head * stride_vh, offs_d, d_mask,
            kv_lo + t * BLOCK_N, seq_len, lo_q, hi_q, scale, softcap, stride_kb, stride_kt, stride_vb, stride_vt,
            BLOCK_SIZE, BLOCK_N, False, D_PADDED, USE_WINDOW, USE_SOFTCAP)
    for t in range(t_full_hi, num_tiles):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache, v_cache, table_row, kv_head * stride_kh, kv_head * stride_vh, offs_d, d_mask,
            kv_lo + t * BLOCK_N, seq_len, lo_q, hi_q, scale, softcap, stride_kb, stride_kt, stride_vb, stride_vt,
            BLOCK_SIZE, BLOCK_N, True, D_PADDED, USE_WINDOW, USE_SOFTCAP)
    result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = out + rows * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, result.to(out.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


@triton.jit
def _write_kv_kernel(
    key, value, k_cache, v_cache, slot_mapping, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ckb, stride_ckt, stride_ckh, stride_cvb, stride_cvt, stride_cvh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot < 0:
        return
    block_id = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_DIM)
    k = tl.load(key + token * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(value + token * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    k_dst = k_cache + block_id * stride_ckb + in_block * stride_ckt + offs_h * stride_ckh + offs_d
    v_dst = v_cache + block_id * stride_cvb + in_block * stride_cvt + offs_h * stride_cvh + offs_d
    tl.store(k_dst, k.to(k_cache.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Host wrappers: grids and constexprs from host ints only (CUDA-graph capturable).

#: Tunables, overridable per call (bench/attention_kernels.py sweeps them; bench/ATTENTION.md has the numbers).
#: Chosen on an H100 (bf16, head_dim 128, 28/4 heads). Decode uses 128-key tiles unsplit, 64-key tiles when split.
DECODE_DEFAULTS = {"block_n": 128, "split_block_n": 64, "num_warps": 4, "num_stages": 2}
PREFILL_DEFAULTS = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
#: Split-KV: aim for this many programs per SM, but keep at least this many keys per split.
_PROGRAMS_PER_SM = 2
_MIN_KEYS_PER_SPLIT = 64
_MAX_SPLITS = 16


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    # NOTE: the CPU interpreter has no SMs; pretend to be a small card so split-KV still gets exercised.
    if device.type != "cuda":
        return 8
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Number of KV splits for the decode kernel: enough programs to fill the card, not too little work each."""
    programs = num_seqs * num_kv_heads
    target = _PROGRAMS_PER_SM * _sm_count(device)
    if programs >= target // 2:
        return 1
    by_work = max(1, max_seq_len // _MIN_KEYS_PER_SPLIT)
    return max(1, min(triton.cdiv(target, programs), by_work, _MAX_SPLITS))


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter key/value rows into the caches; slot -1 rows are skipped (one program per row)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _require_unit_last_stride(key=key, value=value, k_cache=k_cache, v_cache=v_cache)
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1],
    )


def paged_attention(
    query: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens: Tensor, block_tables: Tensor,
    *, scale: float, max_q_len: int, max_seq_len: int, sliding_window: int | None, softcap: float, out: Tensor,
    block_bounds: tuple[Tensor, Tensor] | None = None, blocks_spare_window: bool = False,
) -> Tensor:
    """Dispatch to the decode kernel (``max_q_len == 1``) or the general tiled kernel; fills and returns ``out``."""
    if max_q_len == 1:
        decode_attention(query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale=scale,
                         max_seq_len=max_seq_len, sliding_window=sliding_window, softcap=softcap, out=out,
                         block_bounds=block_bounds, blocks_spare_window=blocks_spare_window)
    else:
        prefill_attention(query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale=scale,
                          max_q_len=max_q_len, sliding_window=sliding_window, softcap=softcap, out=out,
                          block_bounds=block_bounds, blocks_spare_window=blocks_spare_window)
    return out


def _common_args(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, out: Tensor) -> list[int]:
    _require_unit_last_stride(query=query, k_cache=k_cache, v_cache=v_cache, out=out)
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along its last dimension")
    return [
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
    ]


def _head_constexprs(query: Tensor, k_cache: Tensor, sliding_window: int | None, softcap: float) -> dict:
    head_dim = query.shape[2]
    return {
        "GROUP": query.shape[1] // k_cache.shape[2], "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)), "BLOCK_SIZE": k_cache.shape[1],
        "USE_WINDOW": sliding_window is not None, "USE_SOFTCAP": softcap > 0,
    }


def decode_attention(
    query: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens: Tensor, block_tables: Tensor,
    *, scale: float, max_seq_len: int, sliding_window: int | None, softcap: float, out: Tensor,
    num_splits: int | None = None, block_bounds: tuple[Tensor, Tensor] | None = None,
    blocks_spare_window: bool = False, **tunables: int,
) -> Tensor:
    """One query row per sequence (q_len 1, or 0 to skip); split-KV when the batch is too small to fill the card.
    A one-row sequence's block ends at its row, so of ``block_bounds`` only the starts can matter (spared windows)."""
    num_seqs, num_q_heads, num_kv_heads = seq_lens.shape[0], query.shape[1], k_cache.shape[2]
    if num_seqs == 0 or query.shape[0] == 0:
        return out
    config = {**DECODE_DEFAULTS, **tunables}
    consts = _head_constexprs(query, k_cache, sliding_window, softcap)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, query.device)
    block_m = max(16, triton.next_power_of_2(consts["GROUP"]))
    part_shape = (num_seqs, num_q_heads, num_splits) if num_splits > 1 else (1,)
    part_m = torch.empty(part_shape, device=query.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((*part_shape, consts["BLOCK_D"]), device=query.device, dtype=torch.float32)
    spare = block_bounds is not None and blocks_spare_window and sliding_window is not None
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, part_acc, part_m, part_l, query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables,
        block_bounds[0] if spare and block_bounds is not None else cu_seqlens_q,
        scale, softcap, sliding_window or 0, num_q_heads, num_splits,
        *_common_args(query, k_cache, v_cache, block_tables, out),
        BLOCK_M=block_m, BLOCK_N=config["block_n"] if num_splits == 1 else config["split_block_n"],
        IS_SPLIT=num_splits > 1, BLOCKS_SPARE_WINDOW=spare, **consts,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if num_splits > 1:
        _reduce_kernel[(num_seqs, num_q_heads)](
            out, part_acc, part_m, part_l, cu_seqlens_q, num_q_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=consts["HEAD_DIM"], BLOCK_D=consts["BLOCK_D"], SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
            num_warps=4,
        )
    return out


def prefill_attention(
    query: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens: Tensor, block_tables: Tensor,
    *, scale: float, max_q_len: int, sliding_window: int | None, softcap: float, out: Tensor,
    block_bounds: tuple[Tensor, Tensor] | None = None, blocks_spare_window: bool = False, **tunables: int,
) -> Tensor:
    """Any mix of q_len (prefill chunks over a paged prefix, decode rows); tensor-core tiles of BLOCK_M rows."""
    num_seqs, num_tokens = seq_lens.shape[0], query.shape[0]
    if num_seqs == 0 or num_tokens == 0:
        return out
    config = {**PREFILL_DEFAULTS, **tunables}
    consts = _head_constexprs(query, k_cache, sliding_window, softcap)
    group = consts["GROUP"]
    # Small chunks (mostly-decode batches) waste fewer rows with a smaller tile.
    block_m = min(config["block_m"], max(16, triton.next_power_of_2(max_q_len * group)))
    if group > block_m:
        raise ValueError(f"{group} query heads per KV head do not fit a {block_m}-row tile")
    num_tiles = num_tokens // (block_m // group) + num_seqs
    block_lo, block_hi = block_bounds if block_bounds is not None else (cu_seqlens_q, cu_seqlens_q)
    _prefill_kernel[(num_tiles, k_cache.shape[2])](
        out, query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, block_lo, block_hi, scale, softcap,
        sliding_window or 0, num_seqs, *_common_args(query, k_cache, v_cache, block_tables, out),
        BLOCK_M=block_m, BLOCK_N=config["block_n"], USE_BLOCKS=block_bounds is not None,
        BLOCKS_SPARE_WINDOW=block_bounds is not None and blocks_spare_window and sliding_window is not None, **consts,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out


def _require_unit_last_stride(**tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim (stride(-1) == 1)")
