"""The KV-cache manager and block pool on hand-made sequences (no model): what is shared, when, and with whom."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vlmserve.engine import kv_cache
from vlmserve.engine.kv_cache import KVCache, images_in_range, root_hash
from vlmserve.engine.kv_cache_manager import KVCacheManager
from vlmserve.engine.request import Sequence, SequenceStatus
from vlmserve.engine.scheduler import Scheduler
from vlmserve.models.base import KVLayout
from vlmserve.types import GenerationRequest, ImageSpan, PreparedPrompt, SamplingParams

BS = 4  # block size


def make_sequence(tokens: list[int], *, images: tuple[str, ...] = (), spans: tuple[ImageSpan, ...] = (),
                  salt: str | None = None, prompt: PreparedPrompt | None = None, request_id: str = "r") -> Sequence:
    prompt = prompt or PreparedPrompt(token_ids=tokens, image_hashes=images, image_spans=spans)
    request = GenerationRequest(request_id=request_id, prompt=prompt, sampling=SamplingParams(max_tokens=4),
                                cache_salt=salt)
    return Sequence(request=request, sampling=None)  # type: ignore[arg-type]  # the manager never samples


def manager(num_blocks: int = 16, *, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size=BS, enable_prefix_caching=caching)


def compute(kv: KVCacheManager, sequence: Sequence, num_tokens: int | None = None) -> None:
    """Admit `sequence` and run it as one completed step over `num_tokens` (default: all) of its tokens."""
    kv.lookup(sequence)
    count = (num_tokens or sequence.num_tokens) - sequence.num_computed_tokens
    assert kv.allocate_slots(sequence, count)
    sequence.num_computed_tokens += count
    kv.cache_full_blocks(sequence)


def test_lookup_finds_full_blocks_cached_after_their_step_and_always_leaves_a_token() -> None:
    kv = manager()
    first = make_sequence(list(range(12)))  # exactly three blocks
    assert kv.lookup(first) == 8 and first.block_ids == [] and first.num_computed_tokens == 0
    assert kv.allocate_slots(first, 12) and len(first.block_ids) == 3
    second = make_sequence(list(range(12)), request_id="s")
    assert kv.lookup(second) == 8 and second.block_ids == []  # nothing is findable before the step completed
    first.num_computed_tokens = 12
    kv.cache_full_blocks(first)
    kv.free(second)
    kv.lookup(second)
    # The third block is cached too, but the last token must be computed again for its logits.
    assert second.block_ids == first.block_ids[:2] and second.num_computed_tokens == 8
    assert [kv.pool.ref_count(b) for b in first.block_ids] == [2, 2, 1]


def test_only_the_computed_full_blocks_are_cached() -> None:
    kv = manager()
    first = make_sequence(list(range(14)))
    kv.lookup(first)
    assert kv.allocate_slots(first, 14)
    first.num_computed_tokens = 7  # one full block and three tokens of the second
    kv.cache_full_blocks(first)
    assert [kv.pool.is_cached(b) for b in first.block_ids] == [True, False, False, False]
    assert first.num_cached_blocks == 1
    first.num_computed_tokens = 14
    kv.cache_full_blocks(first)
    assert [kv.pool.is_cached(b) for b in first.block_ids] == [True, True, True, False]
    later = make_sequence(list(range(14)), request_id="later")
    kv.lookup(later)
    assert later.block_ids == first.block_ids[:3] and later.num_cached_blocks == 3


def test_nothing_is_cached_when_prefix_caching_is_off() -> None:
    kv = manager(caching=False)
    first = make_sequence(list(range(9)))
    compute(kv, first)
    assert first.block_hashes == [] and kv.pool.num_cached == 0
    second = make_sequence(list(range(9)), request_id="s")
    assert kv.lookup(second) == 0 and second.block_ids == []


def test_allocate_slots_counts_blocks_and_takes_nothing_when_short() -> None:
    kv = manager(4)
    sequence = make_sequence(list(range(30)))
    kv.lookup(sequence)
    assert kv.allocate_slots(sequence, 5) and len(sequence.block_ids) == 2
    assert kv.allocate_slots(sequence, 8) and len(sequence.block_ids) == 2  # still within the two blocks
    assert not kv.allocate_slots(sequence, 17)  # needs five in all: three more, one is left
    assert len(sequence.block_ids) == 2 and kv.pool.num_free == 2
    assert kv.allocate_slots(sequence, 16) and len(sequence.block_ids) == 4 and kv.pool.num_free == 0
    sequence.num_computed_tokens = 16
    assert kv.allocate_slots(sequence, 0) and not kv.allocate_slots(sequence, 1)


def test_free_returns_blocks_and_keeps_cached_ones_findable() -> None:
    kv = manager(8)
    first = make_sequence(list(range(10)))
    compute(kv, first)
    blocks = list(first.block_ids)
    kv.free(first)
    assert first.block_ids == [] and first.num_computed_tokens == 0 and first.num_cached_blocks == 0
    assert len(first.block_hashes) == 2  # the hashes stay valid: the tokens did not change
    assert kv.pool.num_free == 8 and all(kv.pool.ref_count(b) == 0 for b in blocks)
    again = make_sequence(list(range(10)), request_id="again")
    kv.lookup(again)
    assert again.block_ids == blocks[:2] and kv.pool.num_free == 6


def test_eviction_takes_the_least_recently_freed_block_and_forgets_it() -> None:
    kv = manager(3)
    first = make_sequence(list(range(9)))  # three blocks, two of them full
    compute(kv, first)
    kv.free(first)
    hungry = make_sequence(list(range(100, 109)), request_id="hungry")
    kv.lookup(hungry)
    assert kv.allocate_slots(hungry, 2)  # takes the uncached block first
    assert kv.pool.num_cached == 2
    assert kv.allocate_slots(hungry, 9)  # now two more: both cached blocks are evicted and forgotten
    assert kv.pool.num_cached == 0
    kv.free(hungry)
    again = make_sequence(list(range(9)), request_id="again")
    kv.lookup(again)
    assert again.block_ids == []


def test_later_blocks_of_a_freed_sequence_are_evicted_first() -> None:
    kv = manager(3)
    first = make_sequence(list(range(13)))  # three full blocks
    compute(kv, first, 12)
    kv.free(first)
    other = make_sequence(list(range(50, 55)), request_id="other")
    kv.lookup(other)
    assert kv.allocate_slots(other, 1)
    again = make_sequence(list(range(13)), request_id="again")
    kv.lookup(again)
    assert again.num_computed_tokens == 8  # the first two blocks survived; the last one went


def test_different_salts_never_share_and_the_same_salt_does() -> None:
    kv = manager()
    compute(kv, make_sequence(list(range(12)), salt="key-a"))
    assert kv.lookup(make_sequence(list(range(12)), salt="key-b", request_id="b")) == 8
    for salt, expected in ((None, 0), ("key-b", 0), ("key-a", 8)):
        probe = make_sequence(list(range(12)), salt=salt, request_id=f"probe-{salt}")
        kv.lookup(probe)
        assert probe.num_computed_tokens == expected, salt
    assert root_hash(None) != root_hash("") != root_hash("key-a")


def test_prompts_of_different_model_scopes_never_share() -> None:
    """The model's scope of a prompt (a rotary base chosen by its length) splits the chains like a salt does."""
    kv = KVCacheManager(16, block_size=BS, enable_prefix_caching=True,
                        scope=lambda prompt: "long" if prompt.num_tokens > 12 else None)
    compute(kv, make_sequence(list(range(12))))
    longer = make_sequence(list(range(16)), request_id="longer")  # same first 12 tokens, another scope
    kv.lookup(longer)
    assert longer.num_computed_tokens == 0
    same = make_sequence(list(range(12)), request_id="same")
    kv.lookup(same)
    assert same.num_computed_tokens == 8
    assert root_hash(None, "long") not in (root_hash(None), root_hash("long"), root_hash("long", "long"))


