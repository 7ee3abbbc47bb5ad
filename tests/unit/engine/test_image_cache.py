"""The embedding cache: least recently used dropped first within its byte budget (inclusive, only as many as needed),
all-or-nothing lookups in order, hits and misses per media kind and accumulated."""

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


def embeds(value: float, rows: int = 2) -> torch.Tensor:
    return torch.full((rows, 4), value)  # 4 bytes per float32: rows * 16 bytes


def test_a_lookup_returns_every_image_in_order_or_nothing() -> None:
    cache = ImageEmbeddingCache(max_bytes=1000)
    cache.put("a", embeds(1.0))
    cache.put("b", embeds(2.0))
    found = cache.get_all(("b", "a"))
    assert found is not None and [float(f[0, 0]) for f in found] == [2.0, 1.0]
    assert (cache.hits["image"], cache.misses["image"]) == (2, 0)
    assert cache.get_all(("a", "missing", "b")) is None
    assert (cache.hits["image"], cache.misses["image"]) == (2, 3)  # one missing image makes the whole lookup a miss
    assert cache.get_all(("z",)) is None and (cache.hits["image"], cache.misses["image"]) == (2, 4)  # counts add up
    assert cache.get_all(()) == [] and (cache.hits["image"], cache.misses["image"]) == (2, 4)


def test_only_as_many_of_the_least_recently_used_entries_go_as_needed() -> None:
    cache = ImageEmbeddingCache(max_bytes=3 * 32)  # room for three 32-byte entries
    for name in "abc":
        cache.put(name, embeds(1.0))
    assert cache.get_all(("a",)) is not None  # "a" is now the most recent, "b" the oldest
    cache.put("d", embeds(1.0))
    assert cache.get_all(("b",)) is None
    assert cache.get_all(("a", "c", "d")) is not None
    # an entry twice the size drops the two oldest ("a", then "c"), not more
    cache.put("e", embeds(1.0, rows=4))
    assert cache.get_all(("a",)) is None and cache.get_all(("c",)) is None
    assert cache.get_all(("d", "e")) is not None


def test_the_bound_is_inclusive_and_freed_bytes_are_counted() -> None:
    cache = ImageEmbeddingCache(max_bytes=64)
    cache.put("a", embeds(1.0))
    cache.put("b", embeds(1.0))  # exactly at the bound: both kept
    assert cache.get_all(("a", "b")) is not None
    cache.put("c", embeds(1.0))  # one over: the oldest goes, and its 32 bytes are freed
    assert cache.get_all(("a",)) is None and cache.get_all(("b", "c")) is not None
    cache.put("d", embeds(1.0))
    assert cache.get_all(("b",)) is None and cache.get_all(("c", "d")) is not None


def test_too_large_or_known_entries_are_not_stored() -> None:
    cache = ImageEmbeddingCache(max_bytes=32)
    cache.put("big", embeds(1.0, rows=3))  # 48 bytes: never fits, and must not evict what fits
    assert cache.get_all(("big",)) is None
    cache.put("exact", embeds(1.0))  # 32 bytes: fits exactly
    cache.put("exact", embeds(9.0))  # already cached: the first embeddings stay and are not counted twice
    found = cache.get_all(("exact",))
    assert found is not None and float(found[0][0, 0]) == 1.0
    cache.put("big", embeds(1.0, rows=3))
    assert cache.get_all(("exact",)) is not None
