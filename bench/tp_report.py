"""Issue 18's table from bench/tp_call.sh's runs: W1 c=64 throughput and W2 TPOT at each tensor-parallel size,
with the TPOT floor of a sharded decode step.

Floor at N ranks: each GPU reads its 1/N of the decoder's weights and of the KV cache, plus the replicated
lm_head on rank 0 (we do not shard the vocabulary), over one GPU's measured copy bandwidth; the all-reduces
(2 per layer) are not in it, so the gap to it includes their cost.

    python3 -m bench.tp_report OUT_DIR   # reads OUT_DIR/<run>/results.json for runs tp1, tp2, tp72
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: run directory → (label, tensor-parallel size); the 72B run's size is in its directory's tp_size file
RUNS = {"tp1": ("Qwen2.5-VL-7B", 1), "tp2": ("Qwen2.5-VL-7B", 2), "tp72": ("Qwen2.5-VL-72B arch.", None)}


def floor_ms(meta: dict[str, Any], bandwidth_gbs: float, size: int, context_tokens: int) -> float:
    lm_head = meta["num_embedding_params"] * 2  # bf16, untied: the same size as the embedding table
    per_rank = (meta["decode_weight_bytes"] - lm_head) / size + lm_head + context_tokens * meta["kv_bytes_per_token"] / size
    return per_rank / (bandwidth_gbs * 1e9) * 1000.0


def row(out: Path, run: str, bandwidth: float | None) -> str:
    label, size = RUNS[run]
    path = out / run / "results.json"
    if not path.is_file():
        return f"| {label} | {size or '?'} | (no results) | | | |"
    results = json.loads(path.read_text())
    size = size or int((out / run / "tp_size").read_text())
    runs = (results.get("servers", {}).get("ours") or {}).get("runs", {})
    w1, w2 = runs.get("w1_c64", {}), runs.get("w2", {})
    tpot = (w2.get("tpot_ms") or {}).get("p50")
    floor = None
    if bandwidth and w2.get("completed") and "decode_weight_bytes" in (results.get("model") or {}):
        context = int(w2["mean_prompt_tokens"] + results.get("max_tokens", 128) / 2)
        floor = floor_ms(results["model"], bandwidth, size, context)
    ratio = f"{tpot / floor:.2f}" if tpot and floor else ""
    throughput = f"{w1['output_throughput']:.0f}" if w1.get("completed") else w1.get("skipped", "")
    return (f"| {label} | {size} | {throughput} | {f'{tpot:.2f}' if tpot else w2.get('skipped', '')} | "
            f"{f'{floor:.2f}' if floor else ''} | {ratio} |")


def main(out: Path) -> None:
    info = {}
    for run in RUNS:
        path = out / run / "results.json"
        if path.is_file():
            info = json.loads(path.read_text()).get("info") or info
            if info.get("copy_bandwidth_gbs"):
                break
    bandwidth = info.get("copy_bandwidth_gbs")
    print(f"card: {info.get('card', '?')}, copy bandwidth {bandwidth} GB/s per GPU")
    print("| model | TP | W1 c=64 output tok/s | W2 TPOT p50 ms | TPOT floor ms | ÷ floor |")
    print("|---|---|---|---|---|---|")
    for run in RUNS:
        print(row(out, run, bandwidth))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
