"""The round-2 plot: where a c=64 W1 step's time goes before and after (bench.engine_direct's per-piece timers,
same harness and card), and the vision tower's time and memory against the number of images (bench.vision_scaling).

    python -m bench.round2_plot --before bench/results/profile_engine_direct_h100.json \
        --after bench/results/round2_profile_engine_direct_h100.json \
        --tower bench/results/vision_scaling_cpu.json --out bench/results/round2_h100.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def step_pieces(report: dict[str, Any]) -> dict[str, float]:
    """Seconds per piece of the timed closed loop (eager prefill = GPU work minus the named pieces)."""
    timers = {k: v["total_ms"] / 1000 for k, v in report["w1_core_closed_loop_c64_timed"]["timers"].items()}
    tower, decode = timers["vision tower"], timers["decode graph replay"]
    prepare, execute, sampler = timers["prepare (incl. vision + prompt embedding)"], timers["execute (all GPU work)"], \
        timers["sampler"]
    return {"vision tower": tower, "decode graphs": decode, "eager prefill": execute - prepare - decode - sampler,
            "embedding + other prep": prepare - tower, "schedule + sample + rest": timers["step (total)"] - execute
            + sampler}


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--tower", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    before, after = json.loads(args.before.read_text()), json.loads(args.after.read_text())
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    bottom = [0.0, 0.0]
    for name in step_pieces(before):
        values = [step_pieces(before)[name], step_pieces(after)[name]]
        axes[0].bar(["round 1", "round 2"], values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    rates = [r["w1_core_closed_loop_c64_timed"]["output_tok_per_s"] for r in (before, after)]
    axes[0].set_title(f"W1 c=64, 192 requests, engine only ({before['device']})\n"
                      f"{rates[0]:,.0f} -> {rates[1]:,.0f} output tok/s")
    axes[0].set_ylabel("seconds (timed run)")
    axes[0].legend(fontsize=8)
    tower = json.loads(args.tower.read_text())
    for size, marker in (("448", "o"), ("high", "s")):
        for variant, style in (("segmented", "-"), ("dense", "--")):
            points = [p for p in tower["points"] if p["size"] == size and p["variant"] == variant and "ms" in p]
            if not points:
                continue
            label = f"{variant}, {size}"
            axes[1].plot([p["images"] for p in points], [p["ms"] / 1000 for p in points], style, marker=marker,
                         label=label)
            axes[2].plot([p["images"] for p in points], [p["peak_extra_mib"] for p in points], style, marker=marker,
                         label=label)
    for ax, what in ((axes[1], "seconds per tower call"), (axes[2], "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("images in one tower call")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
        ax.set_title(f"vision tower, {tower['device'][:40]}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
