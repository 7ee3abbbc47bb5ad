"""The paged KV cache: a pool of fixed-size blocks, their tensors, and the prefix cache over them.

A block's prefix-cache key chains the key of the block before it with the block's token ids *and* the content
hashes of every image whose placeholder tokens fall inside it. Two prompts with the same text and different
images therefore never share the blocks holding (or following) the images, while a conversation that re-sends
the same image shares them. Keys are BLAKE2b digests, not Python's `hash`: a client must not be able to craft a
collision with someone else's prefix.

The chain starts from a root derived from the request's `cache_salt`, so requests with different salts never share
a block. Blocks whose last user left keep their KV and stay findable (least recently used first to be reused) until
the pool needs them. When a block becomes findable is `kv_cache_manager`'s business: only after its KV was written.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from vlmserve.models.base import KVLayout
from vlmserve.types import ImageSpan, PreparedPrompt

BlockHash = bytes


def root_hash(cache_salt: str | None, scope: str | None = None) -> BlockHash:
    """The parent of a sequence's first block: the salt keeps differently salted requests in disjoint chains, and
    so does the model's scope of the prompt (`ModelAdapter.prefix_cache_scope`: KV that depends on more than the
    tokens and images, such as a rotary base chosen by the prompt's length)."""
    root = b"root" if cache_salt is None else hashlib.blake2b(b"salt" + cache_salt.encode(), digest_size=16).digest()
    if scope is None:
        return root
    return hashlib.blake2b(root + b"scope" + scope.encode(), digest_size=16).digest()


def hash_block(parent: BlockHash, token_ids: Seq[int], image_hashes: Seq[str],
               lookahead_ids: Seq[int] = ()) -> BlockHash:
    """`lookahead_ids`: the tokens after the block that its KV depends on (the rest of a bidirectional block)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent)
    digest.update(b"t" + ",".join(map(str, token_ids)).encode())
    for image in image_hashes:
        digest.update(b"i" + image.encode())
    if lookahead_ids:
        digest.update(b"a" + ",".join(map(str, lookahead_ids)).encode())
    return digest.digest()


def extend_block_hashes(hashes: list[BlockHash], tokens: Callable[[int, int], Seq[int]], num_tokens: int,
                        prompt: PreparedPrompt, cache_salt: str | None, block_size: int,
                        attention_blocks: Seq[tuple[int, int]] = (), scope: str | None = None) -> list[BlockHash]:
    """Extend `hashes`, the chain of a token sequence's full blocks so far, over the full blocks of its first
    `num_tokens` tokens (`tokens(start, end)` reads them); images and videos come from `prompt`'s spans (a video's
    hash covers its frames' pixels and timestamps). Returns `hashes`.

    A KV block inside a bidirectional attention block (`attention_blocks`) depends on that block's later tokens
    too: its key also covers them (and their images), so it is shared only where the whole block is the same.
    The one definition of a block's prefix-cache key: the KV-cache manager and the Ray router both use it.
    """
    parent = hashes[-1] if hashes else root_hash(cache_salt, scope)
    for start in range(len(hashes) * block_size, num_tokens - block_size + 1, block_size):
        end = start + block_size
        reach = max((hi for lo, hi in attention_blocks if lo < end < hi), default=end)
        images = images_in_range(prompt.image_spans, prompt.image_hashes, start, reach)
        images += images_in_range(prompt.video_spans, prompt.video_hashes, start, reach)
        parent = hash_block(parent, tokens(start, end), images, tokens(end, reach) if reach > end else ())
        hashes.append(parent)
    return hashes


def images_in_range(spans: Seq[ImageSpan], image_hashes: Seq[str], start: int, end: int) -> list[str]:
    """Hashes of the images whose tokens intersect [start, end); a span with index -1 stands for all images."""
    found: list[str] = []
    for span in spans:
        if span.start < end and start < span.end:
            found.extend(image_hashes if span.index < 0 else [image_hashes[span.index]])
    return found


class BlockPool:
    """Allocation, reference counts and the prefix cache's hash ↔ block maps. Whether and when blocks are cached
    is the `KVCacheManager`'s decision: the pool registers what it is told to (a freshly allocated block never has a
    hash), and finds only what was registered."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, holding nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, cached content, LRU first
        self._by_hash: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self.num_queries = 0  # tokens looked up
        self.num_hits = 0  # tokens found

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks (reference count 1), or None when the pool cannot provide them."""
        if count > self.num_free:
            return None
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, block_ids: Seq[int]) -> None:
        # Later blocks of a sequence are less likely to be shared: make them the first to be evicted.
        for block in reversed(block_ids):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def match_prefix(self, hashes: Seq[BlockHash]) -> list[int]:
        """Take a reference on the longest run of cached blocks matching `hashes` from the start."""
        blocks: list[int] = []
        for block_hash in hashes:
            block = self._by_hash.get(block_hash)
            if block is None:
                break
            if self._ref_counts[block] == 0:  # cached and unreferenced: it was waiting for eviction
                del self._evictable[block]
            self._ref_counts[block] += 1
            blocks.append(block)
        return blocks

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count one admitted sequence's prefix lookup (for the hit rate)."""
        self.num_queries += queried_tokens
        self.num_hits += hit_tokens

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def register(self, block: int, block_hash: BlockHash) -> None:
        """Make a full block findable by its hash (first writer wins when two blocks hold the same content)."""
        if block_hash not in self._by_hash:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash

    def reset_prefix_cache(self) -> None:
        """Forget every cached block; blocks in use stay with their sequences."""
        for block in list(self._evictable):
            self._free.append(block)
        self._evictable.clear()
        self._by_hash.clear()
        self._hash_of.clear()


@dataclass
class KVCache:
    """Per-layer key and value tensors, each [num_blocks, block_size, num_kv_heads, head_dim] ([0, ...] for a
    layer that keeps no KV)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(cls, layout: KVLayout, num_blocks: int, block_size: int, *, dtype: torch.dtype,
                 device: torch.device) -> KVCache:
        def layer_cache(layer: int) -> torch.Tensor:
            # a layer without KV (a hybrid decoder's recurrent layer) gets an empty tensor: indices stay layer ids
            blocks = num_blocks if layout.has_kv(layer) else 0
            return torch.zeros((blocks, block_size, layout.num_kv_heads, layout.head_dim), dtype=dtype, device=device)

        keys = [layer_cache(layer) for layer in range(layout.num_layers)]
        values = [layer_cache(layer) for layer in range(layout.num_layers)]
        return cls(keys=keys, values=values, block_size=block_size)

    @staticmethod
    def bytes_per_block(layout: KVLayout, block_size: int, dtype: torch.dtype) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        return 2 * layout.num_kv_layers * block_size * layout.num_kv_heads * layout.head_dim * element
