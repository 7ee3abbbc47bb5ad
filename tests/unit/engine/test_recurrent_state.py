"""The recurrent-state slot pool and a step's view of it (no model): slots follow the sequence's blocks, a fresh
sequence starts from zeros, a step's states land in the pool only on commit, and a step that does not resume where
its slot stopped is refused."""

from __future__ import annotations

import pytest
import torch

from tests.unit.engine.test_kv_cache_manager import make_sequence
from vlmserve.engine.kv_cache_manager import KVCacheManager
from vlmserve.engine.recurrent_state import RecurrentStates, RecurrentStep, StateSlots
from vlmserve.models.base import RecurrentLayout

LAYOUT = RecurrentLayout(layers=(0, 2), conv_shape=(3, 2), state_shape=(2, 2, 2))


def test_a_sequence_holds_a_slot_with_its_blocks_and_gives_both_back() -> None:
    slots = StateSlots(2)
    kv = KVCacheManager(4, block_size=4, enable_prefix_caching=True, state_slots=slots)
    assert not kv.enable_prefix_caching  # a cached block carries no recurrent state
    first, second, third = (make_sequence([1, 2, 3, 4, 5], request_id=r) for r in "abc")
    assert kv.allocate_slots(first, 5) and first.state_slot is not None
    assert kv.allocate_slots(second, 5) and second.state_slot not in (None, first.state_slot)
    assert not kv.allocate_slots(third, 1) and third.state_slot is None  # no slot left: nothing taken
    assert kv.pool.num_free == 0
    kv.free(first)
    assert first.state_slot is None and slots.num_free == 1
    assert kv.allocate_slots(third, 4) and third.state_slot is not None


def test_no_blocks_means_no_slot_either() -> None:
    slots = StateSlots(2)
    kv = KVCacheManager(1, block_size=4, enable_prefix_caching=False, state_slots=slots)
    sequence = make_sequence(list(range(9)))
    assert not kv.allocate_slots(sequence, 9)  # 3 blocks needed, 1 in the pool
    assert sequence.state_slot is None and slots.num_free == 2


def _pool() -> RecurrentStates:
    states = RecurrentStates.allocate(LAYOUT, 3, dtype=torch.float32, device=torch.device("cpu"))
    for layer in LAYOUT.layers:
        states.conv[layer].fill_(7.0)
        states.state[layer].fill_(5.0)
    states.num_tokens[:] = [4, 4, 4]
    return states


def test_a_step_reads_its_slots_zeros_for_fresh_sequences_and_writes_only_on_commit() -> None:
    states = _pool()
    step = RecurrentStep(states, slots=[2, 0], segments=[(0, 1), (1, 4)], is_fresh=[False, True], ends=[5, 3])
    step.check([4, 0])
    like_conv, like_state = torch.empty(0, 3, 2), torch.empty(0, 2, 2, 2)
    conv, state = step.gather(2, like_conv, like_state)
    assert conv[0].eq(7).all() and state[0].eq(5).all()
    assert conv[1].eq(0).all() and state[1].eq(0).all()
    step.stage(2, conv + 1, state + 1)
    assert states.conv[2][2].eq(7).all() and states.num_tokens == [4, 4, 4]  # nothing written before commit
    step.commit()
    assert states.conv[2][2].eq(8).all() and states.conv[2][0].eq(1).all() and states.state[2][0].eq(1).all()
    assert states.conv[0][2].eq(7).all()  # a layer the step did not stage is untouched
    assert states.num_tokens == [3, 4, 5]


def test_a_step_that_does_not_resume_where_its_slot_stopped_is_refused() -> None:
    step = RecurrentStep(_pool(), slots=[1], segments=[(0, 1)], is_fresh=[False], ends=[7])
    with pytest.raises(RuntimeError, match="slot 1 has seen 4 tokens but the step resumes at token 6"):
        step.check([6])


def test_the_scratch_step_starts_every_sequence_from_zeros_and_keeps_nothing() -> None:
    step = RecurrentStep.scratch([0, 3, 5])
    assert step.segments == [(0, 3), (3, 5)]
    conv, state = step.gather(0, torch.empty(0, 3, 2), torch.empty(0, 2, 2, 2))
    assert conv.shape == (2, 3, 2) and not conv.any() and not state.any()
    step.stage(0, conv + 1, state + 1)
    step.commit()  # no pool: a no-op


def test_the_pool_keeps_conv_contexts_in_the_model_dtype_and_states_in_float32_from_token_zero() -> None:
    states = RecurrentStates.allocate(LAYOUT, 3, dtype=torch.bfloat16, device=torch.device("cpu"))
    for layer in LAYOUT.layers:
        assert states.conv[layer].dtype == torch.bfloat16 and states.conv[layer].shape == (3, 3, 2)
        assert states.state[layer].dtype == torch.float32 and states.state[layer].shape == (3, 2, 2, 2)
    assert states.num_tokens == [0, 0, 0]
    assert StateSlots(3).num_slots == 3


def test_the_scratch_step_gives_zero_states_of_the_layers_shape() -> None:
    step = RecurrentStep.scratch([0, 3, 5, 6])
    conv, state = step.gather(0, torch.empty(0, 3, 2), torch.empty(0, 2, 2, 2))
    assert conv.shape == (3, 3, 2) and state.shape == (3, 2, 2, 2)


def test_a_commit_without_a_gather_writes_only_the_steps_slots() -> None:
    # a step whose layers staged states without reading the pool (every sequence fresh) still writes by slot
    states = _pool()
    step = RecurrentStep(states, slots=[1], segments=[(0, 2)], is_fresh=[True], ends=[2])
    step.stage(0, torch.full((1, 3, 2), 3.0), torch.full((1, 2, 2, 2), 4.0))
    step.commit()
    assert states.conv[0][1].eq(3).all() and states.state[0][1].eq(4).all()
    assert states.conv[0][0].eq(7).all() and states.conv[0][2].eq(7).all() and states.state[0][2].eq(5).all()
    assert states.num_tokens == [4, 2, 4]


def test_a_running_sequence_keeps_its_slot_when_its_next_blocks_do_not_fit() -> None:
    slots = StateSlots(2)
    kv = KVCacheManager(2, block_size=4, enable_prefix_caching=False, state_slots=slots)
    sequence = make_sequence(list(range(8)))
    assert kv.allocate_slots(sequence, 8)
    slot = sequence.state_slot
    sequence.num_computed_tokens = 8
    assert not kv.allocate_slots(sequence, 1)  # a third block: the pool is empty
    assert sequence.state_slot == slot and slots.num_free == 1


def test_a_sequence_is_refused_when_slots_run_out_even_with_blocks_free() -> None:
    slots = StateSlots(1)
    kv = KVCacheManager(8, block_size=4, enable_prefix_caching=False, state_slots=slots)
    first, second = make_sequence([1, 2], request_id="a"), make_sequence([1, 2], request_id="b")
    assert kv.allocate_slots(first, 2)
    assert not kv.allocate_slots(second, 2)
    assert second.state_slot is None and not second.block_ids and kv.pool.num_free == 7


def test_freeing_a_sequence_that_never_held_a_slot_gives_nothing_to_the_pool() -> None:
    slots = StateSlots(1)
    kv = KVCacheManager(8, block_size=4, enable_prefix_caching=False, state_slots=slots)
    waiting = make_sequence([1, 2])  # aborted before it was ever scheduled
    kv.free(waiting)
    assert slots.num_free == 1 and slots.allocate() == 0 and slots.allocate() is None
