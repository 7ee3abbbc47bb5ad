"""Seconds spent in the vision tower, measured where the tower runs, shared out to the prompts it encoded.

The paged engine calls the tower itself (`model_runner`), so it times that call. The generate engine cannot: the
tower runs inside `model.generate`, so `TowerTimer` times the tower module's forward through hooks.
On CUDA both synchronize before reading the clock: kernels are asynchronous, and without it the time would be
the launch cost, not the tower's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: attribute names of the vision tower inside transformers VLMs (the base model's or the wrapper's)
_TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device) -> Iterator[list[float]]:
    """`with timed(device) as elapsed:` — after the block, `elapsed[0]` is its seconds of device work."""
    elapsed = [0.0]
    _synchronize(device)
    started = time.perf_counter()
    try:
        yield elapsed
    finally:
        _synchronize(device)
        elapsed[0] = time.perf_counter() - started


def share_by_images(seconds: float, image_counts: list[int]) -> list[float]:
    """`seconds` of one tower call split over the prompts it encoded, in proportion to their images."""
    total = sum(image_counts)
    return [seconds * count / total if total else 0.0 for count in image_counts]


def find_tower(model: Any) -> torch.nn.Module | None:
    """The vision tower module of a transformers VLM, or None when it has none we recognise."""
    for owner in (model, getattr(model, "model", None)):
        for name in _TOWER_NAMES:
            tower = getattr(owner, name, None) if owner is not None else None
            if isinstance(tower, torch.nn.Module):
                return tower
    return None


class TowerTimer:
    """Adds up the seconds of every forward of a model's vision tower (hooks; the generate engine's view).

    NOTE: a model whose tower is not found (`find_tower`) reports 0 s; its images are still counted.
    """

    def __init__(self, model: Any) -> None:
        self.seconds = 0.0
        self._started: float | None = None
        tower = find_tower(model)
        self.is_available = tower is not None
        if tower is not None:
            self._device = next(tower.parameters()).device
            tower.register_forward_pre_hook(self._before)
            tower.register_forward_hook(self._after)

    def take(self) -> float:
        """Seconds since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def _before(self, module: torch.nn.Module, args: Any) -> None:
        if self._started is None:  # a tower calling itself (nested modules) is timed once, outermost
            _synchronize(self._device)
            self._started = time.perf_counter()

    def _after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._started is not None:
            _synchronize(self._device)
            self.seconds += time.perf_counter() - self._started
            self._started = None
