"""The image decoder: formats, modes, orientation, limits, and property-based corruption."""

from __future__ import annotations

import io
import re
import struct
import time
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.fixtures import crafted_images
from vlmserve.errors import MediaError
from vlmserve.multimodal.decode import (
    DecodeLimits,
    decode_image,
    fit_size,
    image_hash,
    raise_pillow_pixel_limit,
)

from .helpers import encode

BIG = 10**7

# Every message decode_image may show a client. Anything else (Pillow's own text) is a leak.
OUR_MESSAGES = re.compile(
    r"the image is empty"
    r"|the image has no pixels"
    r"|the image is \d+x\d+ = \d+ pixels, more than \d+ \(--max-image-pixels\)"
    r"|the image has more than \d+ pixels \(--max-image-pixels\)"
    r"|the data is not an image in a supported format \(PNG, JPEG, GIF, WEBP, BMP, TIFF\)"
    r"|the image could not be decoded \(corrupt, truncated or an unsupported variant of its format\)")


def decode(data: bytes, **kwargs: int) -> Image.Image:
    kwargs.setdefault("max_image_pixels", BIG)
    return decode_image(data, param="p", **kwargs)  # type: ignore[arg-type]


def decode_error(data: bytes, **kwargs: int) -> MediaError:
    with pytest.raises(MediaError) as info:
        decode(data, **kwargs)
    assert info.value.param == "p"
    assert OUR_MESSAGES.fullmatch(info.value.message), info.value.message
    return info.value


# --- formats and refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_allowed_formats_decode_to_rgb(fmt: str) -> None:
    image = decode(encode(Image.new("RGB", (7, 5), (0, 0, 255)), fmt))
    assert image.mode == "RGB" and image.size == (7, 5)
    r, g, b = image.getpixel((3, 2))
    assert r < 10 and g < 10 and b > 240


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX", "JPEG2000", "AVIF"])
def test_other_pillow_formats_are_refused(fmt: str) -> None:
    data = encode(Image.new("RGB", (16, 16), "red"), fmt)
    assert Image.open(io.BytesIO(data)).size == (16, 16)  # Pillow itself would read it
    assert "not an image in a supported format" in decode_error(data).message


@pytest.mark.parametrize("data", [b"hello world", b"%PDF-1.7\n", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                  b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"BM", b"\0" * 64])
def test_non_images_are_refused(data: bytes) -> None:
    decode_error(data)


