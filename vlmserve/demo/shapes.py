"""The demo model's task: scenes of coloured shapes, questions about them and their true answers.

Everything here is deterministic by seed, so training, evaluation and tests anywhere in the project draw the same
samples from the same seed. The task is fixed by issue 3:

- images 64-512 px on each side, a light background (every channel >= 200), 1-4 non-overlapping filled shapes
  (circle, square, triangle) in 7 colours, each 15-40 % of the shorter side, PNG or JPEG (quality >= 75),
  anti-aliased or not;
- seven question types with fixed wordings (see `QUESTION_TYPES`) and bare-word answers.

`answer_question(scene, text)` is the ground truth: it parses a question, checks its precondition and computes the
answer from the scene alone. The generators only pick questions whose precondition holds.
"""

from __future__ import annotations

import io
import math
import random
import re
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NO_IMAGE_ANSWER = "I need an image with shapes to talk about."

#: qtype -> the question's wording; {shape} and {color} are filled from `SHAPES` and `COLORS`.
QUESTION_TYPES: dict[int, str] = {
    1: "What color is the {shape}?",
    2: "What shape is the {color} object?",
    3: "How many shapes are there?",
    4: "How many {color} shapes are there?",
    5: "Is there a {color} {shape}?",
    6: "Is the {color} {shape} on the left or the right?",
    7: "Describe the image.",
}
#: a question asked without any image (not one of the seven types)
NO_IMAGE_QTYPE = 0

MIN_SIDE, MAX_SIDE = 64, 512
MIN_SIZE_FRACTION, MAX_SIZE_FRACTION = 0.15, 0.40
#: "left" means the centre lies in the left 45 % of the width, "right" in the right 45 %
SIDE_FRACTION = 0.45
#: gap kept between shapes' bounding boxes, as a fraction of the shorter side, so that two shapes of one colour
#: never merge into one blob once the image is resized into 28-pixel tokens
MIN_GAP_FRACTION = 0.05

# How different programs spell each colour: named web colours, matplotlib's tab10, office and paint palettes.
# Each drawn colour is one of these plus a small per-channel jitter; the groups stay far apart.
_PALETTE: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((255, 0, 0), (214, 39, 40), (230, 25, 75), (204, 0, 0), (237, 28, 36), (220, 20, 60)),
    "orange": ((255, 165, 0), (255, 127, 14), (245, 130, 48), (255, 140, 0), (255, 128, 0), (237, 125, 49)),
    "yellow": ((255, 255, 0), (255, 225, 25), (255, 215, 0), (240, 228, 66), (255, 242, 0), (250, 220, 40)),
    "green": ((0, 128, 0), (0, 200, 0), (44, 160, 44), (60, 180, 75), (34, 139, 34), (50, 205, 50)),
    "blue": ((0, 0, 255), (31, 119, 180), (0, 114, 189), (67, 99, 216), (30, 100, 230), (0, 0, 200)),
    "purple": ((128, 0, 128), (148, 103, 189), (145, 30, 180), (160, 32, 240), (112, 48, 160), (128, 0, 200)),
    "black": ((0, 0, 0), (30, 30, 30), (50, 50, 50), (20, 20, 40), (40, 35, 30), (10, 10, 10)),
}
COLOR_JITTER = 12


class PreconditionError(ValueError):
    """The question does not apply to this scene (e.g. "the circle" when there are two circles)."""


@dataclass(frozen=True)
class Shape:
    """One filled shape; the box is in pixels, [x0, x1) x [y0, y1)."""

    kind: str
    color: str
    rgb: tuple[int, int, int]
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def center_x(self) -> float:
        return (self.x0 + self.x1) / 2

    @property
    def center_y(self) -> float:
        return (self.y0 + self.y1) / 2


@dataclass(frozen=True)
class Scene:
    """An image to draw: size, background, shapes and how it is drawn and stored."""

    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    is_antialiased: bool = True
    #: None for PNG (lossless), else the JPEG quality
    jpeg_quality: int | None = None

    @property
    def image_format(self) -> str:
        return "PNG" if self.jpeg_quality is None else "JPEG"


# ---------------------------------------------------------------- scenes