def two_image_prompt(second_image: str) -> tuple[list[int], tuple[str, ...], tuple[ImageSpan, ...]]:
    tokens = [1, 2, 9, 9, 9, 3, 4, 5, 6, 7, 9, 9, 9, 8, 8, 8, 8, 8, 8, 8]
    spans = (ImageSpan(2, 5, 0), ImageSpan(10, 13, 1))
    return tokens, ("image-a", second_image), spans


def test_a_prompt_differing_only_in_its_second_image_shares_exactly_the_blocks_before_it() -> None:
    kv = manager()
    compute(kv, make_sequence(*two_image_prompt("image-b")[:1], images=two_image_prompt("image-b")[1],
                              spans=two_image_prompt("image-b")[2]))
    tokens, images, spans = two_image_prompt("image-c")
    probe = make_sequence(tokens, images=images, spans=spans, request_id="probe")
    kv.lookup(probe)
    assert probe.num_computed_tokens == 8  # blocks [0, 4) and [4, 8); the second image starts in [8, 12)
    same = make_sequence(*two_image_prompt("image-b")[:1], images=two_image_prompt("image-b")[1],
                         spans=two_image_prompt("image-b")[2], request_id="same")
    kv.lookup(same)
    assert same.num_computed_tokens == 16  # everything but the block holding the last token