def test_empty_data() -> None:
    assert decode_error(b"").message == "the image is empty"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_truncated_images(fmt: str) -> None:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    for cut in (len(data) // 3, len(data) // 2, len(data) * 9 // 10):
        decode_error(data[:cut])


# --- pixel cap before decoding ----------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but which carries no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def gif_header(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"  # 2-colour table
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x00"  # no pixel data at all
    return b"GIF89a" + screen + frame + b";"


def bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + info


@pytest.mark.parametrize("header", [png_header, gif_header, bmp_header])
def test_pixel_cap_is_checked_from_the_header(header: object) -> None:
    # 5000 x 4000 is under Pillow's own bomb limit, so this is our check, and it runs before any decoding:
    # the file has no pixel data, so decoding it would fail with the "could not be decoded" message instead.
    error = decode_error(header(5000, 4000), max_image_pixels=1_000_000)  # type: ignore[operator]
    assert error.message == "the image is 5000x4000 = 20000000 pixels, more than 1000000 (--max-image-pixels)"


@pytest.mark.parametrize("header", [png_header, gif_header])
def test_decompression_bomb_headers(header: object) -> None:
    """Far beyond Pillow's own limit: its DecompressionBombError becomes our message, not a crash."""
    limit_before = Image.MAX_IMAGE_PIXELS
    error = decode_error(header(65535, 65535))  # type: ignore[operator]
    assert "--max-image-pixels" in error.message
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_a_real_image_over_the_cap() -> None:
    data = encode(Image.new("RGB", (100, 80)), "PNG")
    assert decode_error(data, max_image_pixels=7999).message.startswith("the image is 100x80 = 8000 pixels")
    assert decode(data, max_image_pixels=8000).size == (100, 80)


def test_raise_pillow_pixel_limit_only_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    raise_pillow_pixel_limit(500)
    assert Image.MAX_IMAGE_PIXELS == 1000
    raise_pillow_pixel_limit(5000)
    assert Image.MAX_IMAGE_PIXELS == 5000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone turned it off: leave it off
    raise_pillow_pixel_limit(5000)
    assert Image.MAX_IMAGE_PIXELS is None


# --- orientation, frames, modes ---------------------------------------------------------------------------------


def test_exif_orientation_is_applied_png() -> None:
    image = Image.new("RGB", (4, 2), "white")
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: turn 90 degrees clockwise to display
    out = decode(encode(image, "PNG", exif=exif))
    assert out.size == (2, 4)
    assert out.getpixel((1, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied_jpeg() -> None:
    image = Image.new("RGB", (32, 16), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 16))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 8  # turn 90 degrees counter-clockwise to display: the left half ends at the bottom
    out = decode(encode(image, "JPEG", exif=exif, quality=95))
    assert out.size == (16, 32)
    assert out.getpixel((8, 28))[0] > 200 and out.getpixel((8, 4))[2] > 200


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_give_their_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0,
                  **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert decode(data).getpixel((3, 3)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_flattened_on_white(fmt: str) -> None:
    image = Image.new("P", (4, 1))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2, 0])
    out = decode(encode(image, fmt, transparency=0))
    assert [out.getpixel((x, 0)) for x in range(4)] == [(255, 255, 255), (255, 0, 0), (0, 255, 0),
                                                        (255, 255, 255)]


def test_alpha_modes_are_flattened_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    out = decode(encode(rgba, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 128)])
    out = decode(encode(la, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((1, 0)))


def test_rgb_and_grey_transparency_keys() -> None:
    rgb = Image.new("RGB", (2, 1))
    rgb.putdata([(1, 2, 3), (9, 9, 9)])
    out = decode(encode(rgb, "PNG", transparency=(1, 2, 3)))
    assert [out.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (9, 9, 9)]
    grey = Image.new("L", (2, 1))
    grey.putdata([7, 8])
    out = decode(encode(grey, "PNG", transparency=7))
    assert [out.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (8, 8, 8)]


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk(fmt: str) -> None:
    image = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    image.paste((0, 0, 0, 255), (0, 0, 4, 8))  # left half black
    out = decode(encode(image, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    r, g, b = out.getpixel((6, 4))
    assert r > 230 and g < 25 and b < 25
    assert max(out.getpixel((1, 4))) < 25


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    samples = np.array([[0, 65535, 32896, 257, 1000]], dtype=np.uint16)
    for fmt in ("PNG", "TIFF"):
        out = decode(encode(Image.fromarray(samples), fmt))
        assert [out.getpixel((x, 0))[0] for x in range(5)] == [0, 255, 128, 1, 4]
        assert out.getpixel((4, 0)) == (4, 4, 4)


def test_sixteen_bit_transparency_key() -> None:
    out = decode(encode(Image.fromarray(np.array([[500, 65535]], dtype=np.uint16)), "PNG", transparency=500))
    assert [out.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (255, 255, 255)]
    out = decode(encode(Image.fromarray(np.array([[500, 0]], dtype=np.uint16)), "PNG", transparency=500))
    assert [out.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 0)]


def test_thirty_two_bit_and_float_samples() -> None:
    ints = Image.fromarray(np.array([[70000, -5, 514]], dtype=np.int32))
    out = decode(encode(ints, "TIFF"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [255, 0, 2]
    floats = Image.fromarray(np.array([[0.4, 300.0, np.nan, -3.0, 127.6]], dtype=np.float32))
    out = decode(encode(floats, "TIFF"))
    assert [out.getpixel((x, 0))[0] for x in range(5)] == [0, 255, 0, 0, 128]


def test_bilevel_and_grey() -> None:
    bits = Image.new("1", (2, 1))
    bits.putdata([0, 255])
    out = decode(encode(bits, "PNG"))
    assert [out.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]
    assert decode(encode(Image.new("L", (1, 1), 77), "BMP")).getpixel((0, 0)) == (77, 77, 77)


# --- pixel budget and hash --------------------------------------------------------------------------------------


def test_pixel_budget_keeps_aspect_ratio() -> None:
    data = encode(Image.new("RGB", (1600, 1200), "green"), "JPEG")
    out = decode(data, max_output_pixels=200 * 150)
    assert out.width * out.height <= 200 * 150
    assert abs(out.width / out.height - 4 / 3) < 0.02
    assert out.width >= 195  # shrunk to the budget, not far below it
    assert decode(data, max_output_pixels=1600 * 1200).size == (1600, 1200)


@settings(max_examples=150, deadline=None, database=None)
@given(st.integers(1, 100_000), st.integers(1, 100_000), st.integers(1, 10**7))
def test_fit_size_stays_within_budget(width: int, height: int, budget: int) -> None:
    new_width, new_height = fit_size(width, height, budget)
    assert new_width >= 1 and new_height >= 1
    if width * height <= budget:
        assert (new_width, new_height) == (width, height)
        return
    assert new_width * new_height <= budget or (new_width == 1 and new_height == 1)
    assert new_width <= width and new_height <= height
    if min(new_width, new_height) >= 20:
        assert abs(new_width / new_height - width / height) / (width / height) < 0.11


def test_hash_is_of_pixels_and_size() -> None:
    rng = np.random.default_rng(1)
    pixels = Image.fromarray(rng.integers(0, 256, (6, 4, 3), dtype=np.uint8))
    via_png, via_bmp = decode(encode(pixels, "PNG")), decode(encode(pixels, "BMP"))
    assert image_hash(via_png) == image_hash(via_bmp)
    changed = pixels.copy()
    changed.putpixel((0, 0), tuple((c + 1) % 256 for c in changed.getpixel((0, 0))))
    assert image_hash(decode(encode(changed, "PNG"))) != image_hash(via_png)
    assert pixels.size == (4, 6)
    reshaped = Image.frombytes("RGB", (6, 4), pixels.tobytes())  # same bytes, other size
    assert image_hash(reshaped) != image_hash(via_png)
    assert re.fullmatch(r"[0-9a-f]{64}", image_hash(via_png))


# --- property-based: random modes, sizes, formats and corruptions -----------------------------------------------

FORMATS_BY_MODE = {
    "1": ["PNG", "BMP", "TIFF"],
    "L": ["PNG", "JPEG", "GIF", "BMP", "TIFF"],
    "LA": ["PNG", "TIFF"],
    "P": ["PNG", "GIF", "BMP", "TIFF"],
    "RGB": ["PNG", "JPEG", "WEBP", "BMP", "TIFF"],  # not GIF: quantising makes encoding 30x slower
    "RGBA": ["PNG", "WEBP", "TIFF", "BMP"],
    "CMYK": ["JPEG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],
    "F": ["TIFF"],
}
CASES = [(mode, fmt) for mode, fmts in FORMATS_BY_MODE.items() for fmt in fmts]


def random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**20), 2**20, (height, width), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(100, 80, (height, width)).astype(np.float32))
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width), dtype=np.uint8).astype(bool))
    bands = Image.getmodebands(mode)
    image = Image.frombytes(mode, size, rng.integers(0, 256, width * height * bands, dtype=np.uint8).tobytes())
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


