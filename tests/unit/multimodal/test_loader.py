"""MediaLoader.load: order, de-duplication, concurrency, limits, detail budgets, hashes, off-loop work."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from PIL import Image

from vlmserve.config import MediaConfig
from vlmserve.errors import InvalidRequestError, MediaError, MediaFetchError
from vlmserve.multimodal import loader as loader_module
from vlmserve.multimodal.loader import ImageRef, MediaLoader

from .canary import Canary, colour_of
from .helpers import PARAM, data_uri, encode, load, load_error, ref

ALLOW = MediaConfig(allowed_media_hosts=("127.0.0.1",))


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> str:
    return data_uri(encode(Image.new("RGB", size, colour), "PNG"))


def test_order_is_kept_across_sources(canary: Canary) -> None:
    refs = [ref(canary.url("/image?name=a")), ref(solid((1, 2, 3))), ref(canary.url("/image?name=b")),
            ref(solid((4, 5, 6))), ref(canary.url("/image?name=a"))]
    parts = load(ALLOW, refs)
    assert [p.image.getpixel((0, 0)) for p in parts] == [colour_of("a"), (1, 2, 3), colour_of("b"), (4, 5, 6),
                                                         colour_of("a")]
    assert all(p.image.mode == "RGB" for p in parts)


def test_identical_urls_are_fetched_once(canary: Canary) -> None:
    url = canary.url("/image?name=dup")
    parts = load(ALLOW, [ref(url), ref(url, detail="low"), ref(url), ref(canary.url("/image?name=other"))])
    assert canary.hits["/image?name=dup"] == 1
    assert canary.num_hits == 2
    assert parts[0].hash == parts[1].hash == parts[2].hash  # 8x6 fits every budget: same pixels
    assert [p.detail for p in parts] == ["auto", "low", "auto", "auto"]


def test_fetches_of_one_request_run_concurrently(canary: Canary) -> None:
    refs = [ref(canary.url(f"/slow?delay=0.6&name={name}")) for name in ("x", "y", "z")]
    started = time.monotonic()
    parts = load(ALLOW, refs)
    elapsed = time.monotonic() - started
    assert [p.image.getpixel((0, 0)) for p in parts] == [colour_of(n) for n in ("x", "y", "z")]
    visits = canary.visits
    assert len(visits) == 3
    # Each request started before any other finished: all three were in flight together.
    assert max(v.started for v in visits) < min(v.finished for v in visits if v.finished is not None)
    assert elapsed < 1.5  # generous: one delay is 0.6 s, three in a row would be 1.8 s


def test_max_images_per_request(canary: Canary) -> None:
    config = MediaConfig(allowed_media_hosts=("127.0.0.1",), max_images_per_request=2)
    refs = [ref(canary.url(f"/image?name={i}")) for i in range(3)]
    exc = load_error(config, refs)
    assert isinstance(exc, MediaError) and exc.param == "messages"
    assert "at most 2 images" in exc.message and "--max-images-per-request" in exc.message
    assert canary.num_hits == 0
    assert len(load(config, refs[:2])) == 2


def test_no_images() -> None:
    assert load(MediaConfig(), []) == []


def test_detail_is_a_pixel_budget() -> None:
    config = MediaConfig(low_detail_pixels=100 * 75, high_detail_pixels=300 * 225)
    url = data_uri(encode(Image.new("RGB", (400, 300), "red"), "PNG"))
    low, high, auto = load(config, [ref(url, "low"), ref(url, "high"), ref(url, "auto")])
    assert low.image.width * low.image.height <= 100 * 75 and low.image.width >= 98
    assert high.image.width * high.image.height <= 300 * 225 and high.image.width >= 298
    assert abs(low.image.width / low.image.height - 4 / 3) < 0.03
    assert auto.image.size == high.image.size and auto.hash == high.hash
    assert low.hash != high.hash
    small = data_uri(encode(Image.new("RGB", (20, 10), "red"), "PNG"))
    [part] = load(config, [ref(small, "low")])
    assert part.image.size == (20, 10)  # never upscaled


def test_unknown_detail_is_refused_before_any_fetch(canary: Canary) -> None:
    refs = [ref(canary.url("/image")), ImageRef(url=canary.url("/image?x"), param="messages[1].content[0].image_url",
                                                detail="medium")]
    exc = load_error(ALLOW, refs)
    assert type(exc) is InvalidRequestError
    assert exc.param == "messages[1].content[0].image_url.detail"
    assert "auto, low, high" in exc.message
    assert canary.num_hits == 0


def test_hash_equal_for_identical_pixels_only() -> None:
    pixels = Image.new("RGB", (5, 4), (10, 20, 30))
    pixels.putpixel((2, 2), (200, 100, 0))
    other = pixels.copy()
    other.putpixel((0, 0), (11, 20, 30))
    png, bmp, webp = (data_uri(encode(pixels, fmt, **kw)) for fmt, kw in
                      (("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True})))
    parts = load(MediaConfig(), [ref(png), ref(bmp), ref(webp), ref(data_uri(encode(other, "PNG")))])
    assert parts[0].hash == parts[1].hash == parts[2].hash
    assert parts[3].hash != parts[0].hash


def test_errors_name_the_offending_reference(canary: Canary) -> None:
    good = ImageRef(url=solid((0, 0, 0)), param="messages[0].content[0].image_url")
    bad_source = ImageRef(url="data:image/png;base64,@@@@", param="messages[2].content[1].image_url")
    bad_image = ImageRef(url=data_uri(b"not an image"), param="messages[3].content[0].image_url")
    exc = load_error(ALLOW, [good, bad_source])
    assert isinstance(exc, MediaFetchError) and exc.param == "messages[2].content[1].image_url.url"
    exc = load_error(ALLOW, [good, bad_image])
    assert type(exc) is MediaError and exc.param == "messages[3].content[0].image_url"


def test_a_failure_cancels_the_other_fetches(canary: Canary) -> None:
    refs = [ref(canary.url("/slow?delay=5")),
            ImageRef(url="http://10.0.0.1/x.png", param="messages[1].content[0].image_url")]  # refused at once
    started = time.monotonic()
    exc = load_error(ALLOW, refs)
    assert isinstance(exc, MediaFetchError) and exc.param == "messages[1].content[0].image_url.url"
    assert time.monotonic() - started < 2  # the slow fetch was cancelled, not awaited


def test_decoding_runs_on_worker_threads_not_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = loader_module.decode_image

    def slow_decode(*args: object, **kwargs: object) -> Image.Image:
        threads.append(threading.current_thread().name)
        time.sleep(0.3)  # blocking on purpose: it must not stall the loop
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loader_module, "decode_image", slow_decode)

    async def main() -> tuple[int, float]:
        media = MediaLoader(MediaConfig(num_media_workers=2))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        tick_task = asyncio.ensure_future(ticker())
        started = time.monotonic()
        try:
            await media.load([ref(solid((1, 1, 1))), ref(solid((2, 2, 2)))])
        finally:
            tick_task.cancel()
            await media.aclose()
        return ticks, time.monotonic() - started

    ticks, elapsed = asyncio.run(main())
    assert len(threads) == 2 and all(name.startswith("vlmserve-media") for name in threads)
    assert ticks >= 5  # the loop kept running while both decodes blocked their threads
    assert elapsed < 0.55  # two 0.3 s decodes on two workers overlapped


def test_param_convention_for_data_uris() -> None:
    exc = load_error(MediaConfig(max_image_bytes=10), [ref(solid((0, 0, 0)))])
    assert isinstance(exc, MediaFetchError) and exc.param == f"{PARAM}.url"
