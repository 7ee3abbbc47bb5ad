"""Paged-attention kernels on the GPU: correctness vs the torch reference, then speed vs SDPA baselines.

Shapes: Qwen2.5-VL-7B's text model (28 query heads, 4 KV heads, head_dim 128), bf16, block_size 16.
Decode is reported as achieved KV-read bandwidth against a device-to-device copy measured in the same run;
prefill as TFLOP/s against torch SDPA on the same data, (a) gathered from the paged cache, (b) contiguous.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/attention_kernels.py [--no-sweep | --full-sweep]
    PYTHONPATH=. python3 bench/attention_kernels.py --cpu-dry-run   # tiny sizes, Triton interpreter, no GPU

Writes attention_kernels.json and attention_kernels.md to $OUT (default ./build/attention_bench).
"""

from __future__ import annotations

import os
import sys

IS_DRY_RUN = "--cpu-dry-run" in sys.argv
if IS_DRY_RUN:  # must precede the triton import
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

from vlmserve.engine import paged_attention as pa  # noqa: E402
from vlmserve.engine import triton_attention as ta  # noqa: E402

if IS_DRY_RUN:
    DEVICE, DTYPE, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = "cpu", torch.float32, 7, 1, 32, 4
    DECODE_CASES = [(1, 40), (3, 20)]
    PREFILL_CASES = [(1, 24, 0), (2, 8, 16)]  # (num_seqs, q_len, prefix_len)
else:
    DEVICE, DTYPE, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = "cuda", torch.bfloat16, 28, 4, 128, 16
    DECODE_CASES = [(1, 512), (1, 2000), (8, 512), (8, 2000), (32, 2000), (64, 300), (64, 1000), (64, 2000)]
    PREFILL_CASES = [(1, 2048, 0), (1, 512, 1536), (4, 512, 0), (2, 1024, 1024), (4, 256, 1744)]
SCALE = HEAD_DIM**-0.5
MAX_REL_ERR = 1e-2


def make_step(q_lens: list[int], seq_lens: list[int], *, seed: int) -> dict[str, Any]:
    """Fresh random step: caches with shuffled physical blocks, block tables, packed queries."""
    torch.manual_seed(seed)
    blocks_per_seq = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 1
    physical = torch.randperm(num_blocks).tolist()
    table = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    for seq, count in enumerate(blocks_per_seq):
        table[seq, :count] = torch.tensor([physical.pop() for _ in range(count)])
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    cu = [0]
    for q_len in q_lens:
        cu.append(cu[-1] + q_len)
    return {
        "query": torch.randn(cu[-1], NUM_Q_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE),
        "k_cache": torch.randn(shape, device=DEVICE, dtype=DTYPE), "v_cache": torch.randn(shape, device=DEVICE, dtype=DTYPE),
        "cu_seqlens_q": torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), "block_tables": table.to(DEVICE),
        "max_q_len": max(q_lens), "max_seq_len": max(seq_lens),
    }


def run_kernel(step: dict[str, Any], *, window: int | None = None, softcap: float = 0.0, out: torch.Tensor | None = None,
               **tunables: int) -> torch.Tensor:
    out = torch.zeros_like(step["query"]) if out is None else out
    args = [step[k] for k in ("query", "k_cache", "v_cache", "cu_seqlens_q", "seq_lens", "block_tables")]
    if step["max_q_len"] == 1:
        return ta.decode_attention(*args, scale=SCALE, max_seq_len=step["max_seq_len"], sliding_window=window,
                                   softcap=softcap, out=out, **tunables)
    return ta.prefill_attention(*args, scale=SCALE, max_q_len=step["max_q_len"], sliding_window=window,
                                softcap=softcap, out=out, **tunables)


def run_reference(step: dict[str, Any], *, window: int | None = None, softcap: float = 0.0) -> torch.Tensor:
    args = [step[k] for k in ("query", "k_cache", "v_cache", "cu_seqlens_q", "seq_lens", "block_tables")]
    return pa.reference_paged_attention(*args, scale=SCALE, sliding_window=window, softcap=softcap,
                                        out=torch.zeros(step["query"].shape, device=DEVICE, dtype=torch.float32))


