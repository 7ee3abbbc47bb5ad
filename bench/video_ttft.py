"""TTFT of one 10-second video request sampled at 2 fps (20 frames), engine driven directly (no HTTP).

Qwen2.5-VL-7B architecture with random bf16 weights (bench/models.py builds it). Each request is timed in its
pieces, each bracketed by CUDA synchronisation:
- decode: the encoded clip (10 s, 1280x720, 30 fps, MPEG-4 in MP4: 300 frames decoded) → 20 sampled RGB frames
  within `--max-video-pixels` (PyAV, as the server does; skipped, with synthetic frames, where PyAV is absent);
- render: chat template + processor (frame resize, normalisation, patches, video tokens);
- engine: `add_request` → first token out of `core.step` (vision tower over the video, prefill, first sample).
TTFT = decode + render + engine. `--runs` fresh clips (different pixels: no cache hits), then the first clip once
more (video embeddings and prefix blocks come from the caches).

Usage on the device (one call; the av wheel must be in .whl for the decode step):
    PYTHONPATH=. python3 -m bench.video_ttft --out $OUT
CPU smoke (tiny layers, a few seconds):
    BENCH_DEVICE=cpu python -m bench.video_ttft --scale tiny --width 320 --height 180 --runs 1 --out /tmp/vt
Writes $OUT/video_ttft.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmserve.config import EngineConfig, MediaConfig, ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.protocol import CoreOutput
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.multimodal.video import VideoLimits, decode_video
from vlmserve.types import ChatMessage, GenerationRequest, SamplingParams, TextPart, VideoPart

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")
SECONDS, SOURCE_FPS, SAMPLE_FPS = 10, 30, 2.0


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _frames(seed: int, width: int, height: int, count: int) -> list[np.ndarray]:
    """Blocky noise that drifts a little each frame: every sampled frame differs, as in a real clip."""
    generator = np.random.default_rng(seed)
    base = generator.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    big = base.repeat(16, 0).repeat(16, 1)[:height, :width]
    return [np.roll(big, shift=4 * i, axis=1) for i in range(count)]


def encode_clip(seed: int, width: int, height: int) -> bytes | None:
    """The 10-second clip as MP4 (MPEG-4 part 2, fast to encode), or None without PyAV."""
    try:
        import av
    except ImportError:
        return None
    import io

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        stream = output.add_stream("mpeg4", rate=SOURCE_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000
        for pixels in _frames(seed, width, height, SECONDS * SOURCE_FPS):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def synthetic_video(seed: int, width: int, height: int, media: MediaConfig) -> VideoPart:
    """The sampled frames without PyAV: what decode_video would hand on, within the same pixel budget."""
    import hashlib

    from vlmserve.multimodal.decode import fit_pixel_budget

    count = int(SECONDS * SAMPLE_FPS)
    frames = [fit_pixel_budget(Image.fromarray(p), media.max_video_pixels // count)
              for p in _frames(seed, width, height, count)]
    times = tuple(i / SAMPLE_FPS for i in range(count))
    digest = hashlib.sha256(b"".join(f.tobytes() for f in frames)).hexdigest()
    return VideoPart(tuple(frames), digest, times, float(SOURCE_FPS), SAMPLE_FPS, float(SECONDS))


def first_token(core: PagedEngineCore, request: GenerationRequest) -> float:
    """Seconds from add_request to the step that emits the request's first token."""
    got: list[int] = []

    def emit(outputs: list[CoreOutput]) -> None:
        for output in outputs:
            if output.request_id == request.request_id:
                got.extend(output.new_token_ids)

    _sync()
    started = time.perf_counter()
    core.add_request(request)
    while not got:
        core.step(emit)
    _sync()
    elapsed = time.perf_counter() - started
    while core.has_work():
        core.step(lambda outputs: None)
    return elapsed


def one_request(core: PagedEngineCore, renderer: PromptRenderer, media: MediaConfig, clip: bytes | None,
                seed: int, width: int, height: int, tag: str) -> dict[str, Any]:
    started = time.perf_counter()
    if clip is not None:
        limits = VideoLimits(media.max_video_duration_s, media.max_video_frames, media.max_video_pixels,
                             media.max_video_frame_pixels)
        video = decode_video(clip, limits, fps=SAMPLE_FPS, max_frames=media.max_video_frames, param="bench")
    else:
        video = synthetic_video(seed, width, height, media)
    decoded = time.perf_counter()
    prompt = renderer.render([ChatMessage("user", (video, TextPart("Describe what happens in this video.")))])
    rendered = time.perf_counter()
    request = GenerationRequest(f"video-{tag}", prompt, SamplingParams(max_tokens=2, temperature=0.0,
                                                                       ignore_eos=True))
    engine_s = first_token(core, request)
    grid = prompt.model_inputs["video_grid_thw"][0].tolist()
    decode_s, render_s = decoded - started, rendered - decoded
    return {"frames": len(video.frames), "frame_size": list(video.frames[0].size), "video_grid_thw": grid,
            "prompt_tokens": prompt.num_tokens, "video_tokens": prompt.num_video_tokens,
            "decode_ms": round(1000 * decode_s, 1) if clip is not None else None,
            "render_ms": round(1000 * render_s, 1), "engine_first_token_ms": round(1000 * engine_s, 1),
            "ttft_ms": round(1000 * (decode_s + render_s + engine_s), 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="/tmp/bench-qwen2.5-vl-7b")
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench-out")))
    args = parser.parse_args(argv)
    from bench.models import build_qwen25_vl

    path = Path(args.model if args.scale == "full" else "/tmp/bench-qwen2.5-vl-tiny")
    if not (path / "bench_meta.json").exists():
        build_qwen25_vl(path, scale=args.scale, device=DEVICE)
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    adapter = load_model(ModelConfig(model=str(path), device=DEVICE, dtype=dtype, max_model_len=32768))
    assert adapter.video_token_id is not None, "the model's processor took no video path"
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id, max_model_len=32768,
                              video_token_id=adapter.video_token_id)
    media = MediaConfig()  # the server's defaults: 2 fps, 64 frames at most, --max-video-pixels
    core = PagedEngineCore(adapter, EngineConfig())  # the server's defaults (chunked prefill included)
    clips = [encode_clip(seed, args.width, args.height) for seed in range(args.runs + 1)]
    warm = one_request(core, renderer, media, clips[-1], args.runs, args.width, args.height, "warmup")
    runs = [one_request(core, renderer, media, clips[i], i, args.width, args.height, f"run{i}")
            for i in range(args.runs)]
    cached = one_request(core, renderer, media, clips[0], 0, args.width, args.height, "cached")
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "scale": args.scale,
              "clip": {"seconds": SECONDS, "fps": SOURCE_FPS, "size": [args.width, args.height],
                       "bytes": len(clips[0]) if clips[0] is not None else None, "sampled_fps": SAMPLE_FPS},
              "warmup": warm, "runs": runs, "same_video_again": cached,
              "ttft_ms_median": statistics.median(r["ttft_ms"] for r in runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "video_ttft.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