def _image_size(rng: random.Random) -> tuple[int, int]:
    roll = rng.random()
    if roll < 0.5:  # any aspect ratio
        return rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
    if roll < 0.8:  # roughly square
        side = rng.randint(MIN_SIDE, MAX_SIDE)
        other = min(MAX_SIDE, max(MIN_SIDE, round(side * rng.uniform(0.8, 1.25))))
        return (side, other) if rng.random() < 0.5 else (other, side)
    return rng.choice(((512, 512), (256, 256), (512, 384), (384, 512), (320, 240), (128, 128), (64, 64), (500, 300)))


def _background(rng: random.Random) -> tuple[int, int, int]:
    if rng.random() < 0.4:
        return (255, 255, 255)
    return (rng.randint(200, 255), rng.randint(200, 255), rng.randint(200, 255))


def jitter_color(color: str, rng: random.Random) -> tuple[int, int, int]:
    """One realistic RGB value for a colour name."""
    base = rng.choice(_PALETTE[color])
    r, g, b = (min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in base)
    return (r, g, b)


def _pick_colors(count: int, rng: random.Random) -> list[str]:
    # Reusing a colour now and then makes "How many red shapes?" reach 2-4 often enough to learn.
    colors: list[str] = []
    for _ in range(count):
        colors.append(rng.choice(colors) if colors and rng.random() < 0.3 else rng.choice(COLORS))
    return colors


def _place_boxes(width: int, height: int, sizes: list[tuple[float, float]], rng: random.Random
                 ) -> list[tuple[float, float]] | None:
    gap = max(3.0, MIN_GAP_FRACTION * min(width, height))
    placed: list[tuple[float, float, float, float]] = []
    for w, h in sizes:
        for _ in range(60):
            x0, y0 = rng.uniform(1, width - w - 1), rng.uniform(1, height - h - 1)
            if all(x0 + w + gap <= a or a1 + gap <= x0 or y0 + h + gap <= b or b1 + gap <= y0
                   for a, b, a1, b1 in placed):
                placed.append((x0, y0, x0 + w, y0 + h))
                break
        else:
            return None
    return [(x0, y0) for x0, y0, _, _ in placed]


def random_scene(rng: random.Random, num_shapes: int | None = None) -> Scene:
    """A random scene within the task's limits."""
    width, height = _image_size(rng)
    count = num_shapes if num_shapes is not None else rng.randint(1, 4)
    shorter = min(width, height)
    while True:
        kinds = [rng.choice(SHAPES) for _ in range(count)]
        sizes = []
        for kind in kinds:
            side = rng.uniform(MIN_SIZE_FRACTION, MAX_SIZE_FRACTION) * shorter
            # Triangles are isosceles and upright, a little flatter or taller from one program to the next.
            sizes.append((side, side * rng.uniform(0.85, 1.0) if kind == "triangle" else side))
        corners = _place_boxes(width, height, sizes, rng)
        if corners is not None:
            break
    colors = _pick_colors(count, rng)
    shapes = tuple(
        Shape(kind, color, jitter_color(color, rng), x0, y0, x0 + w, y0 + h)
        for kind, color, (w, h), (x0, y0) in zip(kinds, colors, sizes, corners, strict=True)
    )
    quality = rng.randint(75, 95) if rng.random() < 0.4 else None
    return Scene(width, height, _background(rng), shapes, is_antialiased=rng.random() < 0.5, jpeg_quality=quality)


# ---------------------------------------------------------------- drawing

_SUPERSAMPLE = 4


def _outline(kind: str, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]] | None:
    if kind == "triangle":
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    if kind == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    return None  # circle: an ellipse in the box


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float, float], fill: int | tuple
                ) -> None:
    outline = _outline(kind, *box)
    if outline is None:
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon(outline, fill=fill)