def compare(name: str, got: torch.Tensor, want: torch.Tensor, rows: slice | None = None) -> dict[str, Any]:
    got, want = got.float()[rows or slice(None)], want.float()[rows or slice(None)]
    rel = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    result = {"check": name, "rel_err": rel, "max_abs_err": (got - want).abs().max().item(), "ok": rel <= MAX_REL_ERR}
    print(f"  {'ok ' if result['ok'] else 'BAD'} {name}: rel {rel:.2e}, max abs {result['max_abs_err']:.2e}")
    return result


def correctness_checks() -> list[dict[str, Any]]:
    print("correctness (fresh inputs per check; fp32 torch reference):")
    small = IS_DRY_RUN
    gen = torch.Generator().manual_seed(1)
    mixed = torch.randint(10 if small else 300, 40 if small else 2001, (6 if small else 64,), generator=gen).tolist()
    cases: list[tuple[str, list[int], list[int], dict[str, Any]]] = [
        ("decode b1 long ctx (split-KV)", [1], [40 if small else 2000], {}),
        ("decode mixed ctx 300-2000", [1] * len(mixed), mixed, {}),
        ("decode window+softcap", [1] * len(mixed), mixed, {"window": 9 if small else 512, "softcap": 30.0}),
        ("decode forced 1 split", [1, 1], [33, 21] if small else [1999, 700], {"num_splits": 1}),
        ("prefill 2048 from empty", [24 if small else 2048], [24 if small else 2048], {}),
        ("chunk 512 over 1536 prefix", [8 if small else 512], [32 if small else 2048], {}),
        ("packed prefill chunks + decode rows", [8, 1, 5, 1, 1] if small else [512, 1, 300, 1, 1, 1024],
         [20, 30, 5, 9, 40] if small else [1500, 900, 300, 1200, 2000, 1024], {}),
        ("prefill window+softcap", [8, 5] if small else [777, 512], [20, 5] if small else [1800, 512],
         {"window": 6 if small else 256, "softcap": 30.0}),
    ]
    results = []
    for seed, (name, q_lens, seq_lens, options) in enumerate(cases):
        step = make_step(q_lens, seq_lens, seed=100 + seed)
        kernel_options = {k: v for k, v in options.items() if k in ("window", "softcap")}
        results.append(compare(name, run_kernel(step, **options), run_reference(step, **kernel_options)))
    results.append(check_padding_rows())
    results.append(check_write_kv())
    if not IS_DRY_RUN:
        results.append(check_cuda_graph())
    return results


def check_padding_rows() -> dict[str, Any]:
    step = make_step([1, 1, 1, 1], [17, 0, 33, 0], seed=7)
    step["block_tables"][1] = 0
    out = pa.paged_attention(*[step[k] for k in ("query", "k_cache", "v_cache", "cu_seqlens_q", "seq_lens",
                                                 "block_tables")], scale=SCALE, max_q_len=1, max_seq_len=64)
    result = compare("padding rows (seq_len 0) in a decode batch", out, run_reference(step))
    result["ok"] = result["ok"] and torch.count_nonzero(out[[1, 3]]).item() == 0
    return result