@st.composite
def encoded_images(draw: st.DrawFn) -> tuple[str, str, tuple[int, int], bytes]:
    mode, fmt = draw(st.sampled_from(CASES))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    image = random_image(mode, size, draw(st.integers(0, 2**32 - 1)))
    extra = {}
    if mode == "P" and fmt in ("PNG", "GIF") and draw(st.booleans()):
        extra["transparency"] = draw(st.integers(0, 255))
    return mode, fmt, size, encode(image, fmt, **extra)


@st.composite
def corruptions(draw: st.DrawFn, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "flip_header", "splice"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    corrupted = bytearray(data)
    if kind == "splice":
        at = draw(st.integers(0, len(data)))
        return bytes(corrupted[:at] + draw(st.binary(min_size=1, max_size=64)) + corrupted[at:])
    last = min(len(data) - 1, 64) if kind == "flip_header" else len(data) - 1
    for position in draw(st.lists(st.integers(0, last), min_size=1, max_size=8)):
        corrupted[position] ^= draw(st.integers(1, 255))
    return bytes(corrupted)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoded_images(), st.one_of(st.none(), st.integers(1, 3000)))
def test_every_intact_image_decodes_to_rgb(case: tuple[str, str, tuple[int, int], bytes],
                                           budget: int | None) -> None:
    mode, fmt, (width, height), data = case
    image = decode(data, max_image_pixels=48 * 48, **({} if budget is None else {"max_output_pixels": budget}))
    assert image.mode == "RGB"
    if budget is None or width * height <= budget:
        assert image.size == (width, height), (mode, fmt)
    else:
        assert image.width * image.height <= budget


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupt_images_give_rgb_or_a_clean_media_error(data: st.DataObject) -> None:
    _, _, _, intact = data.draw(encoded_images())
    corrupted = data.draw(corruptions(intact))
    try:
        image = decode(corrupted, max_image_pixels=64 * 64, max_output_pixels=40 * 40)
    except MediaError as exc:
        assert exc.param == "p"
        assert OUR_MESSAGES.fullmatch(exc.message), exc.message
        return
    assert image.mode == "RGB"
    assert 1 <= image.width * image.height <= 40 * 40
    image.tobytes()  # fully materialised


# --- decoding cost (issue 11, class 2) ------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "says"), [
    (lambda: crafted_images.encoded((40_000, 1)), "--max-image-aspect-ratio"),
    (lambda: crafted_images.encoded((1, 30_000), mode="L"), "--max-image-aspect-ratio"),
    (crafted_images.tiled_tiff, "--max-image-decode-bytes"),
    (lambda: crafted_images.encoded((6000, 6000), mode="RGBA"), "--max-image-decode-bytes"),
    (crafted_images.many_scan_jpeg, "scans"),
], ids=["wide-png", "tall-png", "tiff-tile-beyond-image", "rgba-over-budget", "jpeg-scans"])
def test_costly_images_are_refused_from_the_header(make: Callable[[], bytes], says: str) -> None:
    data = make()  # built here, not at collection: some take a second to encode
    limits = DecodeLimits(40_000_000, max_decode_bytes=256 * 2**20)
    started = time.process_time()
    with pytest.raises(MediaError, match=says.replace("-", r"\-")) as caught:
        decode_image(data, max_image_pixels=40_000_000, param="p", limits=limits)
    assert caught.value.param == "p"
    assert time.process_time() - started < 2  # refused from the header, not after seconds of decoding


def test_an_ordinary_large_photo_fits_the_default_budget() -> None:
    image = decode_image(crafted_images.encoded((3000, 2000)), max_image_pixels=40_000_000,
                         limits=DecodeLimits(40_000_000))
    assert image.size == (3000, 2000)
