"""Paged-attention ops: torch reference vs an independent dense attention; Triton kernels under the interpreter."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

from vlmserve.engine import paged_attention as pa

NUM_BLOCKS = 64


@dataclass
class Batch:
    """A packed step over a paged cache, plus the dense per-sequence K/V it was built from."""

    query: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    dense_keys: list[torch.Tensor]  # per sequence [seq_len, kv_heads, D]
    dense_values: list[torch.Tensor]


def make_batch(
    q_lens: list[int], seq_lens: list[int], *, num_q_heads: int = 6, num_kv_heads: int = 2, head_dim: int = 16,
    block_size: int = 4, extra_rows: int = 0, dtype: torch.dtype = torch.float32, seed: int = 0,
) -> Batch:
    """Random K/V per sequence scattered into randomly chosen, non-contiguous cache blocks."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(NUM_BLOCKS, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(NUM_BLOCKS, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    max_blocks = max(math.ceil(n / block_size) for n in seq_lens) + 2
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    table_rows, dense_keys, dense_values = [], [], []
    for seq_len in seq_lens:
        blocks = [free.pop() for _ in range(math.ceil(seq_len / block_size))]
        # Unused entries hold junk block ids: the ops must never read past seq_len.
        table_rows.append(blocks + [NUM_BLOCKS - 1] * (max_blocks - len(blocks)))
        keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        values = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        for pos in range(seq_len):
            k_cache[blocks[pos // block_size], pos % block_size] = keys[pos]
            v_cache[blocks[pos // block_size], pos % block_size] = values[pos]
        dense_keys.append(keys)
        dense_values.append(values)
    cu = [0]
    for q_len in q_lens:
        cu.append(cu[-1] + q_len)
    query = torch.randn(cu[-1] + extra_rows, num_q_heads, head_dim, generator=gen).to(dtype)
    return Batch(
        query, k_cache, v_cache, torch.tensor(cu, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
        torch.tensor(table_rows, dtype=torch.int32), dense_keys, dense_values,
    )


Blocks = list[list[tuple[int, int]]]  # per sequence, bidirectional blocks [start, end) of key positions


def dense_attention(batch: Batch, *, scale: float, window: int | None, softcap: float,
                    blocks: Blocks | None = None, spare: bool = False) -> torch.Tensor:
    """Naive oracle: per sequence, repeat K/V heads for GQA and apply an explicit position mask. With `blocks`,
    a row inside a block also sees the block's later keys (Gemma 3: the window still applies; `spare`: PaliGemma 2,
    the window does not cut the block)."""
    out = torch.zeros(batch.query.shape, dtype=torch.float32)
    num_q_heads = batch.query.shape[1]
    cu = batch.cu_seqlens_q.tolist()
    for seq, seq_len in enumerate(batch.seq_lens.tolist()):
        q = batch.query[cu[seq]:cu[seq + 1]].float()
        q_len = q.shape[0]
        if q_len == 0 or seq_len == 0:
            continue
        group = num_q_heads // batch.dense_keys[seq].shape[1]
        keys = batch.dense_keys[seq].float().repeat_interleave(group, dim=1)  # [L, H, D]
        values = batch.dense_values[seq].float().repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", q, keys) * scale
        if softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
        mask = torch.zeros(q_len, seq_len, dtype=torch.bool)
        for row in range(q_len):
            pos = seq_len - q_len + row
            lo = 0 if window is None else max(0, pos - window + 1)
            mask[row, lo:pos + 1] = True
            for start, end in (blocks[seq] if blocks else []):
                if start <= pos < end:
                    mask[row, start if spare else max(start, lo):end] = True
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        out[cu[seq]:cu[seq + 1]] = torch.einsum("hqk,khd->qhd", probs, values)
    return out


def block_bounds(batch: Batch, blocks: Blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row, the first and last key of its block (its own position twice outside any block)."""
    lo = torch.zeros(batch.query.shape[0], dtype=torch.int32)
    hi = torch.zeros_like(lo)
    cu = batch.cu_seqlens_q.tolist()
    for seq, seq_len in enumerate(batch.seq_lens.tolist()):
        for row in range(cu[seq], cu[seq + 1]):
            pos = seq_len - (cu[seq + 1] - cu[seq]) + row - cu[seq]
            lo[row] = hi[row] = pos
            for start, end in blocks[seq]:
                if start <= pos < end:
                    lo[row], hi[row] = start, end - 1
    return lo, hi


def run_reference(batch: Batch, *, scale: float = 0.3, window: int | None = None, softcap: float = 0.0,
                  out: torch.Tensor | None = None, blocks: Blocks | None = None, spare: bool = False) -> torch.Tensor:
    return pa.paged_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables,
        scale=scale, max_q_len=int(batch.cu_seqlens_q.diff().max()), max_seq_len=int(batch.seq_lens.max()),
        sliding_window=window, softcap=softcap, out=out,
        block_bounds=block_bounds(batch, blocks) if blocks else None, blocks_spare_window=spare,
    )


# Decode rows, a chunked prefill over a prefix, a full prefill, a block-aligned length, and a q_len-0 sequence.
MIXED_Q_LENS = [1, 7, 12, 1, 0, 4]
MIXED_SEQ_LENS = [9, 30, 12, 16, 5, 8]
# Blocks of each: a one-row sequence whose block ends at its row, two blocks (one reaching back before the chunk:
# its start came from the prefix cache), a block inside a full prefill, none, none, a prefix-LM block over all.
MIXED_BLOCKS: Blocks = [[(2, 9)], [(20, 27), (28, 30)], [(3, 9)], [], [], [(0, 8)]]


@pytest.mark.parametrize(("window", "spare"), [(None, False), (5, False), (5, True)])
def test_reference_bidirectional_blocks_match_dense(window: int | None, spare: bool) -> None:
    batch = make_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, extra_rows=1)
    got = run_reference(batch, window=window, blocks=MIXED_BLOCKS, spare=spare)
    torch.testing.assert_close(got, dense_attention(batch, scale=0.3, window=window, softcap=0.0,
                                                    blocks=MIXED_BLOCKS, spare=spare), rtol=1e-5, atol=1e-5)
    # the blocks change the answer (else this test could not fail on a kernel that ignores them)
    causal = dense_attention(batch, scale=0.3, window=window, softcap=0.0)
    assert (got - causal).abs().max() > 1e-2


def test_reference_refuses_a_block_past_the_keys() -> None:
    batch = make_batch([3], [6])
    with pytest.raises(ValueError, match="bidirectional block ends at 7"):
        run_reference(batch, blocks=[[(4, 8)]])


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_reference_matches_dense_mixed_batch(window: int | None, softcap: float) -> None:
    batch = make_batch(MIXED_Q_LENS, MIXED_SEQ_LENS)
    got = run_reference(batch, window=window, softcap=softcap)
    want = dense_attention(batch, scale=0.3, window=window, softcap=softcap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("window", "softcap"), [(None, 0.0), (3, 2.0)])
def test_reference_decode_only_batch(window: int | None, softcap: float) -> None:
    # All rows single-token (the batched decode path): lengths 1, block-aligned, ragged; junk table tails.
    batch = make_batch([1] * 5, [1, 8, 13, 30, 4], block_size=4)
    got = run_reference(batch, window=window, softcap=softcap)
    torch.testing.assert_close(got, dense_attention(batch, scale=0.3, window=window, softcap=softcap),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(4, 4), (6, 1), (8, 2)])
def test_reference_gqa_layouts(num_q_heads: int, num_kv_heads: int) -> None:
    batch = make_batch([3, 1, 5], [3, 11, 20], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, block_size=8)
    torch.testing.assert_close(run_reference(batch), dense_attention(batch, scale=0.3, window=None, softcap=0.0),
                               rtol=1e-5, atol=1e-5)


def test_reference_bf16_close_to_fp32_oracle() -> None:
    batch = make_batch([1, 6], [20, 10], dtype=torch.bfloat16)
    got = run_reference(batch)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), dense_attention(batch, scale=0.3, window=None, softcap=0.0),
                               rtol=2e-2, atol=2e-2)


def test_padding_rows_give_zeros_and_unowned_rows_are_untouched() -> None:
    # Decode batch padded to 5 with two seq_len-0 sequences, plus 2 query rows owned by no sequence.
    batch = make_batch([1, 1, 1, 1, 1], [7, 0, 13, 0, 1], extra_rows=2)
    batch.block_tables[1] = 0
    got = run_reference(batch)
    assert torch.count_nonzero(got[[1, 3]]) == 0
    assert torch.count_nonzero(got[5:]) == 0
    torch.testing.assert_close(got[:5], dense_attention(batch, scale=0.3, window=None, softcap=0.0)[:5])
    marker = torch.full_like(batch.query, 7.0)
    run_reference(batch, out=marker)
    assert torch.all(marker[5:] == 7.0)


def test_write_kv_round_trip_skips_padding_slots() -> None:
    block_size, num_kv_heads, head_dim = 4, 2, 8
    k_cache = torch.zeros(6, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(5, num_kv_heads, head_dim)
    value = torch.randn(5, num_kv_heads, head_dim)
    slots = torch.tensor([9, -1, 0, 23, -1])
    pa.write_kv(key, value, k_cache, v_cache, slots)
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], key[row]) and torch.equal(flat_v[slot], value[row])
    assert torch.count_nonzero(flat_k.abs().sum(dim=(1, 2))) == 3
    assert torch.count_nonzero(flat_v.abs().sum(dim=(1, 2))) == 3


def test_write_then_attend_prefill_then_decode_matches_dense() -> None:
    # Engine flow: a 10-token prefill, then one decode step, cache filled only through write_kv.
    num_kv_heads, head_dim, block_size = 2, 16, 4
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(11, num_kv_heads, head_dim, generator=gen)
    values = torch.randn(11, num_kv_heads, head_dim, generator=gen)
    queries = torch.randn(11, 4, head_dim, generator=gen)
    k_cache = torch.zeros(8, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    table = torch.tensor([[5, 2, 7, 0]], dtype=torch.int32)
    slots = torch.tensor([int(table[0, p // block_size]) * block_size + p % block_size for p in range(11)])
    outputs = []
    for lo, hi in [(0, 10), (10, 11)]:
        pa.write_kv(keys[lo:hi], values[lo:hi], k_cache, v_cache, slots[lo:hi])
        outputs.append(pa.paged_attention(
            queries[lo:hi], k_cache, v_cache, torch.tensor([0, hi - lo], dtype=torch.int32),
            torch.tensor([hi], dtype=torch.int32), table, scale=0.25, max_q_len=hi - lo, max_seq_len=hi))
    whole = Batch(queries, k_cache, v_cache, torch.tensor([0, 11], dtype=torch.int32),
                  torch.tensor([11], dtype=torch.int32), table, [keys], [values])
    torch.testing.assert_close(torch.cat(outputs), dense_attention(whole, scale=0.25, window=None, softcap=0.0))


def test_shape_errors_are_value_errors() -> None:
    batch = make_batch([1], [4])
    with pytest.raises(ValueError, match="metadata"):
        pa.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.cu_seqlens_q[:1], batch.seq_lens,
                           batch.block_tables, scale=1.0, max_q_len=1, max_seq_len=4)
    with pytest.raises(ValueError, match="slot_mapping"):
        pa.write_kv(batch.query[:, :2], batch.query[:, :2], batch.k_cache, batch.v_cache, torch.zeros(3))


# ---- Triton kernels under TRITON_INTERPRET=1 (CPU). triton is in the test extra on Linux, where its absence is a
# failure (a skip here would hide the kernels from CI); elsewhere it has no wheels and the test skips. ----
# triton.jit and triton.language's own @jit helpers (tl.max, tl.cdiv, ...) only run on the CPU interpreter when
# TRITON_INTERPRET=1 is set before triton is imported, so these tests run in a child pytest with that variable.

IS_INTERPRET_CHILD = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not IS_INTERPRET_CHILD, reason="run in a TRITON_INTERPRET=1 child process by test_triton_under_interpreter"
)


@pytest.mark.skipif(IS_INTERPRET_CHILD, reason="this is the child process")
def test_triton_under_interpreter() -> None:
    if importlib.util.find_spec("triton") is None:
        if sys.platform == "linux":
            pytest.fail("triton is not installed: pip install -e '.[test]' (the test extra brings it)")
        pytest.skip(f"triton has no wheels for {sys.platform}")
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "test_interpreted_"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240,
                           cwd=Path(__file__).resolve().parents[3])
    report = child.stdout + child.stderr
    assert child.returncode == 0, report
    assert re.search(r"\b10 passed\b", report) and "skipped" not in report, report


@pytest.fixture
def interpreted() -> ModuleType:
    pytest.importorskip("triton")
    from vlmserve.engine import triton_attention

    return triton_attention


def run_triton(module: ModuleType, batch: Batch, *, window: int | None, softcap: float, blocks: Blocks | None = None,
               spare: bool = False, **tunables: int) -> torch.Tensor:
    out = torch.zeros_like(batch.query)
    max_q_len = int(batch.cu_seqlens_q.diff().max())
    args = (batch.query, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables)
    bounds = {"block_bounds": block_bounds(batch, blocks) if blocks else None, "blocks_spare_window": spare}
    if max_q_len == 1:
        module.decode_attention(*args, scale=0.3, max_seq_len=int(batch.seq_lens.max()), sliding_window=window,
                                softcap=softcap, out=out, **bounds, **tunables)
    else:
        module.prefill_attention(*args, scale=0.3, max_q_len=max_q_len, sliding_window=window, softcap=softcap,
                                 out=out, **bounds, **tunables)
    return out


@needs_interpreter
@pytest.mark.parametrize(("window", "softcap", "num_splits"), [(None, 0.0, 1), (None, 0.0, 3), (6, 4.0, 2)])
def test_interpreted_decode(interpreted: ModuleType, window: int | None, softcap: float, num_splits: int) -> None:
    # Includes padding sequences (seq_len 0), a q_len-0 sequence and a 1-token sequence.
    batch = make_batch([1, 1, 0, 1, 1, 1], [9, 0, 3, 37, 1, 20], num_q_heads=6, num_kv_heads=2, extra_rows=1)
    got = run_triton(interpreted, batch, window=window, softcap=softcap, num_splits=num_splits, block_n=16,
                     split_block_n=16)
    want = dense_attention(batch, scale=0.3, window=window, softcap=softcap)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize(("window", "softcap", "block_m"), [(None, 0.0, 16), (5, 0.0, 32), (None, 3.0, 32)])
def test_interpreted_prefill(interpreted: ModuleType, window: int | None, softcap: float, block_m: int) -> None:
    # Group of 3 (tile rows not a multiple of it) and head_dim 24 (padded to 32) cover the masked paths.
    batch = make_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, num_q_heads=6, num_kv_heads=2, head_dim=24, extra_rows=2)
    got = run_triton(interpreted, batch, window=window, softcap=softcap, block_m=block_m, block_n=16)
    want = dense_attention(batch, scale=0.3, window=window, softcap=softcap)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize(("window", "spare"), [(None, False), (5, False), (5, True)])
def test_interpreted_bidirectional_blocks(interpreted: ModuleType, window: int | None, spare: bool) -> None:
    # head_dim 32 and 8-key tiles: blocks straddle tile edges, and some tiles are fully visible (unmasked path).
    batch = make_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, num_q_heads=4, num_kv_heads=2, head_dim=32, extra_rows=1)
    want = dense_attention(batch, scale=0.3, window=window, softcap=0.0, blocks=MIXED_BLOCKS, spare=spare)
    got = run_triton(interpreted, batch, window=window, softcap=0.0, blocks=MIXED_BLOCKS, spare=spare, block_m=16,
                     block_n=8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the decode kernel, on the one-row sequences (a spared window reaches back to the block's start)
    decode = make_batch([1, 1, 1], [9, 16, 12], num_q_heads=4, num_kv_heads=2, head_dim=32)
    decode_blocks: Blocks = [[(1, 9)], [], [(0, 12)]]
    want = dense_attention(decode, scale=0.3, window=window, softcap=0.0, blocks=decode_blocks, spare=spare)
    got = run_triton(interpreted, decode, window=window, softcap=0.0, blocks=decode_blocks, spare=spare, block_n=16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_interpreter
def test_interpreted_write_kv(interpreted: ModuleType) -> None:
    k_cache = torch.zeros(6, 4, 2, 24)
    v_cache = torch.zeros_like(k_cache)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    # A strided key view, as the engine gets after transposing the model's [heads, T, D] layout.
    key = torch.randn(2, 5, 24).transpose(0, 1)
    value = torch.randn(5, 2, 24)
    slots = torch.tensor([9, -1, 0, 23, -1])
    interpreted.write_kv(key, value, k_cache, v_cache, slots)
    pa.reference_write_kv(key, value, want_k, want_v, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