def test_images_in_range_takes_the_images_whose_tokens_meet_the_range() -> None:
    spans = (ImageSpan(2, 5, 0), ImageSpan(10, 13, 1))
    hashes = ("a", "b")
    assert images_in_range(spans, hashes, 0, 2) == []
    assert images_in_range(spans, hashes, 0, 3) == ["a"]
    assert images_in_range(spans, hashes, 4, 11) == ["a", "b"]
    assert images_in_range(spans, hashes, 5, 10) == []
    assert images_in_range(spans, hashes, 12, 16) == ["b"]
    assert images_in_range((ImageSpan(3, 6, -1),), hashes, 5, 8) == ["a", "b"]  # one run for all images


def test_block_hashes_are_computed_once_and_extend_as_tokens_arrive(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real = kv_cache.hash_block

    def counting(*args: Any) -> bytes:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr("vlmserve.engine.kv_cache.hash_block", counting)
    kv = manager()
    sequence = make_sequence(list(range(6)))
    compute(kv, sequence)
    assert len(calls) == 1 and len(sequence.block_hashes) == 1
    first = sequence.block_hashes[0]
    sequence.output_token_ids += [40, 41]  # the second block fills with generated tokens
    assert kv.allocate_slots(sequence, 2)
    sequence.num_computed_tokens = 8
    kv.cache_full_blocks(sequence)
    assert len(calls) == 2 and sequence.block_hashes[0] == first and len(sequence.block_hashes) == 2
    assert calls[1][1] == [4, 5, 40, 41]  # prompt and generated tokens in one block
    kv.free(sequence)  # preempted: the hashes stay, so re-admission hashes nothing again
    kv.lookup(sequence)
    assert len(calls) == 2 and sequence.num_computed_tokens == 4


def test_a_generated_block_is_found_by_a_prompt_holding_the_same_tokens() -> None:
    kv = manager()
    sequence = make_sequence(list(range(6)))
    compute(kv, sequence)
    sequence.output_token_ids += [40, 41, 42]
    assert kv.allocate_slots(sequence, 3)
    sequence.num_computed_tokens = 9
    kv.cache_full_blocks(sequence)
    follow_up = make_sequence([*range(6), 40, 41, 42, 43], request_id="follow-up")
    kv.lookup(follow_up)
    assert follow_up.block_ids == sequence.block_ids[:2]


def test_reset_forgets_cached_blocks_but_not_blocks_in_use() -> None:
    kv = manager(8)
    idle = make_sequence(list(range(5)))
    compute(kv, idle)
    kv.free(idle)
    busy = make_sequence(list(range(20, 29)), request_id="busy")
    compute(kv, busy)
    kv.reset_prefix_cache()
    assert kv.pool.num_cached == 0 and kv.pool.num_free == 8 - len(busy.block_ids)
    assert all(kv.pool.ref_count(b) == 1 for b in busy.block_ids)
    kv.free(busy)
    assert kv.pool.num_free == 8
    assert sorted(kv.pool.allocate(8) or []) == list(range(8))  # every block is usable again, each once


def test_after_a_reset_only_blocks_completed_later_are_cached_again() -> None:
    kv = manager(8)
    sequence = make_sequence(list(range(9)))
    compute(kv, sequence, 5)  # block 0 cached
    kv.reset_prefix_cache()
    assert kv.allocate_slots(sequence, 4)
    sequence.num_computed_tokens = 9
    kv.cache_full_blocks(sequence)  # block 1 completes now; block 0 was forgotten and stays so
    assert [kv.pool.is_cached(b) for b in sequence.block_ids] == [False, True, False]


def test_first_writer_wins_when_two_blocks_hold_the_same_content() -> None:
    kv = manager()
    one, two = make_sequence(list(range(9)), request_id="one"), make_sequence(list(range(9)), request_id="two")
    for sequence in (one, two):  # admitted in the same step: neither finds the other's blocks
        kv.lookup(sequence)
        assert kv.allocate_slots(sequence, 9)
    for sequence in (one, two):
        sequence.num_computed_tokens = 9
        kv.cache_full_blocks(sequence)
    assert [kv.pool.is_cached(b) for b in one.block_ids] == [True, True, False]
    assert not any(kv.pool.is_cached(b) for b in two.block_ids)
    kv.free(two)
    assert kv.pool.num_free == 16 - 3  # two's blocks went straight back: nobody can find them


def test_a_sibling_waits_while_its_leader_computes_the_shared_prompt_blocks() -> None:
    kv = manager()
    prompt = PreparedPrompt(token_ids=list(range(10)))
    leader = make_sequence([], prompt=prompt, request_id="x-0")
    sibling = make_sequence([], prompt=prompt, request_id="x-1")
    stranger = make_sequence(list(range(10)), request_id="y")  # same tokens, another prompt object
    assert kv.num_shareable_tokens(sibling) == 8
    # The last prompt token is always computed, so a prompt ending on a block boundary shares one block less.
    assert [kv.num_shareable_tokens(make_sequence(list(range(n)))) for n in (8, 9)] == [4, 8]
    assert not kv.is_waiting_for(sibling, [])
    leader.num_computed_tokens = 7
    assert kv.is_waiting_for(sibling, [stranger, leader]) and not kv.is_waiting_for(stranger, [leader])
    leader.num_computed_tokens = 8
    assert not kv.is_waiting_for(sibling, [leader])
    salted = make_sequence([], prompt=prompt, salt="other", request_id="z")
    leader.num_computed_tokens = 0
    assert not kv.is_waiting_for(salted, [leader])
    assert not manager(caching=False).is_waiting_for(sibling, [leader])


def test_scheduler_admits_siblings_after_their_leader_and_they_share_its_blocks() -> None:
    kv = manager(32)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = PreparedPrompt(token_ids=list(range(10)))
    leader, sibling = (make_sequence([], prompt=prompt, request_id=f"x-{i}") for i in range(2))
    other = make_sequence(list(range(100, 103)), request_id="other")
    for sequence in (leader, sibling, other):
        scheduler.add(sequence)
    first = scheduler.schedule()
    assert [c.sequence.request_id for c in first.chunks] == ["x-0", "other"]
    assert list(scheduler.waiting) == [sibling]
    for chunk in first.chunks:  # the step completed
        chunk.sequence.num_computed_tokens = chunk.end
        kv.cache_full_blocks(chunk.sequence)
        chunk.sequence.output_token_ids.append(7)
    second = scheduler.schedule()
    assert [(c.sequence.request_id, c.start, c.num_tokens) for c in second.chunks] == [
        ("x-0", 10, 1), ("other", 3, 1), ("x-1", 8, 2)]
    assert sibling.block_ids[:2] == leader.block_ids[:2] and sibling.block_ids[2] != leader.block_ids[2]
    assert [kv.pool.ref_count(b) for b in leader.block_ids] == [2, 2, 1]
    assert sibling.num_cached_tokens == 8
    scheduler.finish(leader)
    assert [kv.pool.ref_count(b) for b in sibling.block_ids] == [1, 1, 1]
    scheduler.finish(sibling)
    scheduler.finish(other)
    assert kv.pool.num_free == 32 and leader.status is SequenceStatus.FINISHED


def test_preemption_frees_the_newest_and_it_comes_back_on_its_cached_blocks() -> None:
    kv = manager(5)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = make_sequence(list(range(8)), request_id="old"), make_sequence(list(range(20, 28)), request_id="new")
    scheduler.add(old)
    scheduler.add(new)
    step = scheduler.schedule()
    assert len(step.chunks) == 2 and kv.pool.num_free == 1
    for chunk in step.chunks:
        chunk.sequence.num_computed_tokens = chunk.end
        kv.cache_full_blocks(chunk.sequence)
        chunk.sequence.output_token_ids.append(1)
    step = scheduler.schedule()  # each needs a third block; the one free goes to old, and new is preempted
    assert [c.sequence.request_id for c in step.chunks] == ["old"] and step.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.block_ids == [] and new.num_preemptions == 1
    assert scheduler.num_preemptions == 1 and list(scheduler.waiting) == [new]
    scheduler.finish(old)
    step = scheduler.schedule()
    assert [(c.sequence.request_id, c.start, c.num_tokens) for c in step.chunks] == [("new", 8, 1)]
    assert new.num_cached_tokens == 0  # what a client sees counts the first admission only


def test_admissions_count_the_tokens_looked_up_and_found() -> None:
    kv = manager(32)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    for request_id, tokens in (("a", list(range(10))), ("b", list(range(10))), ("c", list(range(13)))):
        sequence = make_sequence(tokens, request_id=request_id)
        scheduler.add(sequence)
        (chunk,) = scheduler.schedule().chunks
        sequence.num_computed_tokens = chunk.end
        kv.cache_full_blocks(sequence)
        scheduler.finish(sequence)
    # a: looks up 8, finds 0; b: 8 and 8; c: 12 and 8 (its third block holds tokens a and b never had)
    assert (kv.pool.num_queries, kv.pool.num_hits) == (28, 16)


def test_kv_cache_tensors_and_their_size_per_block() -> None:
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8)
    cache = KVCache.allocate(layout, 5, 4, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert len(cache.keys) == len(cache.values) == 3 and cache.block_size == 4
    assert all(t.shape == (5, 4, 2, 8) and t.dtype == torch.bfloat16 and not t.any() for t in cache.keys + cache.values)
    total = sum(t.nbytes for t in cache.keys + cache.values)
    assert KVCache.bytes_per_block(layout, 4, torch.bfloat16) * 5 == total
    elsewhere = KVCache.allocate(layout, 2, 4, dtype=torch.float32, device=torch.device("meta"))
    assert {t.device.type for t in elsewhere.keys + elsewhere.values} == {"meta"}


def test_a_block_filled_by_generated_tokens_is_hashed_once_it_is_full() -> None:
    kv = manager()
    sequence = make_sequence(list(range(7)))  # the second block is three tokens short of full: no hash yet
    compute(kv, sequence)
    assert len(sequence.block_hashes) == 1
    sequence.output_token_ids.append(99)
    assert kv.allocate_slots(sequence, 1)
    sequence.num_computed_tokens = 8
    kv.cache_full_blocks(sequence)
    same = make_sequence([*range(7), 99, 100], request_id="same")
    kv.lookup(same)
    assert same.block_ids == sequence.block_ids[:2]
    other = make_sequence([*range(7), 98, 100], request_id="other")
    kv.lookup(other)
    assert other.block_ids == sequence.block_ids[:1]


def test_preemptions_are_counted_per_sequence_and_in_all() -> None:
    kv = manager(7)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    sequences = [make_sequence(list(range(100 * i, 100 * i + 5)), request_id=f"s{i}") for i in range(3)]
    for sequence in sequences:
        scheduler.add(sequence)
    preempted: list[str] = []
    while scheduler.has_work():
        step = scheduler.schedule()
        preempted += [s.request_id for s in step.preempted]
        for chunk in step.chunks:
            chunk.sequence.num_computed_tokens = chunk.end
            kv.cache_full_blocks(chunk.sequence)
            if chunk.samples:
                chunk.sequence.output_token_ids.append(7)
                if len(chunk.sequence.output_token_ids) == 16:
                    scheduler.finish(chunk.sequence)
    assert preempted == ["s2", "s1", "s2"]  # s2 twice: counts add up, they are not flags
    assert scheduler.num_preemptions == 3 and [s.num_preemptions for s in sequences] == [0, 1, 2]
    assert kv.pool.num_free == 7


def test_each_step_stays_within_the_token_budget_and_chunks_prompts() -> None:
    kv = manager(64)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=12)
    sequences = [make_sequence(list(range(100 * i, 100 * i + n)), request_id=f"s{i}")
                 for i, n in enumerate((5, 6, 5, 30))]
    for sequence in sequences:
        scheduler.add(sequence)
    steps = []
    for _ in range(3):
        step = scheduler.schedule()
        steps.append([(c.sequence.request_id, c.start, c.num_tokens) for c in step.chunks])
        for chunk in step.chunks:  # the step completed; prompts that finished sample a token
            chunk.sequence.num_computed_tokens = chunk.end
            if chunk.samples:
                chunk.sequence.output_token_ids.append(1)
    assert steps == [
        [("s0", 0, 5), ("s1", 0, 6), ("s2", 0, 1)],  # the last token of budget still admits one, chunked
        [("s0", 5, 1), ("s1", 6, 1), ("s2", 1, 4), ("s3", 0, 6)],  # running first; a waiting one gets the rest
        [("s0", 6, 1), ("s1", 7, 1), ("s2", 5, 1), ("s3", 6, 9)],
    ]


