"""Per-token targets for the auxiliary vision loss used in training (never shipped with the model).

A model trained from scratch learns the answers' text prior long before it learns to see: in a first run the
vision tower got only the thin gradient of one answer per question and stayed near chance on shapes. This module
labels every image token (one 28x28 cell of the resized image) with what the scene shows there: which colour and
shape covers it, on which side of the image that shape's centre lies, and its rank from the left (the order in which
"Describe the image." names the shapes). A linear probe on the vision tower's
output (the merger, i.e. exactly what the language model receives) is trained on these labels beside the language
loss, so that every token carries its object's colour, shape and side. The probe is dropped when saving.
"""

from __future__ import annotations

import numpy as np
import torch

from vlmserve.demo.shapes import COLORS, SHAPES, Scene, Shape, side_of

IGNORE = -100
#: class 0 is the background; then one class per (colour, shape)
NUM_OBJECT_CLASSES = 1 + len(COLORS) * len(SHAPES)
#: left, right, middle 10 %
NUM_SIDES = 3
#: 1st to 4th shape from the left
NUM_RANKS = 4
_SIDES = {"left": 0, "right": 1, None: 2}
#: sample points per token cell and axis
_SUBSAMPLES = 4


def object_class(shape: Shape) -> int:
    return 1 + COLORS.index(shape.color) * len(SHAPES) + SHAPES.index(shape.kind)


def _inside(shape: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if shape.kind == "circle":
        radius = (shape.x1 - shape.x0) / 2
        return (x - shape.center_x) ** 2 + (y - shape.center_y) ** 2 <= radius**2
    in_box = (x >= shape.x0) & (x < shape.x1) & (y >= shape.y0) & (y < shape.y1)
    if shape.kind == "square":
        return in_box
    depth = (y - shape.y0) / (shape.y1 - shape.y0)  # 0 at the apex, 1 at the base
    return in_box & (np.abs(x - shape.center_x) <= depth * (shape.x1 - shape.x0) / 2)


def token_labels(scene: Scene, grid_thw: torch.Tensor, merge_size: int = 2) -> torch.Tensor:
    """(tokens, 3) int64: object class, side and rank from the left of each merged token, in the model's order.

    A token takes the shape that covers most of its cell when that shape covers at least a quarter of it, else the
    background (whose side and rank are ignored).
    """
    _, grid_h, grid_w = (int(v) for v in grid_thw.reshape(-1)[:3])
    rows, cols = grid_h // merge_size, grid_w // merge_size
    n = _SUBSAMPLES
    ys = (np.arange(rows * n) + 0.5) * scene.height / (rows * n)
    xs = (np.arange(cols * n) + 0.5) * scene.width / (cols * n)
    x, y = np.meshgrid(xs, ys)
    owner = np.full(x.shape, -1)
    for index, shape in enumerate(scene.shapes):
        owner[_inside(shape, x, y)] = index
    # (rows, n, cols, n) -> per cell, the sample points' owners
    cells = owner.reshape(rows, n, cols, n).transpose(0, 2, 1, 3).reshape(rows * cols, n * n)
    labels = np.full((rows * cols, 3), IGNORE, dtype=np.int64)
    labels[:, 0] = 0
    order = sorted(range(len(scene.shapes)), key=lambda i: (scene.shapes[i].center_x, scene.shapes[i].center_y))
    for index, shape in enumerate(scene.shapes):
        covered = (cells == index).sum(1)
        best = (covered * 4 >= n * n) & (covered >= np.array([(cells == j).sum(1) for j in
                                                              range(len(scene.shapes))]).max(0))
        labels[best, 0] = object_class(shape)
        labels[best, 1] = _SIDES[side_of(scene, shape)]
        labels[best, 2] = order.index(index)
    return torch.from_numpy(labels)
