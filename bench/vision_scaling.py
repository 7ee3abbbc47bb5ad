"""Vision tower time and peak memory against the number of images in one tower call (issue 19).

A Qwen2.5-VL vision tower (full size on the GPU; the published patch/window geometry with narrower layers on the
CPU) encodes N images of one size in one call, as the engine does for the prompts that start in one step, with:

- `segmented`: vlmserve's attention now (one mask-free SDPA call per distinct segment length);
- `dense`: what vlmserve did before (one SDPA call with a dense T x T block-diagonal mask over every patch).

    python -m bench.vision_scaling --device cpu --out /tmp/vision          # CPU, small tower
    python3 -m bench.vision_scaling --device cuda --out "$OUT"              # GPU, the full 0.68 B tower

Each CPU point runs in its own process, so that the process's peak resident memory is that point's; on the GPU the
peak is torch's `max_memory_allocated` over the call, minus what was allocated before it (weights and inputs).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.models import QWEN25_VL_7B_CONFIG

#: pixel budgets: the W1 image, and the server's high-detail budget (--high-detail-pixels, 2048 x 2048)
SIZES = {"448": 448 * 448, "high": 2048 * 2048}
COUNTS = (1, 2, 4, 8, 16)
#: the dense variant is skipped where its mask alone would exceed this (it would only measure swapping or OOM)
DENSE_MASK_LIMIT_BYTES = {"cpu": 4 << 30, "cuda": 60 << 30}
_SMALL_VISION = {"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
                 "fullatt_block_indexes": [1, 3]}


def dense_mask_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                         cu_seq_lens_q: torch.Tensor | None = None, is_causal: bool = False,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention vlmserve used before issue 19: a T x T block-diagonal mask over the whole concatenation."""
    assert cu_seq_lens_q is not None
    length = query.shape[2]
    segment = torch.bucketize(torch.arange(length, device=query.device), cu_seq_lens_q[1:], right=True)
    mask = segment.unsqueeze(0) == segment.unsqueeze(1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def build_tower(device: str, variant: str) -> Any:
    from transformers import Qwen2_5_VLConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from vlmserve.models.vision_attention import VISION_ATTENTION_NAME, varlen_attention_forward

    config_dict = copy.deepcopy(QWEN25_VL_7B_CONFIG)
    if device == "cpu":
        config_dict["vision_config"].update(_SMALL_VISION)
    vision_config = Qwen2_5_VLConfig.from_dict(config_dict).vision_config
    name = {"segmented": VISION_ATTENTION_NAME, "dense": "bench_dense_mask_flash_compatible"}[variant]
    ALL_ATTENTION_FUNCTIONS.register(name, varlen_attention_forward if variant == "segmented" else dense_mask_attention)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config, dtype=dtype).eval()
    tower.config._attn_implementation = name  # after construction, as install_vision_attention does
    return tower