def test_running_prefills_share_the_budget_in_order() -> None:
    kv = manager(64)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=30)
    first, second = make_sequence(list(range(20)), request_id="a"), make_sequence(list(range(50, 70)), request_id="b")
    for sequence in (first, second):
        scheduler.add(sequence)
    step = scheduler.schedule()
    assert [(c.sequence.request_id, c.num_tokens) for c in step.chunks] == [("a", 20), ("b", 10)]
    first.num_computed_tokens, second.num_computed_tokens = 20, 10
    first.output_token_ids.append(1)
    scheduler.max_num_batched_tokens = 8
    step = scheduler.schedule()
    assert [(c.sequence.request_id, c.num_tokens) for c in step.chunks] == [("a", 1), ("b", 7)]


def test_a_held_back_sibling_keeps_its_place_when_admission_stops_for_lack_of_blocks() -> None:
    kv = manager(6)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = PreparedPrompt(token_ids=list(range(10)))
    leader, sibling = (make_sequence([], prompt=prompt, request_id=f"x-{i}") for i in range(2))
    too_big = make_sequence(list(range(100, 140)), request_id="big")
    for sequence in (leader, sibling, too_big):
        scheduler.add(sequence)
    step = scheduler.schedule()
    assert [c.sequence.request_id for c in step.chunks] == ["x-0"]
    assert list(scheduler.waiting) == [sibling, too_big]  # both still queued, in their order


