"""Where `store: true` responses live, for `previous_response_id`, GET and DELETE.

`ResponseStore` is the interface (a Redis or SQL one can replace the memory store without touching the service);
`MemoryResponseStore` is bounded three ways, all from flags: entries (`--responses-store-max-entries`), bytes
(`--responses-store-max-bytes`, counted as the JSON size of what is kept) and age (`--responses-store-ttl-s`).
The least recently used entry goes first; an expired one is gone when next looked at.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class StoredResponse:
    """A response object (as sent) and the conversation that continues from it (chat messages, answer included)."""

    response: dict[str, Any]
    conversation: list[dict[str, Any]]
    stored_at: float = field(default_factory=time.monotonic)
    num_bytes: int = 0


class ResponseStore(Protocol):
    def get(self, response_id: str) -> StoredResponse | None: ...

    def put(self, response_id: str, entry: StoredResponse) -> None: ...

    def delete(self, response_id: str) -> bool: ...


class MemoryResponseStore:
    """An in-process LRU of responses, bounded by entries, bytes and age."""

    def __init__(self, *, max_entries: int, max_bytes: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._num_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        if self._clock() - entry.stored_at > self._ttl_s:
            self.delete(response_id)
            return None
        self._entries.move_to_end(response_id)
        return entry

    def put(self, response_id: str, entry: StoredResponse) -> None:
        self.delete(response_id)
        entry.stored_at = self._clock()
        entry.num_bytes = len(json.dumps([entry.response, entry.conversation], default=str))
        if entry.num_bytes > self._max_bytes or self._max_entries < 1:
            return  # NOTE: larger than the whole store: not kept (a later previous_response_id gets a 404)
        self._entries[response_id] = entry
        self._num_bytes += entry.num_bytes
        while len(self._entries) > self._max_entries or self._num_bytes > self._max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._num_bytes -= evicted.num_bytes

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self._num_bytes -= entry.num_bytes
        return True
