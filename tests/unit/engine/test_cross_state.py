"""The per-sequence cross-attention K/V store (Mllama) on hand-made sequences: it lives and dies with the blocks."""

from __future__ import annotations

import torch

from tests.unit.engine.test_kv_cache_manager import make_sequence
from vlmserve.engine.cross_state import CrossKVStore
from vlmserve.engine.kv_cache_manager import KVCacheManager
from vlmserve.engine.scheduler import Scheduler
from vlmserve.models.cross_attention import CrossKV


def _kv(tokens: int = 8, vision: int = 6) -> CrossKV:
    keys = torch.ones(1, 2, vision, 4)
    return CrossKV(layers={1: (keys, keys.clone())}, visible=torch.ones(tokens, vision, dtype=torch.bool))


def test_preemption_and_finish_free_the_cross_kv() -> None:
    store = CrossKVStore()
    kv = KVCacheManager(5, block_size=4, enable_prefix_caching=False, cross_kv=store)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = make_sequence(list(range(8)), request_id="old"), make_sequence(list(range(20, 28)), request_id="new")
    for sequence in (old, new):
        scheduler.add(sequence)
    step = scheduler.schedule()
    for chunk in step.chunks:  # what the runner does when their prefill starts
        store.put(chunk.sequence, _kv())
        chunk.sequence.num_computed_tokens = chunk.end
        chunk.sequence.output_token_ids.append(1)
    assert len(store) == 2 and store.get(old) is not None and store.nbytes == 2 * (2 * 2 * 6 * 4 * 4 + 8 * 6)
    step = scheduler.schedule()  # each needs a third block: new is preempted, and its K/V go with its blocks
    assert step.preempted == [new]
    assert store.get(new) is None and store.get(old) is not None
    scheduler.finish(old)  # finished or aborted
    assert len(store) == 0 and store.nbytes == 0


def test_row_masks_repeat_the_last_prompt_row_and_open_rows_that_see_nothing() -> None:
    visible = torch.tensor([[False, False, False], [True, False, False], [True, True, False]])
    kv = CrossKV(layers={}, visible=visible)
    mask, row = kv.row_masks(torch.tensor([0, 1, 2, 5]), torch.float32)
    low = torch.finfo(torch.float32).min
    assert row.flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert mask[0, 0, 0].tolist() == [0.0, 0.0, 0.0]  # a row seeing no tile attends all of them evenly
    assert mask[0, 0, 1].tolist() == [0.0, low, low]
    assert mask[0, 0, 3].tolist() == mask[0, 0, 2].tolist() == [0.0, 0.0, low]  # generated: the prompt's last row