def test_finished_and_preempted_sequences_drop_their_prompt_tensors() -> None:
    kv = manager(8)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    sequence = make_sequence(list(range(6)))
    scheduler.add(sequence)
    scheduler.schedule()
    for release in (lambda: scheduler._preempt(sequence, scheduler.schedule()), lambda: scheduler.finish(sequence)):
        sequence.prompt_embeds, sequence.prompt_positions = torch.zeros(6, 4), torch.zeros(1, 6, dtype=torch.long)
        sequence.prompt_extras = {"deepstack": torch.zeros(6, 4)}
        release()
        assert sequence.prompt_embeds is None and sequence.prompt_positions is None and sequence.prompt_extras is None
    assert sequence.status is SequenceStatus.FINISHED and kv.pool.num_free == 8


def running_sequence(kv: KVCacheManager, scheduler: Scheduler, name: str, num_prompt: int, num_computed: int,
                     num_generated: int = 0) -> Sequence:
    """A sequence already running, with `num_computed` tokens' KV in its blocks."""
    sequence = make_sequence(list(range(num_prompt)), request_id=name)
    sequence.output_token_ids += [1] * num_generated
    kv.lookup(sequence)
    assert kv.allocate_slots(sequence, num_computed)
    sequence.num_computed_tokens = num_computed
    sequence.status = SequenceStatus.RUNNING
    scheduler.running.append(sequence)
    return sequence


