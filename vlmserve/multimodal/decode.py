"""Encoded image bytes → the RGB PIL image a model sees, and its content hash.

The bytes come from strangers, so decoding is defensive:
- the format is sniffed from the bytes, restricted to `ALLOWED_FORMATS` (the declared type is never trusted);
- width x height from the header is checked against `--max-image-pixels` before any pixel is decoded;
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


def decode_image(data: bytes, *, max_image_pixels: int, max_output_pixels: int | None = None,
                 param: str | None = None) -> Image.Image:
    """Decode `data` into an RGB image no larger than `max_output_pixels` (keeping its aspect ratio).

    Raises `MediaError` (with `param`) for anything that is not a decodable image within the limits.
    """
    if not data:
        raise MediaError("the image is empty", param=param)
    try:
        image = _decode(data, max_image_pixels, max_output_pixels, param)
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


def _decode(data: bytes, max_image_pixels: int, max_output_pixels: int | None,
            param: str | None) -> Image.Image:
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
        width, height = image.size
        if width < 1 or height < 1:
            raise MediaError("the image has no pixels", param=param)
        if width * height > max_image_pixels:
            raise MediaError(f"the image is {width}x{height} = {width * height} pixels, more than "
                             f"{max_image_pixels} (--max-image-pixels)", param=param)
        if max_output_pixels is not None and image.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the budget allows: much less work for big photos.
            image.draft("RGB", fit_size(width, height, max_output_pixels))
        image.load()  # frame 0 is the current frame after open: animated images give their first frame
        # Both helpers return new images, so nothing refers to `image` once the with-block closes it.
        return to_rgb(_exif_oriented(image))


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
    samples = np.asarray(image).astype(np.int64)
    grey = Image.fromarray(((np.clip(samples, 0, 65535) + 128) // 257).astype(np.uint8))
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
