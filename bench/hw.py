"""The card's two ceilings, measured: device-to-device copy bandwidth and bf16 matmul rate.

Copy bandwidth counts bytes read plus bytes written (as METHOD.md asks), so it is directly comparable with the
bytes a decode step must move. Both are timed with CUDA events, after warm-up, median of several repeats, on
random data (never zeros).
"""

from __future__ import annotations

import statistics
from typing import Any


def _median_ms(fn: Any, *, warmup: int = 3, repeat: int = 10) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(num_bytes: int = 4 << 30) -> float:
    """GB/s of a large device-to-device copy, counting read + write bytes."""
    import torch

    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms / 1000) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    """TFLOP/s of an n x n x n bf16 matrix product on random inputs."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b)
    return 2 * n**3 / (ms / 1000) / 1e12


def device_info() -> dict[str, Any]:
    """Card name, memory, and the library versions every result must carry."""
    import torch
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(card=torch.cuda.get_device_name(0), memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info["card"] = "cpu"
    return info


def measure() -> dict[str, Any]:
    """Device info plus both ceilings (ceilings only where a GPU is present); run in its own process."""
    info = device_info()
    if info["cuda_available"]:
        info["copy_bandwidth_gbs"] = round(copy_bandwidth_gbs(), 1)
        info["bf16_matmul_tflops"] = round(matmul_tflops(), 1)
    return info


def tpot_floor_ms(meta: dict[str, Any], bandwidth_gbs: float, *, context_tokens: int, batch: int = 1) -> float:
    """Bytes a decode step must read (all text weights once, plus every sequence's KV) over copy bandwidth."""
    step_bytes = meta["decode_weight_bytes"] + batch * context_tokens * meta["kv_bytes_per_token"]
    return step_bytes / (bandwidth_gbs * 1e9) * 1000.0


def main() -> None:
    import json

    print(json.dumps(measure()))


if __name__ == "__main__":
    main()