def test_the_budget_runs_out_in_the_running_loop_and_no_one_after_is_scheduled() -> None:
    kv = manager(64)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=8)
    running_sequence(kv, scheduler, "prefilling", 20, 13)  # 7 to go
    running_sequence(kv, scheduler, "decoding", 5, 5, num_generated=1)
    running_sequence(kv, scheduler, "also-decoding", 5, 5, num_generated=1)
    scheduler.add(make_sequence(list(range(3)), request_id="waiting"))
    step = scheduler.schedule()
    assert [(c.sequence.request_id, c.start, c.num_tokens) for c in step.chunks] == [
        ("prefilling", 13, 7), ("decoding", 5, 1)]
    assert [c.samples for c in step.chunks] == [True, True]


def test_tokens_slices_across_the_prompt_and_the_generated_tokens() -> None:
    sequence = make_sequence([10, 11, 12, 13])
    sequence.output_token_ids += [20, 21, 22, 23, 24, 25]
    assert sequence.tokens(1, 3) == [11, 12] and sequence.tokens(0, 4) == [10, 11, 12, 13]
    assert sequence.tokens(3, 6) == [13, 20, 21] and sequence.tokens(4, 6) == [20, 21]
    assert sequence.tokens(5, 7) == [21, 22] and sequence.num_tokens == 10


