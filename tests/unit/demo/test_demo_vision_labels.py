"""Per-token targets of the training-only vision loss."""

from __future__ import annotations

import torch

from vlmserve.demo.shapes import Scene, Shape
from vlmserve.demo.vision_labels import IGNORE, LABEL_CLASSES, object_class, token_labels


def test_tokens_take_the_shape_that_covers_them() -> None:
    square = Shape("square", "red", (255, 0, 0), 40, 40, 120, 120)
    triangle = Shape("triangle", "green", (0, 200, 0), 200, 120, 240, 160)
    circle = Shape("circle", "blue", (0, 0, 255), 280, 40, 360, 120)
    scene = Scene(400, 200, (255, 255, 255), (circle, square, triangle))
    # 5 rows x 10 columns of tokens (each 2x2 patches), so each token covers 40x40 pixels of this image.
    labels = token_labels(scene, torch.tensor([[1, 10, 20]])).view(5, 10, -1)
    assert labels[1:3, 1:3, 0].eq(object_class(square)).all()
    assert labels[1:3, 7:9, 0].eq(object_class(circle)).all()
    assert labels[3, 5, 0] == object_class(triangle)
    assert (labels[..., 0] != 0).sum() == 9
    # side: left, right, middle 10 % (the triangle's centre is at 55 % of the width, not beyond it)
    assert labels[1, 1, 1] == 0 and labels[1, 7, 1] == 1 and labels[3, 5, 1] == 2
    # rank from the left: square, triangle, circle
    assert labels[1, 1, 2] == 0 and labels[3, 5, 2] == 1 and labels[1, 7, 2] == 2
    # three shapes in the image, on every token; each shape's colour is its own
    assert labels[..., 3].eq(2).all()
    background = labels[..., 0] == 0
    assert labels[~background][:, 4].eq(0).all()
    assert labels[background][:, [1, 2, 4]].eq(IGNORE).all()


def test_every_token_carries_the_scene_summary() -> None:
    red_square = Shape("square", "red", (255, 0, 0), 40, 40, 120, 120)
    red_circle = Shape("circle", "red", (255, 0, 0), 280, 40, 360, 120)
    blue = Shape("triangle", "blue", (0, 0, 255), 160, 100, 220, 160)
    labels = token_labels(Scene(400, 200, (255, 255, 255), (red_circle, red_square, blue)), torch.tensor([[1, 10, 20]]))
    summary = dict(zip(LABEL_CLASSES, labels[0].tolist(), strict=True))
    assert summary["num_red"] == 2 and summary["num_blue"] == 1 and summary["num_green"] == 0
    assert summary["has_red_circle"] == 1 and summary["has_red_triangle"] == 0 and summary["has_blue_triangle"] == 1
    assert [summary[f"slot_{r}"] for r in range(4)] == [object_class(red_square), object_class(blue),
                                                      object_class(red_circle), 0]
    assert labels[:, 5:].eq(labels[0, 5:]).all()


def test_a_shape_smaller_than_a_quarter_token_owns_the_token_of_its_centre() -> None:
    dot = Shape("circle", "red", (255, 0, 0), 52, 52, 60, 60)  # 8 px in 40-px tokens: covers 3 % of one
    other = Shape("square", "red", (255, 0, 0), 200, 40, 280, 120)
    labels = token_labels(Scene(400, 200, (255, 255, 255), (dot, other)), torch.tensor([[1, 10, 20]])).view(5, 10, -1)
    assert labels[1, 1, 0] == object_class(dot)
    assert labels[1, 1, 4] == 1  # two red shapes
    assert (labels[..., 0] == object_class(dot)).sum() == 1
