"""The demo task's scenes, questions, true answers and grader."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from vlmserve.demo import shapes
from vlmserve.demo.shapes import (
    COLORS,
    QUESTION_TYPES,
    SHAPES,
    PreconditionError,
    Scene,
    Shape,
    answer_question,
    describe,
    draw_sample_image,
    encode,
    is_correct,
    parse_description,
    random_question,
    render,
    sample_qa,
    sample_scene,
)

SEEDS = range(300)


def _shape(kind: str, color: str, x0: float, y0: float, side: float = 40) -> Shape:
    return Shape(kind, color, shapes.jitter_color(color, random.Random(0)), x0, y0, x0 + side, y0 + side)


def _scene(*items: Shape, width: int = 400, height: int = 200) -> Scene:
    return Scene(width, height, (255, 255, 255), items)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [sample_scene(seed) for seed in SEEDS]


def test_samples_are_deterministic_by_seed() -> None:
    for seed in (0, 7, 123):
        image_a, *rest_a = sample_qa(seed)
        image_b, *rest_b = sample_qa(seed)
        assert rest_a == rest_b
        assert image_a.tobytes() == image_b.tobytes()
        assert draw_sample_image(seed).tobytes() == image_a.tobytes()
    assert [sample_qa(s)[1:] for s in range(20)] != [sample_qa(s)[1:] for s in range(20, 40)]


def test_scenes_stay_within_the_task(scenes: list[Scene]) -> None:
    for scene in scenes:
        assert 64 <= scene.width <= 512 and 64 <= scene.height <= 512
        assert all(channel >= 200 for channel in scene.background)
        assert 1 <= len(scene.shapes) <= 4
        assert scene.jpeg_quality is None or 75 <= scene.jpeg_quality <= 100
        shorter = min(scene.width, scene.height)
        for shape in scene.shapes:
            assert shape.kind in SHAPES and shape.color in COLORS
            assert 0.15 * shorter <= shape.x1 - shape.x0 <= 0.40 * shorter
            assert shape.y1 - shape.y0 <= 0.40 * shorter
            assert shape.x0 >= 0 and shape.x1 <= scene.width and shape.y0 >= 0 and shape.y1 <= scene.height


def test_shapes_never_overlap(scenes: list[Scene]) -> None:
    for scene in scenes:
        for i, a in enumerate(scene.shapes):
            for b in scene.shapes[i + 1:]:
                apart = a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0
                assert apart, (scene, a, b)


def test_jittered_colours_stay_unambiguous() -> None:
    rng = random.Random(0)
    for color in COLORS:
        for _ in range(200):
            rgb = shapes.jitter_color(color, rng)
            nearest = min(((c, anchor) for c in COLORS for anchor in shapes._PALETTE[c]),
                          key=lambda item: sum((x - y) ** 2 for x, y in zip(item[1], rgb, strict=True)))
            assert nearest[0] == color


def test_rendered_images_show_the_scene() -> None:
    for seed in range(40):
        scene = sample_scene(seed)
        image = render(scene)
        assert image.mode == "RGB" and image.size == (scene.width, scene.height)
        tolerance = 60 if scene.jpeg_quality else 8
        corner = image.getpixel((0, 0))
        assert all(abs(a - b) <= tolerance for a, b in zip(corner, scene.background, strict=True))
        for shape in scene.shapes:
            # A point well inside every kind of shape: on the vertical axis, two thirds of the way down.
            point = (int(shape.center_x), int(shape.y0 + (shape.y1 - shape.y0) * 2 / 3))
            got = image.getpixel(point)
            assert all(abs(a - b) <= tolerance for a, b in zip(got, shape.rgb, strict=True)), (seed, shape, got)


def test_images_encode_as_png_and_jpeg() -> None:
    image = draw_sample_image(3)
    assert encode(image, "PNG")[:8] == b"\x89PNG\r\n\x1a\n"
    assert encode(image, "JPEG", quality=80)[:2] == b"\xff\xd8"


def test_sample_question_types_are_uniform_and_answers_true() -> None:
    counts: Counter[int] = Counter()
    for seed in range(700):
        _, question, answer, qtype = sample_qa(seed)
        counts[qtype] += 1
        assert shapes.question_type(question) == qtype
        assert answer_question(sample_scene(seed), question) == answer
    assert set(counts) == set(QUESTION_TYPES)
    assert min(counts.values()) > 60


def test_generated_questions_meet_their_preconditions(scenes: list[Scene]) -> None:
    rng = random.Random(1)
    for scene in scenes:
        for qtype in QUESTION_TYPES:
            question, answer, got_type = random_question(scene, rng, qtype=qtype)
            match = shapes._QUESTION_PATTERNS[got_type].match(question)
            assert match is not None
            params = match.groupdict()
            if got_type == 1:
                assert sum(s.kind == params["shape"] for s in scene.shapes) == 1
            if got_type == 2:
                assert sum(s.color == params["color"] for s in scene.shapes) == 1
            if got_type == 6:
                [target] = [s for s in scene.shapes if (s.color, s.kind) == (params["color"], params["shape"])]
                assert not 0.45 * scene.width <= target.center_x <= 0.55 * scene.width
            assert answer_question(scene, question) == answer


def test_answers_on_a_hand_made_scene() -> None:
    scene = _scene(_shape("circle", "red", 10, 10), _shape("square", "blue", 300, 100),
                   _shape("triangle", "red", 100, 120), _shape("circle", "green", 190, 20))
    assert answer_question(scene, "What color is the square?") == "Blue."
    assert answer_question(scene, "What color is the triangle?") == "Red."
    assert answer_question(scene, "What shape is the blue object?") == "Square."
    assert answer_question(scene, "What shape is the green object?") == "Circle."
    assert answer_question(scene, "How many shapes are there?") == "4."
    assert answer_question(scene, "How many red shapes are there?") == "2."
    assert answer_question(scene, "How many yellow shapes are there?") == "0."
    assert answer_question(scene, "Is there a red triangle?") == "Yes."
    assert answer_question(scene, "Is there a blue circle?") == "No."
    assert answer_question(scene, "Is the red circle on the left or the right?") == "Left."
    assert answer_question(scene, "Is the blue square on the left or the right?") == "Right."
    assert answer_question(scene, "Describe the image.") == (
        "A red circle, a red triangle, a green circle and a blue square.")
    assert answer_question(scene, "what color is the SQUARE?") == "Blue."  # wording is case-insensitive


def test_questions_whose_precondition_fails_are_refused() -> None:
    scene = _scene(_shape("circle", "red", 10, 10), _shape("circle", "red", 100, 10),
                   _shape("square", "blue", 180, 80))
    with pytest.raises(PreconditionError):
        answer_question(scene, "What color is the circle?")  # two circles
    with pytest.raises(PreconditionError):
        answer_question(scene, "What shape is the red object?")  # two red objects
    with pytest.raises(PreconditionError):
        answer_question(scene, "Is the red circle on the left or the right?")  # two red circles
    with pytest.raises(PreconditionError):
        answer_question(scene, "Is the blue square on the left or the right?")  # centre at 50 % of the width
    with pytest.raises(ValueError):
        answer_question(scene, "What is the meaning of life?")


def test_descriptions_name_shapes_left_to_right() -> None:
    one = _scene(_shape("square", "black", 50, 50))
    two = _scene(_shape("square", "blue", 300, 50), _shape("circle", "red", 10, 50))
    three = _scene(_shape("square", "blue", 300, 50), _shape("circle", "red", 10, 50),
                   _shape("triangle", "green", 150, 50))
    assert describe(one) == "A black square."
    assert describe(two) == "A red circle and a blue square."
    assert describe(three) == "A red circle, a green triangle and a blue square."
    orange_first = _scene(_shape("triangle", "orange", 10, 50), _shape("circle", "orange", 300, 50))
    assert describe(orange_first) == "An orange triangle and an orange circle."


def test_grader() -> None:
    assert is_correct("Red.", "Red.", 1)
    assert is_correct("red", "Red.", 1)
    assert is_correct(" RED. ", "Red.", 1)
    assert not is_correct("Red!", "Red.", 1)
    assert not is_correct("Orange.", "Red.", 1)
    assert not is_correct("It is red.", "Red.", 1)
    assert is_correct("3", "3.", 3)
    assert is_correct("yes", "Yes.", 5)
    expected = "A red circle and a blue square."
    assert is_correct("A blue square and a red circle.", expected, 7)
    assert is_correct("a red circle and a blue square", expected, 7)
    assert not is_correct("A red circle.", expected, 7)
    assert not is_correct("A red circle and a blue square and a green triangle.", expected, 7)
    assert not is_correct("A red circle, a red circle and a blue square.", expected, 7)
    assert not is_correct("A red circle and a blue square and a square.", expected, 7)
    assert parse_description("A red circle, a red circle and a blue square.") == Counter(
        {("red", "circle"): 2, ("blue", "square"): 1})
