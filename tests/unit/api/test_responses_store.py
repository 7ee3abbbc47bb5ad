"""The memory response store: bounded by entries, bytes and age; least recently used goes first."""

from __future__ import annotations

from vlmserve.api.responses_store import MemoryResponseStore, StoredResponse


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def entry(text: str = "x") -> StoredResponse:
    return StoredResponse(response={"status": "completed"}, conversation=[{"role": "user", "content": text}])


def test_least_recently_used_is_evicted_beyond_max_entries() -> None:
    store = MemoryResponseStore(max_entries=2, max_bytes=10**6, ttl_s=60)
    store.put("a", entry())
    store.put("b", entry())
    assert store.get("a") is not None  # a is now the most recently used
    store.put("c", entry())
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert len(store) == 2


def test_bytes_bound_evicts_and_refuses_what_cannot_fit() -> None:
    one = len('[{"status": "completed"}, [{"role": "user", "content": "' + "x" * 100 + '"}]]')
    store = MemoryResponseStore(max_entries=100, max_bytes=2 * one, ttl_s=60)
    for name in "abc":
        store.put(name, entry("x" * 100))
    assert store.get("a") is None and store.get("b") is not None and store.get("c") is not None
    store.put("huge", entry("x" * 10 * one))
    assert store.get("huge") is None and len(store) == 2


def test_entries_expire_after_the_ttl_and_delete_reports_presence() -> None:
    clock = Clock()
    store = MemoryResponseStore(max_entries=10, max_bytes=10**6, ttl_s=5, clock=clock)
    store.put("a", entry())
    clock.now = 4.9
    assert store.get("a") is not None
    clock.now = 10.0
    assert store.get("a") is None and len(store) == 0
    store.put("b", entry())
    assert store.delete("b") is True and store.delete("b") is False


def test_zero_entries_keeps_nothing() -> None:
    store = MemoryResponseStore(max_entries=0, max_bytes=10**6, ttl_s=5)
    store.put("a", entry())
    assert store.get("a") is None
