"""Bidirectional blocks in the paged-attention kernels on the GPU: correctness vs the torch reference, and what the
block path costs against the plain causal path on the same step.

Shapes: Gemma 3 27B's text attention (32 query heads, 16 KV heads, head_dim 128, sliding window 1024), bf16,
block_size 16. Steps: prompts of 2048 tokens holding four 256-token image blocks (Gemma 3: the window cuts them),
the same with a window of 512 and one 2048-token prefix block that the window spares (PaliGemma 2), a prefill chunk
over a cached prefix with a block straddling the chunk start, and single-row sequences whose spared block starts
before their window (the decode kernel).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/bidirectional_attention.py
    PYTHONPATH=. python3 bench/bidirectional_attention.py --cpu-dry-run   # tiny sizes, Triton interpreter, no GPU

Writes bidirectional_attention.json to $OUT (default ./build/bidirectional_bench).
"""

from __future__ import annotations

import os
import sys

IS_DRY_RUN = "--cpu-dry-run" in sys.argv
if IS_DRY_RUN:  # must precede the triton import
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from vlmserve.engine import paged_attention as pa  # noqa: E402
from vlmserve.engine import triton_attention as ta  # noqa: E402

if IS_DRY_RUN:
    DEVICE, DTYPE, NUM_Q, NUM_KV, HEAD_DIM, BLOCK_SIZE, UNIT = "cpu", torch.float32, 4, 2, 32, 4, 8
else:
    DEVICE, DTYPE, NUM_Q, NUM_KV, HEAD_DIM, BLOCK_SIZE, UNIT = "cuda", torch.bfloat16, 32, 16, 128, 16, 256
SCALE = HEAD_DIM**-0.5
MAX_REL_ERR = 1e-2
Blocks = list[list[tuple[int, int]]]


def make_step(q_lens: list[int], seq_lens: list[int], blocks: Blocks, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    per_seq = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(per_seq) + 1
    physical = torch.randperm(num_blocks).tolist()
    table = torch.zeros(len(seq_lens), max(per_seq) + 1, dtype=torch.int32)
    for seq, count in enumerate(per_seq):
        table[seq, :count] = torch.tensor([physical.pop() for _ in range(count)])
    cu = [0]
    for q_len in q_lens:
        cu.append(cu[-1] + q_len)
    lo, hi = [], []
    for seq, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
        for pos in range(seq_len - q_len, seq_len):
            bounds = next(((s, e - 1) for s, e in blocks[seq] if s <= pos < e), (pos, pos))
            lo.append(bounds[0])
            hi.append(bounds[1])
    shape = (num_blocks, BLOCK_SIZE, NUM_KV, HEAD_DIM)
    return {
        "args": (torch.randn(cu[-1], NUM_Q, HEAD_DIM, device=DEVICE, dtype=DTYPE),
                 torch.randn(shape, device=DEVICE, dtype=DTYPE), torch.randn(shape, device=DEVICE, dtype=DTYPE),
                 torch.tensor(cu, dtype=torch.int32, device=DEVICE),
                 torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), table.to(DEVICE)),
        "bounds": (torch.tensor(lo, dtype=torch.int32, device=DEVICE), torch.tensor(hi, dtype=torch.int32, device=DEVICE)),
        "max_q_len": max(q_lens), "max_seq_len": max(seq_lens),
    }


def kernel(step: dict[str, Any], window: int | None, spare: bool, use_blocks: bool = True) -> torch.Tensor:
    out = torch.zeros_like(step["args"][0])
    return ta.paged_attention(*step["args"], scale=SCALE, max_q_len=step["max_q_len"], max_seq_len=step["max_seq_len"],
                              sliding_window=window, softcap=0.0, out=out,
                              block_bounds=step["bounds"] if use_blocks else None, blocks_spare_window=spare)


def reference(step: dict[str, Any], window: int | None, spare: bool) -> torch.Tensor:
    out = torch.zeros(step["args"][0].shape, device=DEVICE, dtype=torch.float32)
    return pa.reference_paged_attention(*step["args"], scale=SCALE, sliding_window=window, out=out,
                                        block_bounds=step["bounds"], blocks_spare_window=spare)


def milliseconds(fn: Any) -> float:
    if IS_DRY_RUN:
        return float("nan")
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def cases() -> list[tuple[str, list[int], list[int], Blocks, int | None, bool]]:
    u = UNIT
    images = [(u * (2 * i) + 8, u * (2 * i + 1) + 8) for i in range(4)]  # four image blocks in 8u tokens
    prompt = 8 * u
    return [
        ("gemma3 prefill, 4 image blocks, window 4u", [prompt, prompt], [prompt, prompt], [images, images], 4 * u, False),
        ("gemma3 full layer, same step", [prompt, prompt], [prompt, prompt], [images, images], None, False),
        ("paligemma2 prefix block, spared window 2u", [prompt], [prompt], [[(0, prompt)]], 2 * u, True),
        ("chunk over a cached prefix, block straddling its start", [3 * u + 8], [prompt],
         [[(5 * u - 16, 5 * u + 8), (6 * u, 7 * u)]], 4 * u, False),
        ("decode rows, spared block before the window", [1] * 8, [prompt - i for i in range(8)],
         [[(0, prompt - i)] for i in range(8)], 2 * u, True),
    ]


def main() -> None:
    out_dir = Path(os.environ.get("OUT", "build/bidirectional_bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu (Triton interpreter)" if IS_DRY_RUN else torch.cuda.get_device_name()
    print(f"device: {device}")
    results = []
    for seed, (name, q_lens, seq_lens, blocks, window, spare) in enumerate(cases()):
        step = make_step(q_lens, seq_lens, blocks, seed)
        got, want = kernel(step, window, spare).float(), reference(step, window, spare)
        rel = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        with_blocks = milliseconds(lambda step=step, window=window, spare=spare: kernel(step, window, spare))
        causal = milliseconds(lambda step=step, window=window: kernel(step, window, False, use_blocks=False))
        result = {"case": name, "rel_err": rel, "ok": rel <= MAX_REL_ERR, "blocks_ms": with_blocks,
                  "causal_ms": causal, "blocks_over_causal": with_blocks / causal if causal == causal else None}
        print(f"  {'ok ' if result['ok'] else 'BAD'} {name}: rel {rel:.2e}; blocks {with_blocks:.3f} ms, "
              f"causal {causal:.3f} ms")
        results.append(result)
    report = {"device": device, "dtype": str(DTYPE), "heads": [NUM_Q, NUM_KV, HEAD_DIM], "results": results}
    (out_dir / "bidirectional_attention.json").write_text(json.dumps(report, indent=2))
    if not all(r["ok"] for r in results):
        raise SystemExit("a kernel disagrees with the torch reference")


if __name__ == "__main__":
    main()