def _paste_antialiased(image: Image.Image, shape: Shape) -> None:
    # Draw a coverage mask at 4x within the shape's pixel box, then downsample it: sub-pixel accurate edges.
    left, top = math.floor(shape.x0), math.floor(shape.y0)
    right, bottom = math.ceil(shape.x1), math.ceil(shape.y1)
    size = (right - left, bottom - top)
    mask = Image.new("L", (size[0] * _SUPERSAMPLE, size[1] * _SUPERSAMPLE), 0)
    box = tuple((v - o) * _SUPERSAMPLE for v, o in
                ((shape.x0, left), (shape.y0, top), (shape.x1, left), (shape.y1, top)))
    _draw_shape(ImageDraw.Draw(mask), shape.kind, box, 255)  # type: ignore[arg-type]
    mask = mask.resize(size, Image.Resampling.BOX)
    image.paste(Image.new("RGB", size, shape.rgb), (left, top), mask)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image, after the round trip through its file format (JPEG loses detail)."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        if scene.is_antialiased:
            _paste_antialiased(image, shape)
        else:
            box = (round(shape.x0), round(shape.y0), round(shape.x1) - 1, round(shape.y1) - 1)
            _draw_shape(draw, shape.kind, box, shape.rgb)
    if scene.jpeg_quality is None:
        return image  # PNG is lossless: its round trip is the image itself
    return Image.open(io.BytesIO(encode(image, "JPEG", scene.jpeg_quality))).convert("RGB")


def encode(image: Image.Image, image_format: str = "PNG", quality: int = 90) -> bytes:
    """The image as PNG or JPEG file bytes."""
    buffer = io.BytesIO()
    if image_format.upper() == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- answers

_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_QUESTION_PATTERNS: dict[int, re.Pattern[str]] = {
    qtype: re.compile(
        "^" + re.escape(text).replace(r"\{shape\}", f"(?P<shape>{_SHAPE_RE})")
        .replace(r"\{color\}", f"(?P<color>{_COLOR_RE})") + "$",
        re.IGNORECASE,
    )
    for qtype, text in QUESTION_TYPES.items()
}


def question_type(text: str) -> int:
    """The type (1-7) of a question's wording; ValueError for anything else."""
    for qtype, pattern in _QUESTION_PATTERNS.items():
        if pattern.match(text.strip()):
            return qtype
    raise ValueError(f"not a question of the demo task: {text!r}")


def word_answer(word: str) -> str:
    """How the model says a one-word answer: "Red.", "3.", "Yes."."""
    return word[:1].upper() + word[1:] + "."


def describe(scene: Scene) -> str:
    """One sentence naming every shape with its colour, left to right: "A red circle and a blue square."."""
    ordered = sorted(scene.shapes, key=lambda s: (s.center_x, s.center_y))
    items = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.color} {s.kind}" for s in ordered]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return text[0].upper() + text[1:] + "."


def side_of(scene: Scene, shape: Shape) -> str | None:
    """"left" or "right" by the shape's centre; None when the centre lies in the middle 10 %."""
    if shape.center_x < SIDE_FRACTION * scene.width:
        return "left"
    if shape.center_x > (1 - SIDE_FRACTION) * scene.width:
        return "right"
    return None


def _the_one(matches: list[Shape], what: str) -> Shape:
    if len(matches) != 1:
        raise PreconditionError(f"expected exactly one {what}, found {len(matches)}")
    return matches[0]


def answer_question(scene: Scene, text: str) -> str:
    """The true answer to one of the seven questions about `scene`; PreconditionError where it does not apply."""
    qtype = question_type(text)
    match = _QUESTION_PATTERNS[qtype].match(text.strip())
    assert match is not None
    params = {k: v.lower() for k, v in match.groupdict().items()}
    shapes = scene.shapes
    if qtype == 1:
        return word_answer(_the_one([s for s in shapes if s.kind == params["shape"]], params["shape"]).color)
    if qtype == 2:
        return word_answer(_the_one([s for s in shapes if s.color == params["color"]], params["color"]).kind)
    if qtype == 3:
        return word_answer(str(len(shapes)))
    if qtype == 4:
        return word_answer(str(sum(s.color == params["color"] for s in shapes)))
    if qtype == 5:
        found = any(s.color == params["color"] and s.kind == params["shape"] for s in shapes)
        return word_answer("yes" if found else "no")
    if qtype == 6:
        target = _the_one([s for s in shapes if s.color == params["color"] and s.kind == params["shape"]],
                          f"{params['color']} {params['shape']}")
        side = side_of(scene, target)
        if side is None:
            raise PreconditionError("the shape's centre is in the middle 10 % of the width")
        return word_answer(side)
    return describe(scene)


# ---------------------------------------------------------------- questions


