"""Encoded video bytes → the sampled RGB frames a model sees, their timestamps and the video's content hash.

PyAV (FFmpeg) decodes; it is the optional `video` extra, imported only when a video arrives, so the server runs
without it and answers a video with a 400 naming the extra. The bytes come from strangers, so:
- the container is sniffed from the bytes and only MP4/QuickTime, Matroska/WebM and AVI are opened, with the
  demuxer named explicitly: FFmpeg never probes, so playlist demuxers (HLS, concat), which open further URLs or
  files, can never run;
- only common video codecs are decoded (`ALLOWED_CODECS`);
- the frame size (`--max-video-frame-pixels`), the duration (`--max-video-duration-s`) and the decoding work
  (`--max-video-decode-pixels`: every frame is decoded to sample a few) are checked from the headers before
  decoding, and the duration and the work again while decoding (headers can lie);
- frames are sampled at `fps` (at most `max_frames` of them, spread evenly when the cap binds) and downscaled so
  that frames x pixels stays within `--max-video-pixels`.
Errors are `VideoError` naming the request field and the flag; FFmpeg's own messages are never passed on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from dataclasses import dataclass
from typing import Any

from vlmserve.errors import UnsupportedFeatureError, VideoError
from vlmserve.multimodal.decode import fit_pixel_budget, image_hash
from vlmserve.types import VideoPart

logger = logging.getLogger(__name__)

#: FFmpeg demuxer for each container we sniff
_CONTAINERS = {"mp4": "mov", "matroska": "matroska", "avi": "avi"}
ALLOWED_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "libaom-av1", "mpeg4", "mjpeg",
                            "mpeg1video", "mpeg2video", "libvpx", "libvpx-vp9"})
MISSING_EXTRA = "video input needs PyAV, which is not installed on this server: pip install 'vlmserve[video]'"


@dataclass(frozen=True)
class VideoLimits:
    """What one video may cost (from `MediaConfig`)."""

    max_duration_s: float
    max_frames: int
    max_pixels: int  # frames x width x height after downscaling
    max_frame_pixels: int  # one decoded frame, from the header
    max_decode_pixels: int = 16_000_000_000  # every decoded frame's pixels, summed


def require_av(param: str | None = None) -> Any:
    """The `av` module, or a 400 naming the extra that installs it."""
    try:
        import av
    except ImportError:
        raise UnsupportedFeatureError(MISSING_EXTRA, param=param) from None
    return av


def sniff_container(data: bytes) -> str | None:
    """The container format of `data` from its magic bytes: "mp4", "matroska", "avi" or None."""
    if len(data) >= 12 and data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def sample_times(duration_s: float, fps: float, max_frames: int) -> list[float]:
    """Timestamps to sample: every 1/fps seconds from 0, or `max_frames` evenly spread when that is fewer.

    At least one frame (a video shorter than 1/fps still gives its first frame).
    """
    count = max(1, min(max_frames, math.floor(duration_s * fps + 1e-9)))
    step = duration_s / count if count < duration_s * fps - 1e-9 else 1.0 / fps
    return [i * step for i in range(count)]


def decode_video(data: bytes, limits: VideoLimits, *, fps: float, max_frames: int, param: str) -> VideoPart:
    """Decode `data` and sample its frames (see the module docstring). Raises `VideoError` with `param`."""
    av = require_av(param)
    container_kind = sniff_container(data)
    if container_kind is None:
        raise VideoError("the data is not a video in a supported container (MP4/QuickTime, Matroska/WebM, AVI)",
                         param=param)
    try:
        with av.open(io.BytesIO(data), mode="r", format=_CONTAINERS[container_kind]) as container:
            return _decode(container, limits, fps=fps, max_frames=min(max_frames, limits.max_frames), param=param)
    except VideoError:
        raise
    except Exception as exc:  # FFmpeg errors on crafted input come in many classes; all mean "unusable"
        logger.debug("video decoding failed: %s", type(exc).__name__)
        raise VideoError("the video could not be decoded (corrupt, truncated or an unsupported variant of its "
                         "format)", param=param) from exc


def _decode(container: Any, limits: VideoLimits, *, fps: float, max_frames: int, param: str) -> VideoPart:
    if not container.streams.video:
        raise VideoError("the file holds no video stream", param=param)
    stream = container.streams.video[0]
    codec = stream.codec_context.name
    if codec not in ALLOWED_CODECS:
        raise VideoError(f"the video codec {codec!r} is not supported (supported: H.264, HEVC, VP8, VP9, AV1, "
                         "MPEG-4, MJPEG)", param=param)
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_frame_pixels:
        raise VideoError(f"the video's frames are {width}x{height} = {width * height} pixels, more than "
                         f"{limits.max_frame_pixels} (--max-video-frame-pixels)", param=param)
    source_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    duration = _header_duration(container, stream)
    if duration is not None and duration > limits.max_duration_s:
        raise VideoError(f"the video lasts {duration:.1f} s, more than {limits.max_duration_s:g} s "
                         "(--max-video-duration-s)", param=param)
    estimated = stream.frames or (duration * source_fps if duration is not None else 0)
    if estimated * width * height > limits.max_decode_pixels:
        raise _too_much_decoding(limits, param)
    frames, times = _sample(container, stream, limits, duration, fps=fps, max_frames=max_frames, param=param)
    budget = max(1, limits.max_pixels // len(frames))
    frames = [fit_pixel_budget(frame, budget) for frame in frames]
    digest = hashlib.sha256(f"video {len(frames)} {','.join(f'{t:.6f}' for t in times)}\n".encode())
    for frame in frames:
        digest.update(image_hash(frame).encode())
    span = duration if duration is not None else (times[-1] + 1.0 / source_fps)
    return VideoPart(frames=tuple(frames), hash=digest.hexdigest(), timestamps=tuple(times), source_fps=source_fps,
                     sampled_fps=len(frames) / span if span > 0 else fps, duration_s=span)


def _too_much_decoding(limits: VideoLimits, param: str) -> VideoError:
    return VideoError(f"decoding the video would produce more than {limits.max_decode_pixels} pixels "
                      "(--max-video-decode-pixels)", param=param)


def _header_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000  # AV_TIME_BASE
    return None


def _sample(container: Any, stream: Any, limits: VideoLimits, duration: float | None, *, fps: float,
            max_frames: int, param: str) -> tuple[list[Any], list[float]]:
    """Decode in order, keeping the first frame at or after each wanted timestamp."""
    # NOTE: without a header duration, sample at `fps` up to the duration cap; `max_frames` still bounds the count.
    wanted = sample_times(duration if duration is not None else limits.max_duration_s, fps, max_frames)
    frames: list[Any] = []
    times: list[float] = []
    decoded = 0
    for index, frame in enumerate(container.decode(stream)):
        time = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 25)
        decoded += frame.width * frame.height
        if decoded > limits.max_decode_pixels:
            raise _too_much_decoding(limits, param)
        if time > limits.max_duration_s:
            raise VideoError(f"the video lasts more than {limits.max_duration_s:g} s (--max-video-duration-s)",
                             param=param)
        if len(frames) < len(wanted) and time + 1e-6 >= wanted[len(frames)]:
            frames.append(frame.to_image())  # RGB PIL image
            times.append(max(time, 0.0))
    if not frames:
        raise VideoError("the video holds no decodable frames", param=param)
    return frames, times
