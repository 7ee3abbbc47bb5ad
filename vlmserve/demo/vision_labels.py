"""Per-token targets for the auxiliary vision loss used in training (never shipped with the model).

A model trained from scratch learns the answers' text prior long before it learns to see: in a first run the
vision tower got only the thin gradient of one answer per question and stayed near chance on shapes. This module
labels every image token (one 28x28 cell of the resized image) with what the scene shows there: which colour and
shape covers it, on which side of the image that shape's centre lies, and its rank from the left (the order in which
"Describe the image." names the shapes); and two scene-level counts that the counting questions ask for: how many
shapes the image holds (on every token, background included) and how many shapes share this token's colour. Every
token also carries a summary of the whole scene: how many shapes of each colour, which (colour, shape) pairs are
there, and the object at each rank from the left. The language model then reads a lookup ("Is there a red
circle?") off any image token instead of binding two words to one token by attention, which it learnt slowly. A
linear probe on the vision tower's
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
#: 1-4 shapes in the image; 1-4 shapes of this token's colour
NUM_COUNTS = 4
#: the label columns, in order, and the number of classes of each
LABEL_CLASSES = {"object": NUM_OBJECT_CLASSES, "side": NUM_SIDES, "rank": NUM_RANKS, "count": NUM_COUNTS,
                 "color_count": NUM_COUNTS}
#: scene-summary columns, the same on every token: shapes per colour (0-4), each pair present (no/yes), the object
#: at each rank from the left (0: none)
SCENE_COLUMNS: dict[str, int] = {
    **{f"num_{color}": 5 for color in COLORS},
    **{f"has_{color}_{shape}": 2 for color in COLORS for shape in SHAPES},
    **{f"slot_{rank}": NUM_OBJECT_CLASSES for rank in range(NUM_RANKS)},
}
LABEL_CLASSES.update(SCENE_COLUMNS)
#: columns whose losses are averaged into one term (the others are one term each)
LABEL_GROUPS: dict[str, list[int]] = {
    name: [list(LABEL_CLASSES).index(name)] for name in ("object", "side", "rank", "count", "color_count")}
for _group, _prefix in (("colors", "num_"), ("pairs", "has_"), ("slots", "slot_")):
    LABEL_GROUPS[_group] = [i for i, name in enumerate(LABEL_CLASSES) if name.startswith(_prefix)]
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
    """(tokens, columns) int64 per merged token, in the model's order; the columns are `LABEL_CLASSES`.

    A token takes the shape that covers most of its cell when that shape covers at least a quarter of it, else the
    background (whose side, rank and colour count are ignored). A shape too small to cover a quarter of any cell
    still owns the cell of its centre, so that every shape has a labelled token. The image's shape count is on every
    token, background included.
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
    coverage = np.stack([(cells == j).sum(1) for j in range(len(scene.shapes))])  # (shapes, tokens)
    labels = np.full((rows * cols, len(LABEL_CLASSES)), IGNORE, dtype=np.int64)
    labels[:, 0] = 0
    labels[:, 3] = len(scene.shapes) - 1
    order = sorted(range(len(scene.shapes)), key=lambda i: (scene.shapes[i].center_x, scene.shapes[i].center_y))
    owned = np.full(rows * cols, -1)
    for index in range(len(scene.shapes)):
        owned[(coverage[index] * 4 >= n * n) & (coverage[index] >= coverage.max(0))] = index
    for index, shape in enumerate(scene.shapes):
        if not (owned == index).any():
            row = min(rows - 1, int(shape.center_y * rows / scene.height))
            col = min(cols - 1, int(shape.center_x * cols / scene.width))
            if owned[row * cols + col] < 0:
                owned[row * cols + col] = index
        best = owned == index
        labels[best, 0] = object_class(shape)
        labels[best, 1] = _SIDES[side_of(scene, shape)]
        labels[best, 2] = order.index(index)
        labels[best, 4] = sum(other.color == shape.color for other in scene.shapes) - 1
    labels[:, 5:] = scene_summary(scene)
    return torch.from_numpy(labels)


def scene_summary(scene: Scene) -> np.ndarray:
    """The `SCENE_COLUMNS` values of a scene."""
    colors = [sum(s.color == color for s in scene.shapes) for color in COLORS]
    pairs = [int(any(s.color == c and s.kind == k for s in scene.shapes)) for c in COLORS for k in SHAPES]
    ordered = sorted(scene.shapes, key=lambda s: (s.center_x, s.center_y))
    slots = [object_class(ordered[r]) if r < len(ordered) else 0 for r in range(NUM_RANKS)]
    return np.array(colors + pairs + slots, dtype=np.int64)
