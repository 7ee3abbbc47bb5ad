"""A request's image references → decoded, hashed `ImagePart`s, with every media limit applied.

`MediaLoader.load` is what the API calls. Fetches of one request run concurrently and identical URLs are fetched
once; decoding, resizing and hashing run on a thread pool of `--num-media-workers` threads, so the event loop only
ever waits on sockets.

Error `param`s (shown to the client):
- too many images: `"messages"`;
- an unknown `detail`: `<ref.param>.detail`;
- anything wrong with the source (scheme, address, HTTP status, size, base64, local path): `<ref.param>.url`;
- anything wrong with the image itself (format, pixels, corruption): `<ref.param>`.
When one URL appears several times, errors name the first reference that used it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from vlmserve.config import MediaConfig
from vlmserve.errors import InvalidRequestError, MediaError, VideoError
from vlmserve.multimodal.decode import DecodeLimits, decode_image, image_hash, raise_pillow_pixel_limit
from vlmserve.multimodal.fetch import VIDEO, MediaFetcher
from vlmserve.multimodal.video import VideoLimits, decode_video, require_av
from vlmserve.types import ImagePart, VideoPart

T = TypeVar("T")

DETAIL_VALUES = ("auto", "low", "high")


@dataclass(frozen=True)
class ImageRef:
    """One image of a request, as the client sent it."""

    url: str  # as sent in image_url.url
    param: str  # the request field for error messages, e.g. "messages[0].content[1].image_url"
    detail: str = "auto"  # "low" | "high" | "auto"


@dataclass(frozen=True)
class VideoRef:
    """One video of a request, as the client sent it."""

    url: str  # as sent in video_url.url
    param: str  # e.g. "messages[0].content[1].video_url"


@dataclass(frozen=True)
class VideoSampling:
    """How a request's videos are sampled: the server's flags, or the request's own `mm_processor_kwargs`."""

    fps: float
    max_frames: int


class MediaLoader:
    """Fetches and decodes the images of requests off the event loop, under one `MediaConfig`.

    `transport` (an httpx transport) and `resolver` (host name → address strings) are seams for tests.
    Call `aclose()` when done.
    """

    def __init__(self, config: MediaConfig, *, transport: httpx.AsyncBaseTransport | None = None,
                 resolver: Callable[[str], Awaitable[list[str]]] | None = None) -> None:
        self._config = config
        self._executor = ThreadPoolExecutor(max_workers=config.num_media_workers,
                                            thread_name_prefix="vlmserve-media")
        self._fetcher = MediaFetcher(config, executor=self._executor, transport=transport, resolver=resolver)
        raise_pillow_pixel_limit(config.max_image_pixels)
        self._limits = DecodeLimits(config.max_image_pixels, max_aspect_ratio=config.max_image_aspect_ratio,
                                    max_decode_bytes=config.max_image_decode_bytes)
        self._video_limits = VideoLimits(max_duration_s=config.max_video_duration_s,
                                         max_frames=config.max_video_frames, max_pixels=config.max_video_pixels,
                                         max_frame_pixels=config.max_video_frame_pixels,
                                         max_decode_pixels=config.max_video_decode_pixels)

    @property
    def default_video_sampling(self) -> VideoSampling:
        return VideoSampling(fps=self._config.video_fps, max_frames=self._config.max_video_frames)

    async def aclose(self) -> None:
        await self._fetcher.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def pixel_budget(self, ref: ImageRef) -> int:
        """How many pixels the model may see of `ref`, from its `detail`."""
        if ref.detail == "low":
            return self._config.low_detail_pixels
        if ref.detail in DETAIL_VALUES:
            return self._config.high_detail_pixels
        raise InvalidRequestError(f"detail must be one of {', '.join(DETAIL_VALUES)}",
                                  param=f"{ref.param}.detail")

    async def load(self, refs: list[ImageRef]) -> list[ImagePart]:
        """The decoded images of `refs`, in the same order. Raises `MediaError`/`InvalidRequestError`."""
        limit = self._config.max_images_per_request
        if len(refs) > limit:
            raise MediaError(f"a request may carry at most {limit} images, this one has {len(refs)} "
                             "(--max-images-per-request)", param="messages")
        budgets = [self.pixel_budget(ref) for ref in refs]  # validate every detail before any fetch
        # One job per distinct URL; inside it, one decode per distinct pixel budget of that URL.
        wanted: dict[str, dict[int, ImageRef]] = {}
        for ref, budget in zip(refs, budgets, strict=True):
            wanted.setdefault(ref.url, {}).setdefault(budget, ref)
        results = await _gather_in_order([self._load_url(url, by_budget) for url, by_budget in wanted.items()])
        decoded = dict(zip(wanted, results, strict=True))
        parts = []
        for ref, budget in zip(refs, budgets, strict=True):
            image, digest = decoded[ref.url][budget]
            parts.append(ImagePart(image=image, hash=digest, detail=ref.detail))
        return parts

    async def load_videos(self, refs: list[VideoRef], sampling: VideoSampling | None = None) -> list[VideoPart]:
        """The decoded, sampled videos of `refs`, in order; identical URLs are fetched and decoded once."""
        if not refs:
            return []
        limit = self._config.max_videos_per_request
        if len(refs) > limit:
            raise VideoError(f"a request may carry at most {limit} videos, this one has {len(refs)} "
                             "(--max-videos-per-request)", param="messages")
        require_av(refs[0].param)  # before any fetch: without PyAV, no video can be used
        sampling = sampling or self.default_video_sampling
        first: dict[str, VideoRef] = {}
        for ref in refs:
            first.setdefault(ref.url, ref)
        results = await _gather_in_order([self._load_video(ref, sampling) for ref in first.values()])
        decoded = dict(zip(first, results, strict=True))
        return [decoded[ref.url] for ref in refs]

    async def _load_video(self, ref: VideoRef, sampling: VideoSampling) -> VideoPart:
        data = await self._fetcher.fetch(ref.url, f"{ref.param}.url", VIDEO)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: decode_video(
            data, self._video_limits, fps=sampling.fps, max_frames=sampling.max_frames, param=ref.param))

    async def _load_url(self, url: str, by_budget: dict[int, ImageRef]) -> dict[int, tuple[Any, str]]:
        first = next(iter(by_budget.values()))
        data = await self._fetcher.fetch(url, f"{first.param}.url")
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self._executor, self._prepare, data, budget, ref.param)
                for budget, ref in by_budget.items()]
        return dict(zip(by_budget, await _gather_in_order(jobs), strict=True))

    def _prepare(self, data: bytes, budget: int, param: str) -> tuple[Any, str]:
        """Worker thread: bytes → RGB image within `budget` pixels, and its hash."""
        image = decode_image(data, max_image_pixels=self._config.max_image_pixels, max_output_pixels=budget,
                             param=param, limits=self._limits)
        return image, image_hash(image)


async def _gather_in_order(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Like asyncio.gather, but on the first failure the others are cancelled (and awaited) before it is raised.

    If several have failed by then, the earliest in `aws` order is raised, so errors are deterministic.
    """
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return [task.result() for task in tasks]
