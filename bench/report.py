"""results.json -> RESULTS.md (every metric, ratios, distance to the bandwidth floor) and plot.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.hw import tpot_floor_ms

OURS = "ours"
BASELINES = ("seed", "tserve")


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _dist(d: dict[str, Any] | None, keys: tuple[str, ...] = ("p50", "p90", "p99")) -> str:
    return " / ".join(_f((d or {}).get(k)) for k in keys)


def w1_phases(entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, summary) of an entry's W2 and W1 phases that ran, in order."""
    runs = entry.get("runs") or {}
    return [(name, run) for name, run in runs.items()
            if (name == "w2" or name.startswith("w1_")) and "completed" in run]


def _floor(results: dict[str, Any], run: dict[str, Any]) -> float | None:
    bandwidth = (results.get("info") or {}).get("copy_bandwidth_gbs")
    meta = results.get("model") or {}
    if not bandwidth or "decode_weight_bytes" not in meta or not run.get("completed"):
        return None
    context = run["mean_prompt_tokens"] + results.get("max_tokens", 128) / 2
    return tpot_floor_ms(meta, bandwidth, context_tokens=int(context), batch=run.get("concurrency", 1))


def _header(results: dict[str, Any]) -> list[str]:
    info, meta = results.get("info") or {}, results.get("model") or {}
    lines = [f"# vlmserve benchmark ({results.get('preset')} preset)", ""]
    lines.append(f"- Card: **{info.get('card', '?')}** ({info.get('memory_gib', '?')} GiB); torch "
                 f"{info.get('torch', '?')}, transformers {info.get('transformers', '?')}, CUDA {info.get('cuda', '?')}")
    lines.append(f"- Measured ceilings: device-to-device copy {_f(info.get('copy_bandwidth_gbs'))} GB/s (read + "
                 f"write), bf16 8192³ matmul {_f(info.get('bf16_matmul_tflops'))} TFLOP/s")
    if meta:
        lines.append(f"- Model: {meta.get('name')}: {meta.get('num_params', 0) / 1e9:.2f} B parameters "
                     f"({meta.get('num_vision_params', 0) / 1e9:.2f} B vision); a decode step reads at least "
                     f"{meta.get('decode_weight_bytes', 0) / 1e9:.2f} GB of weights + "
                     f"{meta.get('kv_bytes_per_token', 0) / 1024:.0f} KiB of KV per context token")
    lines.append(f"- Started {results.get('started')}, {results.get('elapsed_s')} s; output fixed at "
                 f"{results.get('max_tokens')} tokens (ignore_eos / min_new_tokens), greedy")
    plan = results.get("plan") or {}
    lines.append(f"- Requests: W2 {plan.get('w2_requests')} at c=1; W1 {plan.get('w1')} (concurrency: requests); "
                 f"W3 {plan.get('w3_conversations')} conversation(s) x 5 turns, {plan.get('w3_max_tokens')} "
                 f"tokens per answer; phase cap {plan.get('phase_cap_s')} s")
    if results.get("error"):
        lines.append(f"- **Run error:** `{results['error']}`")
    return [*lines, ""]


def _servers_table(results: dict[str, Any]) -> list[str]:
    lines = ["## Servers", "", "| server | ready after (s) | status | notes from its log |", "|---|---|---|---|"]
    for key, entry in results.get("servers", {}).items():
        status = entry.get("error") or "ok"
        notes = "<br>".join(n.replace("|", "\\|")[:200] for n in entry.get("notes", [])[:3])
        lines.append(f"| {entry.get('label', key)} | {_f(entry.get('ready_s'))} | {status} | {notes} |")
    return [*lines, ""]