def _question_text(qtype: int, scene: Scene, rng: random.Random) -> str | None:
    """A question of this type whose precondition holds for the scene, or None where there is none."""
    shapes = scene.shapes
    kinds, colors = Counter(s.kind for s in shapes), Counter(s.color for s in shapes)
    template = QUESTION_TYPES[qtype]
    if qtype == 1:
        options = [k for k, n in kinds.items() if n == 1]
        return template.format(shape=rng.choice(options)) if options else None
    if qtype == 2:
        options = [c for c, n in colors.items() if n == 1]
        return template.format(color=rng.choice(options)) if options else None
    if qtype == 4:
        color = rng.choice(list(colors)) if rng.random() < 0.7 else rng.choice(COLORS)
        return template.format(color=color)
    if qtype == 5:
        return template.format(**_exists_params(scene, rng))
    if qtype == 6:
        combos = Counter((s.color, s.kind) for s in shapes)
        candidates = [s for s in shapes if combos[(s.color, s.kind)] == 1 and side_of(scene, s) is not None]
        if not candidates:
            return None
        target = rng.choice(candidates)
        return template.format(color=target.color, shape=target.kind)
    return template  # 3 and 7 always apply


def _exists_params(scene: Scene, rng: random.Random) -> dict[str, str]:
    present = sorted({(s.color, s.kind) for s in scene.shapes})
    if rng.random() < 0.5:
        color, kind = rng.choice(present)
        return {"color": color, "shape": kind}
    absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
    # Mostly near misses: the colour or the shape is in the picture, just not together.
    near = [(c, k) for c, k in absent if any(c == pc or k == pk for pc, pk in present)]
    color, kind = rng.choice(near if near and rng.random() < 0.7 else absent)
    return {"color": color, "shape": kind}


def random_question(scene: Scene, rng: random.Random, qtype: int | None = None,
                    weights: dict[int, float] | None = None) -> tuple[str, str, int]:
    """(question, answer, qtype) for the scene; `qtype` is honoured where it applies, else another is drawn."""
    types = list(QUESTION_TYPES)
    chosen = qtype if qtype is not None else rng.choices(types, [(weights or {}).get(t, 1.0) for t in types])[0]
    while True:
        text = _question_text(chosen, scene, rng)
        if text is not None:
            return text, answer_question(scene, text), chosen
        chosen = rng.choices(types, [(weights or {}).get(t, 1.0) for t in types])[0]


# ---------------------------------------------------------------- public helpers for tests


def _sample_rng(seed: int) -> random.Random:
    # String seeds keep these streams apart from the training streams ("train:...").
    return random.Random(f"qa:{seed}")


def _sample(seed: int) -> tuple[Scene, str, str, int]:
    rng = _sample_rng(seed)
    qtype = rng.randint(1, 7)
    while True:  # a new scene until the drawn type applies, so that the types stay uniform
        scene = random_scene(rng)
        text = _question_text(qtype, scene, rng)
        if text is not None:
            return scene, text, answer_question(scene, text), qtype


def sample_scene(seed: int) -> Scene:
    """The scene that `sample_qa(seed)` and `draw_sample_image(seed)` show."""
    return _sample(seed)[0]


def draw_sample_image(seed: int) -> Image.Image:
    """A sample image of the task (RGB), deterministic by seed: the image of `sample_qa(seed)`."""
    return render(sample_scene(seed))


def sample_qa(seed: int) -> tuple[Image.Image, str, str, int]:
    """(image, question, answer, qtype), qtype 1-7 drawn uniformly, deterministic by seed."""
    scene, question, answer, qtype = _sample(seed)
    return render(scene), question, answer, qtype


# ---------------------------------------------------------------- grading


def _normalize(text: str) -> str:
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def parse_description(text: str) -> Counter[tuple[str, str]]:
    """The multiset of (colour, shape) pairs named in a description."""
    return Counter(
        (m.group(1), m.group(2)) for m in re.finditer(rf"\b({_COLOR_RE})\s+({_SHAPE_RE})s?\b", text.lower())
    )


def is_correct(answer_text: str, expected: str, qtype: int) -> bool:
    """Whether a model's answer counts as right: case-insensitive, final period optional; descriptions by content."""
    if qtype == 7:
        got, want = parse_description(answer_text), parse_description(expected)
        # Also refuse extra words that name a colour or a shape outside any pair ("a red circle and a square").
        extra = re.findall(rf"\b({_COLOR_RE}|{_SHAPE_RE})s?\b", answer_text.lower())
        return got == want and len(extra) == 2 * sum(got.values())
    return _normalize(answer_text) == _normalize(expected)
