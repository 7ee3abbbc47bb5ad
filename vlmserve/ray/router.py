"""`ImageAwarePrefixRouter`: pick an engine replica by prefix affinity, with images in the key, and least load.

A request's key is the chain of prefix-cache block hashes the engine itself computes (vlmserve.engine.kv_cache):
token ids *and* the content hashes of the images inside each block, salted per API key where the engine salts.
So a multi-turn chat that re-sends its image goes back to the replica holding that image's KV and embeddings,
while a prompt with the same text and another image is free to go anywhere. Ray Serve's own prefix router, and
vLLM's and SGLang's, key on text only.

Affinity yields to load: the replica holding the longest prefix is preferred only while its queue is within
`imbalance_threshold` requests of the least loaded replica; otherwise every replica is ranked equally and Ray
Serve's probing picks the least loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from vlmserve.engine.kv_cache import extend_block_hashes
from vlmserve.types import GenerationRequest

#: block hashes remembered (LRU); at 16 tokens a block, a million blocks cover ~16 M prompt tokens
DEFAULT_MAX_ENTRIES = 1_000_000


def request_block_hashes(request: GenerationRequest, block_size: int) -> list[bytes]:
    """The prefix-cache keys of the request's full prompt blocks, as the engine's KV-cache manager computes them."""
    prompt = request.prompt
    return extend_block_hashes([], lambda start, end: prompt.token_ids[start:end], prompt.num_tokens, prompt,
                               request.cache_salt, block_size)


class AffinityTable:
    """Which replica last took each block hash (bounded, least recently used forgotten first)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._owner: OrderedDict[bytes, str] = OrderedDict()
        self._max = max_entries

    def record(self, hashes: list[bytes], replica: str) -> None:
        for key in hashes:
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self._max:
            self._owner.popitem(last=False)

    def longest_match(self, hashes: list[bytes], replicas: set[str]) -> tuple[str | None, int]:
        """The live replica holding the longest prefix of `hashes`, and how many blocks it holds."""
        for depth in range(len(hashes), 0, -1):
            owner = self._owner.get(hashes[depth - 1])
            if owner in replicas:
                return owner, depth
        return None, 0

    def forget(self, replica: str) -> None:
        for key in [k for k, owner in self._owner.items() if owner == replica]:
            del self._owner[key]


def choose(candidates: list[Any], hashes: list[bytes], table: AffinityTable, queue_len: dict[str, int],
           imbalance_threshold: int) -> list[list[Any]]:
    """Ranks of candidates (each with `.replica_id.unique_id`): the affine replica first when load allows."""
    by_id = {c.replica_id.unique_id: c for c in candidates}
    owner, depth = table.longest_match(hashes, set(by_id))
    if owner is None or depth == 0:
        return [candidates]
    least = min(queue_len.get(key, 0) for key in by_id)
    if queue_len.get(owner, 0) > least + imbalance_threshold:
        return [candidates]
    return [[by_id[owner]], [c for key, c in by_id.items() if key != owner]]


class ImageAwarePrefixRouter(RequestRouter):
    """Ray Serve request router for `EngineReplica` (configured in vlmserve.ray.app)."""

    def initialize_state(self, block_size: int = 16, imbalance_threshold: int = 8,
                         max_entries: int = DEFAULT_MAX_ENTRIES, **_: Any) -> None:
        self._block_size = block_size
        self._imbalance = imbalance_threshold
        self._table = AffinityTable(max_entries)
        self.num_affine = 0  # requests sent to the replica holding their prefix (for tests and logs)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        hashes = self._hashes(pending_request)
        if not hashes:
            return [candidate_replicas]
        loads = {c.replica_id.unique_id: self._replica_queue_len_cache.get(c.replica_id) or 0
                 for c in candidate_replicas}
        ranks = choose(candidate_replicas, hashes, self._table, loads, self._imbalance)
        if len(ranks) > 1:
            self.num_affine += 1
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        hashes = self._hashes(pending_request)
        if hashes:
            self._table.record(hashes, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._table.forget(replica_id.unique_id)

    def _hashes(self, pending_request: PendingRequest | None) -> list[bytes]:
        if pending_request is None or not pending_request.args:
            return []
        request = pending_request.args[0]
        if not isinstance(request, GenerationRequest):
            return []
        return request_block_hashes(request, self._block_size)