def check_write_kv() -> dict[str, Any]:
    step = make_step([1], [64], seed=8)
    key = torch.randn(6, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    value = torch.randn_like(key)
    slots = torch.tensor([5, -1, 17, 63, -1, 0], device=DEVICE)
    want_k, want_v = step["k_cache"].clone(), step["v_cache"].clone()
    pa.reference_write_kv(key, value, want_k, want_v, slots)
    pa.write_kv(key, value, step["k_cache"], step["v_cache"], slots)
    is_equal = torch.equal(step["k_cache"], want_k) and torch.equal(step["v_cache"], want_v)
    print(f"  {'ok ' if is_equal else 'BAD'} write_kv with -1 slots: exact match {is_equal}")
    return {"check": "write_kv with -1 slots", "ok": is_equal}


def check_cuda_graph() -> dict[str, Any]:
    """Capture write_kv + decode attention for a padded batch (captured max_seq_len 4096), replay on new data."""
    lens = [700, 1999, 5, 1200, 300, 64, 0, 0]  # two padding sequences
    step = make_step([1] * 8, [n + 1 for n in lens[:6]] + [0, 0], seed=9)
    key = torch.randn(8, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    value, out = torch.randn_like(key), torch.zeros_like(step["query"])
    slots = torch.full((8,), -1, dtype=torch.int64, device=DEVICE)
    args = [step[k] for k in ("query", "k_cache", "v_cache", "cu_seqlens_q", "seq_lens", "block_tables")]

    def decode_step() -> None:
        pa.write_kv(key, value, step["k_cache"], step["v_cache"], slots)
        pa.paged_attention(*args, scale=SCALE, max_q_len=1, max_seq_len=4096, out=out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_step()
    # New inputs copied into the static buffers: the new token of each real sequence goes to its next slot.
    table = step["block_tables"]
    new_slots = [int(table[s, n // BLOCK_SIZE]) * BLOCK_SIZE + n % BLOCK_SIZE for s, n in enumerate(lens[:6])]
    slots.copy_(torch.tensor([*new_slots, -1, -1]))
    key.copy_(torch.randn_like(key))
    value.copy_(torch.randn_like(value))
    step["query"].copy_(torch.randn_like(step["query"]))
    want_k, want_v = step["k_cache"].clone(), step["v_cache"].clone()
    pa.reference_write_kv(key, value, want_k, want_v, slots)
    graph.replay()
    torch.cuda.synchronize()
    is_cache_equal = torch.equal(step["k_cache"], want_k) and torch.equal(step["v_cache"], want_v)
    result = compare("CUDA graph replay (write_kv + decode, padded)", out, run_reference(step))
    result["ok"] = result["ok"] and is_cache_equal and torch.count_nonzero(out[6:]).item() == 0
    return result


def timed(fn: Callable[[], Any]) -> float:
    """Median milliseconds of eager calls (do_bench flushes L2 between runs; includes CPU launch cost)."""
    if IS_DRY_RUN:
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_timed(calls: list[Callable[[], Any]]) -> float:
    """Median GPU milliseconds per call: one CUDA graph runs every call once, each on its own input set.

    The sets together exceed L2 (see ``num_sets``), so no call finds its inputs cached, and a graph has no
    per-call CPU launch cost: this is what the engine's graph-captured decode sees.
    """
    if IS_DRY_RUN:
        return timed(calls[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:  # compile and warm up outside the capture
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return timed(graph.replay) / len(calls)


def num_sets(bytes_per_set: int) -> int:
    """Input sets per timing graph: >= 256 MB in all (H100 L2 is 50 MB), between 2 and 128 sets."""
    return 1 if IS_DRY_RUN else min(128, max(2, math.ceil((256 << 20) / bytes_per_set)))


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB; bytes read + written per second (GB/s)."""
    num_bytes = (1 << 20) if IS_DRY_RUN else (1 << 30)
    src = torch.empty(num_bytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * num_bytes / timed(lambda: dst.copy_(src)) / 1e6


def sdpa_runner(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, is_causal: bool) -> tuple[Callable, str]:
    """Pick the SDPA call once: flash with native GQA if it runs, else default dispatch with expanded KV heads."""
    group = NUM_Q_HEADS // NUM_KV_HEADS
    attempts: list[tuple[str, Callable]] = [
        ("flash+gqa", lambda q, k, v: _sdpa(q, k, v, mask, is_causal, SDPBackend.FLASH_ATTENTION, gqa=True)),
        ("default+gqa", lambda q, k, v: _sdpa(q, k, v, mask, is_causal, None, gqa=True)),
        ("default+expand", lambda q, k, v: _sdpa(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                  mask, is_causal, None, gqa=False)),
    ]
    for name, fn in attempts:
        try:
            fn(q, k, v)
            return fn, name
        except Exception as error:  # a probe: any failure means try the next variant
            print(f"    sdpa {name} unavailable: {str(error).splitlines()[0][:120]}")
    raise RuntimeError("no SDPA variant ran")


def _sdpa(q, k, v, mask, is_causal, backend, *, gqa: bool):  # type: ignore[no-untyped-def]
    kwargs = {"enable_gqa": True} if gqa else {}
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=SCALE, **kwargs)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=SCALE, **kwargs)


def gathered_kv(step: dict[str, Any], num_seqs: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, kv_heads, seq_len, D] gathered from the paged cache (equal lengths)."""
    num_blocks = math.ceil(seq_len / BLOCK_SIZE)
    table = step["block_tables"][:, :num_blocks].long()
    shape = (num_seqs, num_blocks * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k = step["k_cache"][table].view(shape)[:, :seq_len].transpose(1, 2)
    v = step["v_cache"][table].view(shape)[:, :seq_len].transpose(1, 2)
    return k, v


def step_bytes(step: dict[str, Any]) -> int:
    return sum(step[k].numel() * step[k].element_size() for k in ("query", "k_cache", "v_cache"))


def measure(q_lens: list[int], seq_lens: list[int], *, with_baselines: bool, with_eager: bool = True,
            **tunables: int) -> dict[str, Any]:
    """Triton (graph-timed and eager) and, for equal-length sequences, (a) gather + SDPA and (b) contiguous SDPA."""
    first = make_step(q_lens, seq_lens, seed=0)
    steps = [first] + [make_step(q_lens, seq_lens, seed=i) for i in range(1, num_sets(step_bytes(first)))]
    outs = [torch.zeros_like(step["query"]) for step in steps]
    calls = [lambda step=step, out=out: run_kernel(step, out=out, **tunables) for step, out in zip(steps, outs, strict=True)]
    result: dict[str, Any] = {"num_sets": len(steps), "triton_ms": graph_timed(calls)}
    if with_eager:
        result["triton_eager_ms"] = timed(calls[0])
    if not with_baselines:
        return result
    num_seqs, q_len, seq_len = len(q_lens), q_lens[0], seq_lens[0]
    queries = [s["query"].view(num_seqs, q_len, NUM_Q_HEADS, HEAD_DIM).transpose(1, 2) for s in steps]
    is_causal, mask = q_len > 1 and q_len == seq_len, None
    if 1 < q_len < seq_len:
        mask = causal_lower_right(q_len, seq_len)
    contiguous = [tuple(t.contiguous() for t in gathered_kv(s, num_seqs, seq_len)) for s in steps]
    fn, result["sdpa_variant"] = sdpa_runner(queries[0], *contiguous[0], mask, is_causal)
    result["gather_sdpa_ms"] = graph_timed(
        [lambda s=s, q=q: fn(q, *gathered_kv(s, num_seqs, seq_len)) for s, q in zip(steps, queries, strict=True)])
    result["sdpa_contiguous_ms"] = graph_timed([lambda q=q, kv=kv: fn(q, *kv) for q, kv in zip(queries, contiguous, strict=True)])
    return result


def mixed_lengths(num_seqs: int) -> list[int]:
    gen = torch.Generator().manual_seed(2)
    return torch.randint(10 if IS_DRY_RUN else 300, 40 if IS_DRY_RUN else 2001, (num_seqs,), generator=gen).tolist()


def bench_decode(copy_gbps: float) -> list[dict[str, Any]]:
    print("decode (one query row per sequence; GPU time per call from CUDA-graph replay):")
    mixed = mixed_lengths(6 if IS_DRY_RUN else 64)
    cases = [([ctx] * num_seqs, True) for num_seqs, ctx in DECODE_CASES] + [(mixed, False)]
    rows = []
    for seq_lens, with_baselines in cases:
        num_seqs = len(seq_lens)
        kv_bytes = sum(seq_lens) * NUM_KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize
        row: dict[str, Any] = {"num_seqs": num_seqs, "ctx": seq_lens[0] if with_baselines else "300-2000 mixed",
                               "kv_mb": kv_bytes / 1e6, "floor_ms": kv_bytes / copy_gbps / 1e6,
                               "num_splits": ta.choose_num_splits(num_seqs, NUM_KV_HEADS, max(seq_lens),
                                                                  torch.device(DEVICE))}
        row.update(measure([1] * num_seqs, seq_lens, with_baselines=with_baselines))
        row["triton_gbps"] = kv_bytes / row["triton_ms"] / 1e6
        row["pct_of_copy_bw"] = 100 * row["triton_gbps"] / copy_gbps
        rows.append(row)
        print(f"  b{num_seqs:<3} ctx {row['ctx']!s:<5} triton {row['triton_ms'] * 1e3:7.1f} us "
              f"({row['triton_gbps']:6.0f} GB/s, {row['pct_of_copy_bw']:4.1f}% copy bw, floor "
              f"{row['floor_ms'] * 1e3:.1f} us, splits {row['num_splits']}, eager {row['triton_eager_ms'] * 1e3:.0f} us)"
              + (f" | gather+sdpa {row['gather_sdpa_ms'] * 1e3:7.1f} us | sdpa contiguous "
                 f"{row['sdpa_contiguous_ms'] * 1e3:7.1f} us" if with_baselines else ""))
    return rows


def prefill_flops(num_seqs: int, q_len: int, prefix: int) -> float:
    visible = q_len * prefix + q_len * (q_len + 1) / 2  # keys seen, summed over query rows
    return 4.0 * num_seqs * NUM_Q_HEADS * HEAD_DIM * visible


def bench_prefill() -> list[dict[str, Any]]:
    print("prefill / chunked prefill over a paged prefix (GPU time per call from CUDA-graph replay):")
    rows = []
    for num_seqs, q_len, prefix in PREFILL_CASES:
        row: dict[str, Any] = {"num_seqs": num_seqs, "q_len": q_len, "prefix": prefix}
        row.update(measure([q_len] * num_seqs, [prefix + q_len] * num_seqs, with_baselines=True))
        flops = prefill_flops(num_seqs, q_len, prefix)
        for key in ("triton", "gather_sdpa", "sdpa_contiguous"):
            row[f"{key}_tflops"] = flops / row[f"{key}_ms"] / 1e9
        row["triton_vs_sdpa"] = row["triton_ms"] / row["sdpa_contiguous_ms"]
        rows.append(row)
        print(f"  {num_seqs}x{q_len} over {prefix}: triton {row['triton_ms'] * 1e3:7.1f} us "
              f"({row['triton_tflops']:5.1f} TF/s) | gather+sdpa {row['gather_sdpa_ms'] * 1e3:7.1f} us | "
              f"sdpa {row['sdpa_contiguous_ms'] * 1e3:7.1f} us ({row['sdpa_contiguous_tflops']:5.1f} TF/s, "
              f"{row['sdpa_variant']}) | triton/sdpa {row['triton_vs_sdpa']:.2f}x")
    return rows


def sweep_plan(is_full: bool) -> list[tuple[tuple[int, ...], list[dict[str, int]]]]:
    """(shape, configs): (num_seqs, ctx) for decode, (num_seqs, q_len, prefix) for prefill; shape (64, 0) = mixed."""
    if IS_DRY_RUN:
        return [((3, 20), [{"block_n": 16, "split_block_n": 16}, {"num_splits": 2}]),
                ((1, 24, 0), [{"block_m": 64, "block_n": 16}])]
    splits = [{"num_splits": n} for n in (1, 2, 4, 8, 16, 32)]
    if not is_full:  # confirms the defaults around their neighbours
        return [((64, 2000), [{"block_n": 64}]), ((64, 0), splits[:3]), ((1, 2000), splits[3:]),
                ((1, 512), splits[2:5]), ((8, 2000), splits[2:5]),
                ((1, 512, 1536), [{"block_m": 128, "block_n": 64, "num_warps": 8}])]
    decode_tiles = [{"block_n": n, "num_stages": st} for n in (64, 128) for st in (2, 3)]
    decode_tiles += [{"block_n": 32}, {"block_n": 128, "num_warps": 8}, {"block_n": 128, "num_splits": 2}]
    prefill = [{"block_m": m, "block_n": n, "num_warps": w, "num_stages": st}
               for m, n, w, st in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                                   (64, 128, 4, 2), (64, 64, 8, 3)]]
    return [((64, 2000), decode_tiles), ((64, 1000), decode_tiles[:4]), ((64, 300), splits[:3]),
            ((32, 2000), splits[:5]), ((8, 2000), splits[:5]), ((1, 2000), splits), ((1, 512), splits[:5]),
            ((1, 2048, 0), prefill), ((1, 512, 1536), prefill), ((4, 256, 1744), prefill)]


def sweep(is_full: bool) -> list[dict[str, Any]]:
    """Launch-parameter sweep on representative shapes, graph-timed (defaults live in triton_attention)."""
    print("sweep (GPU us per call):")
    rows = []
    for shape, configs in sweep_plan(is_full):
        is_decode = len(shape) == 2
        q_lens = [1] * shape[0] if is_decode else [shape[1]] * shape[0]
        seq_lens = [shape[1]] * shape[0] if is_decode else [shape[1] + shape[2]] * shape[0]
        if shape[-1] == 0 and is_decode:
            seq_lens = mixed_lengths(shape[0])
        timings = []
        for config in [{}, *configs]:
            ms = measure(q_lens, seq_lens, with_baselines=False, with_eager=False, **config)["triton_ms"]
            timings.append((ms, config or "default"))
            rows.append({"shape": list(shape), "config": config or "default", "ms": ms})
        timings.sort(key=lambda item: item[0])
        print(f"  {shape}: " + "; ".join(f"{ms * 1e3:.1f} {config}" for ms, config in timings[:4])
              + f" ... default {next(ms for ms, c in timings if c == 'default') * 1e3:.1f}")
    return rows


def environment() -> dict[str, Any]:
    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "dry_run": IS_DRY_RUN, "decode_defaults": ta.DECODE_DEFAULTS, "prefill_defaults": ta.PREFILL_DEFAULTS}
    if not IS_DRY_RUN:
        props = torch.cuda.get_device_properties(0)
        info.update(card=props.name, num_sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    return info


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"card: {env.get('card', 'cpu dry run')}; torch {env['torch']}, triton {env['triton']}; "
             f"copy bandwidth {report['copy_gbps']:.0f} GB/s", "",
             "GPU time per call from CUDA-graph replay over input sets larger than L2; eager = one Python call.", "",
             "| decode | triton us | GB/s | % copy bw | floor us | splits | eager us | gather+SDPA us | SDPA contiguous us |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["decode"]:
        base = (f"{r['gather_sdpa_ms'] * 1e3:.1f} | {r['sdpa_contiguous_ms'] * 1e3:.1f}" if "gather_sdpa_ms" in r
                else "n/a | n/a")
        lines.append(f"| b{r['num_seqs']} ctx {r['ctx']} | {r['triton_ms'] * 1e3:.1f} | {r['triton_gbps']:.0f} | "
                     f"{r['pct_of_copy_bw']:.0f}% | {r['floor_ms'] * 1e3:.1f} | {r['num_splits']} | "
                     f"{r['triton_eager_ms'] * 1e3:.0f} | {base} |")
    lines += ["", "| prefill | triton us (TF/s) | gather+SDPA us | SDPA contiguous us (TF/s) | triton / SDPA |",
              "|---|---|---|---|---|"]
    for r in report["prefill"]:
        lines.append(f"| {r['num_seqs']}x{r['q_len']} over {r['prefix']} | {r['triton_ms'] * 1e3:.1f} "
                     f"({r['triton_tflops']:.0f}) | {r['gather_sdpa_ms'] * 1e3:.1f} | {r['sdpa_contiguous_ms'] * 1e3:.1f} "
                     f"({r['sdpa_contiguous_tflops']:.0f}, {r['sdpa_variant']}) | {r['triton_vs_sdpa']:.2f}x |")
    bad = [c["check"] for c in report["checks"] if not c["ok"]]
    lines += ["", f"correctness: {len(report['checks']) - len(bad)}/{len(report['checks'])} checks ok" +
              (f"; FAILED: {bad}" if bad else "")]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU with the Triton interpreter")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-parameter sweep")
    parser.add_argument("--full-sweep", action="store_true", help="the wide sweep the defaults were chosen from")
    args = parser.parse_args()
    if not IS_DRY_RUN and not torch.cuda.is_available():
        print("no CUDA device: use --cpu-dry-run to exercise this script on CPU")
        return 2
    out_dir = Path(os.environ.get("OUT") or "build/attention_bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": environment()}
    print(json.dumps(report["environment"]))

    def save() -> None:
        (out_dir / "attention_kernels.json").write_text(json.dumps(report, indent=1))

    report["checks"] = correctness_checks()
    save()
    report["copy_gbps"] = copy_bandwidth()
    print(f"copy bandwidth: {report['copy_gbps']:.0f} GB/s (read + write of a 1 GiB device-to-device copy)")
    report["decode"] = bench_decode(report["copy_gbps"])
    save()
    report["prefill"] = bench_prefill()
    save()
    table = markdown(report)
    (out_dir / "attention_kernels.md").write_text(table)
    print(table)
    if not args.no_sweep:
        report["sweep"] = sweep(args.full_sweep)
        save()
    return 0 if all(c["ok"] for c in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
