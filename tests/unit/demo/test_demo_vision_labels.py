"""Per-token targets of the training-only vision loss."""

from __future__ import annotations

import torch

from vlmserve.demo.shapes import Scene, Shape
from vlmserve.demo.vision_labels import IGNORE, object_class, token_labels


def test_tokens_take_the_shape_that_covers_them() -> None:
    square = Shape("square", "red", (255, 0, 0), 40, 40, 120, 120)
    triangle = Shape("triangle", "green", (0, 200, 0), 200, 120, 240, 160)
    circle = Shape("circle", "blue", (0, 0, 255), 280, 40, 360, 120)
    scene = Scene(400, 200, (255, 255, 255), (circle, square, triangle))
    # 5 rows x 10 columns of tokens (each 2x2 patches), so each token covers 40x40 pixels of this image.
    labels = token_labels(scene, torch.tensor([[1, 10, 20]])).view(5, 10, 3)
    assert labels[1:3, 1:3, 0].eq(object_class(square)).all()
    assert labels[1:3, 7:9, 0].eq(object_class(circle)).all()
    assert labels[3, 5, 0] == object_class(triangle)
    assert (labels[..., 0] != 0).sum() == 9
    # side: left, right, middle 10 % (the triangle's centre is at 55 % of the width, not beyond it)
    assert labels[1, 1, 1] == 0 and labels[1, 7, 1] == 1 and labels[3, 5, 1] == 2
    # rank from the left: square, triangle, circle
    assert labels[1, 1, 2] == 0 and labels[3, 5, 2] == 1 and labels[1, 7, 2] == 2
    background = labels[..., 0] == 0
    assert labels[background][:, 1:].eq(IGNORE).all()
