"""The embedding cache: least recently used dropped first within its byte budget, hits and misses per media kind."""

from __future__ import annotations

import torch

from vlmserve.engine.image_cache import ImageEmbeddingCache


def _embeds(rows: int) -> torch.Tensor:
    return torch.zeros(rows, 4)  # 16 bytes a row


def test_a_lookup_hits_only_when_every_item_is_there() -> None:
    cache = ImageEmbeddingCache(max_bytes=1024)
    cache.put("a", _embeds(1))
    assert cache.get_all(("a", "b")) is None
    assert cache.misses["image"] == 2 and cache.hits["image"] == 0
    found = cache.get_all(("a",))
    assert found is not None and len(found) == 1
    assert cache.hits["image"] == 1


def test_videos_are_counted_apart_from_images() -> None:
    cache = ImageEmbeddingCache(max_bytes=1024)
    cache.put("v", _embeds(2))
    assert cache.get_all(("v",), kind="video") is not None
    assert cache.get_all(("w",), kind="video") is None
    assert (cache.hits["video"], cache.misses["video"]) == (1, 1)
    assert (cache.hits["image"], cache.misses["image"]) == (0, 0)


def test_the_least_recently_used_entry_goes_first() -> None:
    cache = ImageEmbeddingCache(max_bytes=48)  # three one-row entries
    for name in "abc":
        cache.put(name, _embeds(1))
    assert cache.get_all(("a",)) is not None  # "a" is now the most recent
    cache.put("d", _embeds(1))
    assert cache.get_all(("b",)) is None
    assert all(cache.get_all((name,)) is not None for name in "acd")


def test_an_entry_larger_than_the_budget_is_not_kept() -> None:
    cache = ImageEmbeddingCache(max_bytes=16)
    cache.put("big", _embeds(2))
    assert cache.get_all(("big",)) is None
