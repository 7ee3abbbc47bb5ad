"""Boxes in answers: parse a grounding answer into boxes in the original image's pixels, and draw them.

Each family writes boxes its own way and in its own coordinate space:

| format       | families                    | markup                                                        | coordinates |
|--------------|-----------------------------|---------------------------------------------------------------|-------------|
| `qwen-vl`    | Qwen-VL-Chat                | `<ref>cat</ref><box>(x1,y1),(x2,y2)</box>`                    | 0-1000 of the image |
| `qwen2-vl`   | Qwen2-VL                    | `<|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>` | 0-1000 |
| `qwen2.5-vl` | Qwen2.5-VL                  | JSON `{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}` or the Qwen2-VL tags | pixels of the image the model saw (after its processor's resize) |
| `qwen3-vl`   | Qwen3-VL                    | as Qwen2.5-VL                                                 | 0-1000 |
| `glm`        | GLM-4.1V, GLM-4.5V, GLM-4.6V | `<|begin_of_box|>[x1,y1,x2,y2]<|end_of_box|>`                 | 0-1000 |
| `internvl`   | InternVL                    | `<ref>cat</ref><box>[[x1,y1,x2,y2]]</box>`                    | 0-1000 |

"The image the model saw" for Qwen2.5-VL is the server's decoded image (fitted to the `detail` pixel budget)
resized by the processor to multiples of 28 within its pixel bounds (`qwen25_model_size`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

GroundingFormat = Literal["qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "glm", "internvl"]
GROUNDING_FORMATS: tuple[str, ...] = ("qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "glm", "internvl")

#: model family (adapter `family`, i.e. config `model_type` or a native port's name) → its grounding format
FAMILY_FORMATS: dict[str, GroundingFormat] = {
    "qwen_vl_chat": "qwen-vl",
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen3_vl": "qwen3-vl",
    "qwen3_vl_moe": "qwen3-vl",
    "glm4v": "glm",
    "glm4v_moe": "glm",
    "internvl": "internvl",
}

_REF = r"(?:<ref>|<\|object_ref_start\|>)(?P<label>.*?)(?:</ref>|<\|object_ref_end\|>)"
_BOX = r"(?:<box>|<\|box_start\|>|<\|begin_of_box\|>)(?P<coords>.*?)(?:</box>|<\|box_end\|>|<\|end_of_box\|>)"
_TAGGED = re.compile(rf"(?:{_REF}\s*)?{_BOX}", re.DOTALL)
_JSON_BOX = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

# Qwen2.5-VL's image processor: sides rounded to multiples of 28 (14-pixel patches merged 2x2), area bounds
QWEN25_FACTOR = 28
QWEN25_MIN_PIXELS = 56 * 56
QWEN25_MAX_PIXELS = 28 * 28 * 16384


@dataclass(frozen=True)
class Box:
    """A box in the original image's pixels; `label` is the phrase it grounds, when the answer names one."""

    label: str | None
    x1: float
    y1: float
    x2: float
    y2: float


def format_for_family(family: str) -> GroundingFormat | None:
    return FAMILY_FORMATS.get(family)


def parse_boxes(text: str, fmt: GroundingFormat, image_size: tuple[int, int], *,
                model_size: tuple[int, int] | None = None) -> list[Box]:
    """Every box in `text`, mapped to pixels of an image of `image_size` (width, height).

    `model_size` is the (width, height) the model saw, needed only for `qwen2.5-vl`'s absolute coordinates;
    by default it is worked out as the server and the processor would (`qwen25_model_size`).
    """
    width, height = image_size
    if fmt == "qwen2.5-vl":
        seen_w, seen_h = model_size or qwen25_model_size(width, height)
        scale_x, scale_y = width / seen_w, height / seen_h
    else:
        scale_x, scale_y = width / 1000.0, height / 1000.0
    return [Box(label, x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y)
            for label, (x1, y1, x2, y2) in _raw_boxes(text)]


def _raw_boxes(text: str) -> list[tuple[str | None, tuple[float, ...]]]:
    found: list[tuple[str | None, tuple[float, ...]]] = []
    for match in _TAGGED.finditer(text):
        label = match.group("label")
        numbers = [float(n) for n in _NUMBER.findall(match.group("coords"))]
        for i in range(0, len(numbers) - 3, 4):  # one tag may hold several boxes: (a,b),(c,d),(e,f),(g,h)
            found.append((label.strip() if label else None, tuple(numbers[i:i + 4])))
    for match in _JSON_BOX.finditer(text):
        try:
            item: Any = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        coords = item.get("bbox_2d")
        if isinstance(coords, list) and len(coords) == 4 and all(isinstance(c, int | float) for c in coords):
            label = item.get("label")
            found.append((str(label) if label is not None else None, tuple(float(c) for c in coords)))
    return found


def qwen25_model_size(width: int, height: int, *, max_image_pixels: int = 2048 * 2048,
                      min_pixels: int = QWEN25_MIN_PIXELS, max_pixels: int = QWEN25_MAX_PIXELS) -> tuple[int, int]:
    """The (width, height) Qwen2.5-VL sees for an image of (width, height) sent to this server.

    The server first fits the image to its `detail` budget (`--high-detail-pixels`, 2048² by default), then the
    processor rounds each side to a multiple of 28 and scales the area into [min_pixels, max_pixels].
    """
    from vlmserve.multimodal.decode import fit_size

    width, height = fit_size(width, height, max_image_pixels)
    factor = QWEN25_FACTOR
    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / shrink / factor) * factor)
        new_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * grow / factor) * factor
        new_w = math.ceil(width * grow / factor) * factor
    return new_w, new_h


_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")


def draw_boxes(image: Any, boxes: list[Box]) -> Any:
    """A copy of the PIL `image` with each box outlined and labelled."""
    from PIL import ImageDraw

    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    width = max(2, min(canvas.size) // 200)
    for i, box in enumerate(boxes):
        colour = _COLOURS[i % len(_COLOURS)]
        left, right = sorted((box.x1, box.x2))
        top, bottom = sorted((box.y1, box.y2))
        draw.rectangle((left, top, right, bottom), outline=colour, width=width)
        if box.label:
            text_top = max(0.0, top - 12)
            text_box = draw.textbbox((left, text_top), box.label)
            draw.rectangle(text_box, fill=colour)
            draw.text((left, text_top), box.label, fill="white")
    return canvas