def image_inputs(size: str, count: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches and grids of `count` square images resized to the budget as the processor does."""
    side = round(SIZES[size] ** 0.5 / 28) * 28  # the processor's resize of a square within its pixel limits
    grid = torch.tensor([[1, side // 14, side // 14]] * count, device=device)
    patches = int(grid.prod(-1).sum())
    pixels = torch.randn(patches, 3 * 2 * 14 * 14, device=device, dtype=dtype)
    return pixels, grid


def measure_point(device: str, variant: str, size: str, count: int, repeats: int) -> dict[str, Any]:
    tower = build_tower(device, variant)
    dtype = next(tower.parameters()).dtype
    pixels, grid = image_inputs(size, count, device, dtype)
    patches = pixels.shape[0]
    point: dict[str, Any] = {"variant": variant, "size": size, "images": count, "patches": patches}
    mask_bytes = patches * patches  # torch.bool
    if variant == "dense" and mask_bytes > DENSE_MASK_LIMIT_BYTES[device]:
        point["skipped"] = f"the T x T mask alone would take {mask_bytes / 2**30:.1f} GiB"
        return point
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        with torch.inference_mode():
            if device == "cuda":
                tower(pixels, grid_thw=grid)  # warm-up (kernel selection, allocator)
                sync()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            else:  # the process's high-water mark so far: weights, inputs, imports
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                tower(pixels, grid_thw=grid)
                sync()
                times.append(time.perf_counter() - started)
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except torch.OutOfMemoryError as exc:
        point["error"] = f"OutOfMemoryError: {str(exc)[:160]}"
        return point
    point["ms"] = round(1000 * sorted(times)[len(times) // 2], 2)
    point["ms_per_image"] = round(point["ms"] / count, 2)
    # NOTE: on the CPU this is the growth of the process's high-water mark over the calls, so it can only
    # under-count a call's peak by what the imports and weights left free below that mark.
    point["peak_extra_mib"] = round((peak - before) / 2**20, 1)
    if device == "cpu":
        point["process_peak_mib"] = round(peak / 2**20, 1)
    return point


def run_points(device: str, variants: list[str], sizes: list[str], counts: list[int], repeats: int,
               budget_s: float) -> list[dict[str, Any]]:
    deadline = time.perf_counter() + budget_s
    points = []
    for size in sizes:
        for variant in variants:
            for count in counts:
                if time.perf_counter() > deadline:
                    points.append({"variant": variant, "size": size, "images": count, "skipped": "budget"})
                    continue
                if device == "cpu":  # own process: its peak RSS is this point's
                    argv = [sys.executable, "-m", "bench.vision_scaling", "--point", variant, size, str(count),
                            "--device", device, "--repeats", str(repeats)]
                    point = _point_in_subprocess(argv, max(10.0, deadline - time.perf_counter() + 60))
                    point.update(variant=variant, size=size, images=count)
                else:
                    point = measure_point(device, variant, size, count, repeats)
                    torch.cuda.empty_cache()
                print(json.dumps(point), flush=True)
                points.append(point)
    return points


def _point_in_subprocess(argv: list[str], timeout_s: float) -> dict[str, Any]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"skipped": f"over {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {"error": done.stderr[-400:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def table(points: list[dict[str, Any]], device_name: str) -> str:
    lines = [f"Vision tower (Qwen2.5-VL geometry) on {device_name}: ms per call (ms per image), peak extra MiB",
             "", "| size | images | patches | segmented ms | segmented MiB | dense ms | dense MiB |",
             "|---|---|---|---|---|---|---|"]
    keyed = {(p["variant"], p["size"], p["images"]): p for p in points}
    for size in SIZES:
        for count in COUNTS:
            seg, dense = keyed.get(("segmented", size, count)), keyed.get(("dense", size, count))
            if seg is None and dense is None:
                continue

            def cell(p: dict[str, Any] | None) -> tuple[str, str]:
                if p is None:
                    return "-", "-"
                if "ms" not in p:
                    return p.get("skipped") or p.get("error", "?")[:40], "-"
                return f"{p['ms']:,} ({p['ms_per_image']:,})", f"{p['peak_extra_mib']:,}"

            patches = (seg or dense or {}).get("patches", "")
            lines.append(f"| {size} | {count} | {patches} | {' | '.join(cell(seg))} | {' | '.join(cell(dense))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variants", default="segmented,dense")
    parser.add_argument("--sizes", default="448,high")
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--point", nargs=3, metavar=("VARIANT", "SIZE", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        variant, size, count = args.point
        print(json.dumps(measure_point(args.device, variant, size, int(count), args.repeats)))
        return
    points = run_points(args.device, args.variants.split(","), args.sizes.split(","),
                        [int(c) for c in args.counts.split(",")], args.repeats, args.budget_s)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads, small tower: {_SMALL_VISION})"
    text = table(points, device_name)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "vision_scaling_" + ("gpu" if args.device == "cuda" else "cpu")
        (args.out / f"{stem}.json").write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                                           "points": points}, indent=1))
        (args.out / f"{stem}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
