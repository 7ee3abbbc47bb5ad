"""Encoded image bytes → the RGB PIL image a model sees, and its content hash.

The bytes come from strangers, so decoding is defensive:
- the format is sniffed from the bytes, restricted to `ALLOWED_FORMATS` (the declared type is never trusted);
- width x height from the header is checked against `--max-image-pixels` before any pixel is decoded, and so is
  the decoding cost (`decode_cost`): the aspect ratio (`--max-image-aspect-ratio`), the memory the stored format
  and the RGB copy need, the format's own tile/strip buffers (a TIFF tile may be far larger than its image) and a
  JPEG's number of progressive scans (each is a pass over the whole image) (`--max-image-decode-bytes`);
- only the first frame of an animated image is decoded;
- EXIF orientation is applied, then every colour mode is normalised to RGB the same way: alpha (or a
  transparency key) is flattened onto white, 16-bit and 32-bit integer samples are scaled to 8 bits
  (0..65535 → 0..255), float samples are clipped to 0..255 as Pillow's own F→L conversion does;
- any failure is a `MediaError` with our own message; Pillow's text (which can hold addresses) never leaves.

Call these from a worker thread, never on the event loop.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from vlmserve.errors import MediaError

logger = logging.getLogger(__name__)

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def raise_pillow_pixel_limit(max_image_pixels: int) -> None:
    """Make Pillow's own decompression-bomb limit at least our cap, so it never refuses what we accept.

    NOTE: `Image.MAX_IMAGE_PIXELS` is process-wide. We only ever raise it, and only to the configured
    `--max-image-pixels`, which `decode_image` enforces itself from the header before decoding.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_image_pixels:
        logger.info("raising Pillow's MAX_IMAGE_PIXELS from %d to --max-image-pixels %d", current,
                    max_image_pixels)
        Image.MAX_IMAGE_PIXELS = max_image_pixels


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding one image may cost, checked from its header before any pixel is decoded."""

    max_image_pixels: int
    max_aspect_ratio: float = 200.0
    max_decode_bytes: int = 256 * 2**20
    max_jpeg_scans: int = 64


def decode_image(data: bytes, *, max_image_pixels: int, max_output_pixels: int | None = None,
                 param: str | None = None, limits: DecodeLimits | None = None) -> Image.Image:
    """Decode `data` into an RGB image no larger than `max_output_pixels` (keeping its aspect ratio).

    Raises `MediaError` (with `param`) for anything that is not a decodable image within the limits.
    """
    if not data:
        raise MediaError("the image is empty", param=param)
    limits = limits or DecodeLimits(max_image_pixels)
    try:
        image = _decode(data, limits, max_output_pixels, param)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own bomb check ran before ours (it fires in Image.open, above 2x its limit).
        raise MediaError(f"the image has more than {max_image_pixels} pixels (--max-image-pixels)",
                         param=param) from exc
    except Image.UnidentifiedImageError as exc:
        raise MediaError(f"the data is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})",
                         param=param) from exc
    except Exception as exc:
        # Crafted files make Pillow raise nearly anything (OSError, ValueError, SyntaxError, struct.error,
        # IndexError, MemoryError, and warnings turned errors); all of them mean "this image cannot be used".
        logger.debug("image decoding failed: %s", type(exc).__name__)
        raise MediaError("the image could not be decoded (corrupt, truncated or an unsupported variant of "
                         "its format)", param=param) from exc
    return fit_pixel_budget(image, max_output_pixels)


def _decode(data: bytes, limits: DecodeLimits, max_output_pixels: int | None,
            param: str | None) -> Image.Image:
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
        width, height = image.size
        if width < 1 or height < 1:
            raise MediaError("the image has no pixels", param=param)
        if width * height > limits.max_image_pixels:
            raise MediaError(f"the image is {width}x{height} = {width * height} pixels, more than "
                             f"{limits.max_image_pixels} (--max-image-pixels)", param=param)
        check_decode_cost(image, data, limits, param)
        if max_output_pixels is not None and image.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the budget allows: much less work for big photos.
            image.draft("RGB", fit_size(width, height, max_output_pixels))
        image.load()  # frame 0 is the current frame after open: animated images give their first frame
        # Both helpers return new images, so nothing refers to `image` once the with-block closes it.
        return to_rgb(_exif_oriented(image))


def check_decode_cost(image: Image.Image, data: bytes, limits: DecodeLimits, param: str | None) -> None:
    """Refuse, from the header, an image whose decoding would cost more than `limits` allow."""
    width, height = image.size
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise MediaError(f"the image is {width}x{height}, an aspect ratio above {limits.max_aspect_ratio:g} "
                         "(--max-image-aspect-ratio)", param=param)
    cost = decode_cost(image)
    if cost > limits.max_decode_bytes:
        raise MediaError(f"decoding this {width}x{height} {image.format} image would need about {cost} bytes, more "
                         f"than {limits.max_decode_bytes} (--max-image-decode-bytes)", param=param)
    if image.format == "JPEG" and data.count(b"\xff\xda") > limits.max_jpeg_scans:
        # each progressive scan is a pass over the whole image; a few hundred make a tiny file cost seconds
        raise MediaError(f"the JPEG has more than {limits.max_jpeg_scans} scans", param=param)


def decode_cost(image: Image.Image) -> int:
    """Bytes decoding needs: the stored pixels, the RGBA/RGB copies of normalisation, and the largest buffer the
    format's codec allocates for one tile or strip (which a crafted header can make far larger than the image)."""
    width, height = image.size
    stored = _bytes_per_pixel(image.mode)
    cost = width * height * (stored + 4 + 3)
    buffer = 0
    for tile in getattr(image, "tile", None) or ():
        x0, y0, x1, y1 = tile[1]
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            return 2**62  # a tile outside the image: never a cost we accept
        buffer = max(buffer, (x1 - x0) * (y1 - y0) * stored)
    if image.format == "TIFF":
        tags = getattr(image, "tag_v2", {})
        tile_width, tile_length = tags.get(322), tags.get(323)  # TileWidth, TileLength
        if isinstance(tile_width, int) and isinstance(tile_length, int):
            buffer = max(buffer, tile_width * tile_length * stored)
        rows = tags.get(278)  # RowsPerStrip: libtiff clamps it to the image height
        if isinstance(rows, int):
            buffer = max(buffer, min(rows, height) * width * stored)
    return cost + buffer