def _w1_table(results: dict[str, Any]) -> list[str]:
    lines = ["## W1 throughput / W2 latency (448x448 image + ~100 text tokens in)", "",
             "Latencies in ms (p50 / p90 / p99). TPOT floor = bytes a decode step must read at this batch and "
             "context ÷ measured copy bandwidth.", "",
             "| server | phase | c | done/sent | req/s | out tok/s | TTFT | TPOT | TPOT mean | ITL | E2E | "
             "TPOT floor | TPOT p50 ÷ floor | prompt tok | truncated |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, entry in results.get("servers", {}).items():
        for name, run in w1_phases(entry):
            floor = _floor(results, run)
            tpot50 = run["tpot_ms"].get("p50")
            ratio = tpot50 / floor if floor and tpot50 and not math.isnan(tpot50) else None
            lines.append(
                f"| {key} | {name} | {run['concurrency']} | {run['completed']}/{run['num_requests']} | "
                f"{_f(run['request_throughput'], 2)} | {_f(run['output_throughput'])} | {_dist(run['ttft_ms'])} | "
                f"{_dist(run['tpot_ms'])} | {_f(run['tpot_ms'].get('mean'))} | {_dist(run['itl_ms'], ('p50', 'p99'))} | "
                f"{_dist(run['e2e_ms'], ('p50', 'p99'))} | {_f(floor, 2)} | {_f(ratio, 2)} | "
                f"{_f(run['mean_prompt_tokens'], 0)} | {'yes' if run.get('is_truncated') else 'no'} |")
    return [*lines, ""]


def _throughput(results: dict[str, Any], key: str) -> dict[int, float]:
    entry = results.get("servers", {}).get(key) or {}
    return {run["concurrency"]: run["output_throughput"] for name, run in w1_phases(entry) if name != "w2"}


def _ratios_table(results: dict[str, Any]) -> list[str]:
    ours = _throughput(results, OURS)
    base = {key: _throughput(results, key) for key in BASELINES}
    if not ours:
        return []
    lines = ["## Output-token throughput ratios (W1)", "",
             "| c | ours tok/s | seed tok/s | transformers serve tok/s | ours ÷ seed | ours ÷ transformers serve |",
             "|---|---|---|---|---|---|"]
    for c in sorted(ours):
        seed, tserve = base["seed"].get(c), base["tserve"].get(c)
        lines.append(f"| {c} | {_f(ours[c])} | {_f(seed)} | {_f(tserve)} | "
                     f"{_f(ours[c] / seed if seed else None, 2)} | {_f(ours[c] / tserve if tserve else None, 2)} |")
    return [*lines, ""]


def _w3_table(results: dict[str, Any]) -> list[str]:
    rows = []
    for key, entry in results.get("servers", {}).items():
        w3 = (entry.get("runs") or {}).get("w3") or {}
        turns = w3.get("turns") or []
        if not turns:
            continue
        p50 = [t["ttft_ms"].get("p50") for t in turns]
        prompts = [t.get("mean_prompt_tokens") for t in turns]
        rows.append(f"| {key} | " + " | ".join(f"{_f(v)} ({_f(p, 0)})" for v, p in zip(p50, prompts, strict=True))
                    + f" | {_f(p50[-1] / p50[0] if len(p50) == 5 and p50[0] else None, 2)} |")
    if not rows:
        return []
    lines = ["## W3: TTFT per turn, re-sending the image (p50 ms, prompt tokens in brackets)", "",
             "| server | turn 1 | turn 2 | turn 3 | turn 4 | turn 5 | turn 5 ÷ turn 1 |", "|---|---|---|---|---|---|---|",
             *rows]
    on = _turn5(results, OURS)
    off = _turn5(results, "ours-nocache")
    if on and off:
        lines += ["", f"Turn-5 TTFT with the prefix cache on ÷ off: **{on / off:.2f}** (target ≤ 0.25)."]
    return [*lines, ""]


def _turn5(results: dict[str, Any], key: str) -> float | None:
    turns = (((results.get("servers", {}).get(key) or {}).get("runs") or {}).get("w3") or {}).get("turns") or []
    return turns[4]["ttft_ms"].get("p50") if len(turns) >= 5 else None


def write_plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [("output_throughput", None, "output tokens/s"), ("tpot_ms", "p50", "p50 TPOT (ms)"),
              ("ttft_ms", "p50", "p50 TTFT (ms)")]
    for key, entry in results.get("servers", {}).items():
        runs = [run for name, run in w1_phases(entry) if name != "w2"]
        if not runs:
            continue
        xs = [run["concurrency"] for run in runs]
        for ax, (metric, stat, _) in zip(axes, panels, strict=True):
            ys = [run[metric][stat] if stat else run[metric] for run in runs]
            ax.plot(xs, ys, marker="o", label=entry.get("label", key))
    info = results.get("info") or {}
    concurrencies = sorted({run["concurrency"] for entry in results.get("servers", {}).values()
                            for name, run in w1_phases(entry) if name != "w2"})
    for ax, (_, _, label) in zip(axes, panels, strict=True):
        ax.set_xscale("log", base=2)
        if concurrencies:
            ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_yscale("log")
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"W1 (448x448 image + ~100 tokens in, {results.get('max_tokens')} out) on {info.get('card', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    """Write results.json, RESULTS.md and plot.png into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slim = {**results, "servers": {k: {kk: vv for kk, vv in v.items() if kk != "log_tail"}
                                   for k, v in results.get("servers", {}).items()}}
    (out_dir / "results.json").write_text(json.dumps(slim, indent=2, default=str))
    lines = [*_header(results), *_servers_table(results), *_w1_table(results), *_ratios_table(results),
             *_w3_table(results)]
    if not write_plot(results, out_dir / "plot.png"):
        lines.append("(plot.png not written: matplotlib is not installed here)")
    (out_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")


def merge(paths: list[Path]) -> dict[str, Any]:
    """Several calls' results.json as one (servers united); refuses mixing cards, whose timings don't compare."""
    merged: dict[str, Any] = {}
    for path in paths:
        results = json.loads(path.read_text())
        if not merged:
            merged = {**results, "servers": {}}
        card, first = (results.get("info") or {}).get("card"), (merged.get("info") or {}).get("card")
        if card != first:
            raise SystemExit(f"{path} ran on {card}, not {first}: rerun it on the same card")
        merged["servers"].update(results.get("servers", {}))
    merged["elapsed_s"] = round(sum(float(json.loads(p.read_text()).get("elapsed_s") or 0) for p in paths), 1)
    return merged


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Merge results.json files of several GPU calls into one report.")
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    write_report(merge(args.results), args.out)


if __name__ == "__main__":
    main()