# --- bidirectional attention blocks (Gemma 3's image blocks, PaliGemma's prefix) ----------------------------------


def test_a_cached_block_inside_a_bidirectional_block_is_keyed_by_the_whole_block() -> None:
    """A KV block's keys and values depend on every later token of a bidirectional block it overlaps: two prompts
    that agree on the first KV block but not on the rest of the bidirectional block must not share it."""
    kv = manager()
    first = make_sequence([1, 2, 3, 4, 5, 6, 7, 8, 9])
    first.attention_blocks = ((0, 6),)
    compute(kv, first)
    same_start = make_sequence([1, 2, 3, 4, 5, 0, 7, 8, 9], request_id="s")  # differs inside the block, after it
    same_start.attention_blocks = ((0, 6),)
    kv.lookup(same_start)
    assert same_start.num_computed_tokens == 0
    causal = make_sequence([1, 2, 3, 4, 5, 6, 7, 8, 9], request_id="c")  # the same tokens under a causal mask
    kv.lookup(causal)
    assert causal.num_computed_tokens == 0
    same_block = make_sequence([1, 2, 3, 4, 5, 6, 0, 0, 0], request_id="b")  # differs only after the block
    same_block.attention_blocks = ((0, 6),)
    kv.lookup(same_block)
    assert same_block.num_computed_tokens == BS


def test_the_lookahead_folds_in_later_images_of_the_block() -> None:
    spans = (ImageSpan(2, 4, 0), ImageSpan(4, 6, 1))
    hashes = [kv_cache.extend_block_hashes([], lambda s, e: list(range(s, e)), 8,
                                           PreparedPrompt(token_ids=list(range(8)), image_hashes=("a", image),
                                                          image_spans=spans), None, BS, ((0, 6),))
              for image in ("b", "c")]
    assert hashes[0][0] != hashes[1][0]  # the second image lies after block 0 but inside its bidirectional block


def test_the_scheduler_never_ends_a_prefill_chunk_inside_a_bidirectional_block() -> None:
    from vlmserve.engine.scheduler import chunk_size

    sequence = make_sequence(list(range(20)))
    sequence.attention_blocks = ((3, 9), (12, 14))
    assert chunk_size(sequence, 5) == 3  # stops before the block
    assert chunk_size(sequence, 9) == 9 and chunk_size(sequence, 11) == 11 and chunk_size(sequence, 13) == 12
    sequence.num_computed_tokens = 3
    assert chunk_size(sequence, 4) == 0  # the block's end is out of reach: nothing this step
    sequence.num_computed_tokens = 5  # started inside the block (its first tokens came from the prefix cache)
    assert chunk_size(sequence, 2) == 0 and chunk_size(sequence, 4) == 4
    kv = manager()
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=7)
    waiting = make_sequence(list(range(20)), request_id="w")
    waiting.attention_blocks = ((3, 9),)
    scheduler.add(waiting)
    assert [(c.start, c.num_tokens) for c in scheduler.schedule().chunks] == [(0, 3)]
    waiting.num_computed_tokens = 3
    assert [(c.start, c.num_tokens) for c in scheduler.schedule().chunks] == [(3, 7)]  # the block, and on
