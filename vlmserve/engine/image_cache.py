"""Image and video embeddings kept by content hash, bounded in bytes (least recently used dropped first).

Images and videos share the entries and the byte budget; hits and misses are counted per kind, so a video's lookup
never shows up as an image's in /metrics."""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Literal

import torch

MediaKind = Literal["image", "video"]


class ImageEmbeddingCache:
    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits: Counter[MediaKind] = Counter()
        self.misses: Counter[MediaKind] = Counter()

    def get_all(self, hashes: tuple[str, ...], kind: MediaKind = "image") -> list[torch.Tensor] | None:
        """Every item's embeddings, or None (all counted as misses of `kind`) when any is missing."""
        found = [self._entries.get(h) for h in hashes]
        if any(f is None for f in found):
            self.misses[kind] += len(hashes)
            return None
        for h in hashes:
            self._entries.move_to_end(h)
        self.hits[kind] += len(hashes)
        return [f for f in found if f is not None]

    def put(self, image_hash: str, embeds: torch.Tensor) -> None:
        size = embeds.numel() * embeds.element_size()
        if size > self._max_bytes or image_hash in self._entries:
            return
        self._entries[image_hash] = embeds
        self._bytes += size
        while self._bytes > self._max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()
