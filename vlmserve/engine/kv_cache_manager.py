"""The KV-cache lifecycle of every sequence: which blocks it holds, which it found cached, which it makes findable.

    waiting ──lookup──► attached to its longest cached prefix ──allocate_slots──► running
    running ──step completed──► cache_full_blocks (full blocks whose KV is written become findable)
    finished / preempted / aborted / failed ──free──► blocks back to the pool (cached ones stay findable)

A hybrid decoder's sequence also holds a recurrent-state slot (`engine.recurrent_state`) from its first
`allocate_slots` to `free`, and such models run without prefix caching.

The one rule that keeps sharing safe: a block becomes findable only *after* the step that wrote its KV completed.
Nothing then depends on the order in which one step's rows are computed (an eager prefill and a graphed decode of
the same step read only blocks written by earlier steps, and their own), and a failed step leaves nothing half
written in the prefix cache. The price: `n > 1` siblings admitted in the same step as their leader would compute
the prompt twice, so the scheduler admits them after the leader's prompt blocks are cached (`is_waiting_for`).

Block hashes are computed once per sequence, incrementally, as its tokens become known (`Sequence.block_hashes`);
a sequence's tokens only grow, so a preempted sequence keeps its hashes.
"""

from __future__ import annotations

from collections.abc import Callable

from vlmserve.engine.cross_state import CrossKVStore
from vlmserve.engine.kv_cache import BlockHash, BlockPool, extend_block_hashes
from vlmserve.engine.recurrent_state import StateSlots
from vlmserve.engine.request import Sequence
from vlmserve.types import PreparedPrompt


class KVCacheManager:
    """Owns the block pool; the scheduler asks it for slots, the core tells it when a step's KV is written."""

    def __init__(self, num_blocks: int, *, block_size: int, enable_prefix_caching: bool,
                 state_slots: StateSlots | None = None, cross_kv: CrossKVStore | None = None,
                 scope: Callable[[PreparedPrompt], str | None] | None = None) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        #: the model's prefix-cache scope of a prompt (`ModelAdapter.prefix_cache_scope`); None: tokens and images
        self.scope = scope
        #: a hybrid decoder's recurrent-state slots, held with the blocks (one per sequence holding blocks)
        self.state_slots = state_slots
        #: cross-attention K/V of the sequences holding blocks (Mllama; see engine.cross_state), freed with them
        self.cross_kv = cross_kv
        # NOTE: a recurrent state cannot resume from a cached block, so hybrid decoders never look blocks up
        self.enable_prefix_caching = enable_prefix_caching and state_slots is None

    def lookup(self, sequence: Sequence) -> int:
        """Attach a sequence holding no blocks to the longest cached prefix of its tokens; returns the tokens
        looked up. Its computed tokens then start after the cached blocks."""
        assert not sequence.block_ids, "lookup is for a sequence that holds no blocks"
        usable: list[BlockHash] = []
        if self.enable_prefix_caching:
            # Always leave at least one token to compute: its logits give the next token.
            usable = self._full_block_hashes(sequence)[:(sequence.num_tokens - 1) // self.block_size]
        blocks = self.pool.match_prefix(usable)
        sequence.block_ids = blocks
        sequence.num_cached_blocks = len(blocks)
        sequence.num_computed_tokens = len(blocks) * self.block_size
        return len(usable) * self.block_size

    def allocate_slots(self, sequence: Sequence, num_new_tokens: int) -> bool:
        """Blocks for `num_new_tokens` tokens after the computed ones; False, taking nothing, if the pool is short."""
        needed = -(-(sequence.num_computed_tokens + num_new_tokens) // self.block_size) - len(sequence.block_ids)
        took_slot = self._take_state_slot(sequence)
        if took_slot is None:
            return False
        blocks = self.pool.allocate(max(needed, 0))
        if blocks is None:
            if took_slot:
                self._release_state_slot(sequence)
            return False
        sequence.block_ids.extend(blocks)
        return True

    def _take_state_slot(self, sequence: Sequence) -> bool | None:
        """True if a recurrent-state slot was taken for the sequence now, False if none is needed, None if the
        pool has none free."""
        if self.state_slots is None or sequence.state_slot is not None:
            return False
        assert sequence.num_computed_tokens == 0, "a recurrent state starts at token 0"
        sequence.state_slot = self.state_slots.allocate()
        return None if sequence.state_slot is None else True

    def _release_state_slot(self, sequence: Sequence) -> None:
        if self.state_slots is not None and sequence.state_slot is not None:
            self.state_slots.release(sequence.state_slot)
        sequence.state_slot = None

    def cache_full_blocks(self, sequence: Sequence) -> None:
        """Make the full blocks among the sequence's computed tokens findable. Call only once the step that wrote
        their KV has completed."""
        if not self.enable_prefix_caching:
            return
        num_full = sequence.num_computed_tokens // self.block_size
        hashes = self._full_block_hashes(sequence)
        for index in range(sequence.num_cached_blocks, num_full):
            self.pool.register(sequence.block_ids[index], hashes[index])
        sequence.num_cached_blocks = num_full

    def free(self, sequence: Sequence) -> None:
        """Give back every block of the sequence; its progress restarts from nothing (its hashes stay valid)."""
        self.pool.release(sequence.block_ids)
        self._release_state_slot(sequence)
        if self.cross_kv is not None:
            self.cross_kv.release(sequence)
        sequence.block_ids = []
        sequence.num_cached_blocks = 0
        sequence.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    def num_shareable_tokens(self, sequence: Sequence) -> int:
        """Prompt tokens another sequence with the same prompt could find cached once this one computed them."""
        return (sequence.num_prompt_tokens - 1) // self.block_size * self.block_size

    def is_waiting_for(self, sequence: Sequence, running: list[Sequence]) -> bool:
        """Whether `sequence` should stay queued until a running sibling (same prompt object: the `n > 1` fan-out)
        has computed, and so cached, the prompt blocks they can share.
        NOTE: with prefix caching off there is nothing to wait for: each sibling computes its prompt itself."""
        if not self.enable_prefix_caching:
            return False
        shareable = self.num_shareable_tokens(sequence)
        return any(other.request.prompt is sequence.request.prompt and other.num_computed_tokens < shareable
                   and other.request.cache_salt == sequence.request.cache_salt for other in running)

    def _full_block_hashes(self, sequence: Sequence) -> list[BlockHash]:
        """Chained hashes of every full block of the sequence's known tokens, extending those computed before."""
        request = sequence.request
        scope = self.scope(request.prompt) if self.scope is not None else None
        return extend_block_hashes(sequence.block_hashes, sequence.tokens, sequence.num_tokens, request.prompt,
                                   request.cache_salt, self.block_size, sequence.attention_blocks, scope)