def _bytes_per_pixel(mode: str) -> int:
    try:
        bands = Image.getmodebands(mode)
        return max(1, bands * (4 if mode in ("I", "F") else 2 if mode.startswith("I;16") else 1))
    except ValueError:
        return 8  # an exotic mode: assume the widest


def _exif_oriented(image: Image.Image) -> Image.Image:
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception:
        # NOTE: a corrupt EXIF block keeps the image as stored instead of refusing an otherwise good image.
        return image
    return oriented if oriented is not None else image


def to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image from any Pillow mode; alpha and transparency keys are flattened onto white."""
    if image.mode in _WIDE_INT_MODES:
        image = _wide_int_to_8bit(image)
    elif image.mode == "F":
        samples = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        image = Image.fromarray(np.clip(np.rint(samples), 0, 255).astype(np.uint8))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _wide_int_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit greyscale → L (or LA when a transparency key is set), 0..65535 mapped onto 0..255."""
    samples = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)  # 4 bytes a pixel, not int64's 8
    grey = Image.fromarray(((samples + 128) // 257).astype(np.uint8))
    key = image.info.get("transparency")
    if not isinstance(key, int):
        return grey
    alpha = Image.fromarray(np.where(samples == key, 0, 255).astype(np.uint8))
    return Image.merge("LA", (grey, alpha))


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with (about) the aspect ratio of width x height and at most `max_pixels` pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    new_width = max(1, math.floor(width * scale))
    new_height = max(1, math.floor(height * scale))
    # Very thin images: one side hits the 1-pixel floor, so give the other side what is left of the budget.
    new_width = max(1, min(new_width, max_pixels // new_height))
    new_height = max(1, min(new_height, max_pixels // new_width))
    return new_width, new_height


def fit_pixel_budget(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """`image` downscaled (bicubic, aspect ratio kept) to at most `max_pixels` pixels; unchanged if it fits."""
    if max_pixels is None or image.width * image.height <= max_pixels:
        return image
    return image.resize(fit_size(image.width, image.height, max_pixels), Image.Resampling.BICUBIC)


def image_hash(image: Image.Image) -> str:
    """Hex SHA-256 of what the model sees: the mode, the size and the raw pixels.

    Equal for identical pixels whatever the encoding they came in; the prefix cache keys image tokens on it.
    """
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
