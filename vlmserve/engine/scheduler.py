"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step has a token budget (`--max-num-batched-tokens`) and a cap on running sequences (`--max-num-seqs`).
Running sequences go first, in arrival order: one token each when decoding, the next chunk of their prompt when
still prefilling, so a long image prompt is spread over several steps instead of stalling everyone's decode.
Waiting sequences are admitted with what is left, fairly between clients (`GenerationRequest.client_id`): the queue
is taken round-robin by client, the client with the fewest running sequences first, and when every slot is taken
while a client with (at least two) fewer running sequences than another waits, the other's newest sequence gives
its slot up. So one client's long streams cannot hold every slot while others wait. When the block pool runs dry, the most
recently admitted running sequence is preempted: its blocks go back to the pool (the cached ones stay findable)
and it rejoins the front of the queue, to be recomputed from its prompt and the tokens it already generated.
An `n > 1` sibling waits in the queue (others may pass it) while its leader computes their shared prompt blocks.

A prefill chunk never ends inside a bidirectional attention block (`Sequence.attention_blocks`: Gemma 3's image
blocks, PaliGemma's prefix): the block's first tokens attend to its last, so the whole block must be in the step
that computes its end. The chunk stops before the block instead, and a sequence whose next block does not fit in
what is left of this step's budget waits for the next step (the engine refuses a block longer than the budget).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from vlmserve.engine.kv_cache_manager import KVCacheManager
from vlmserve.engine.request import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `sequence`, starting at its `start`-th token."""

    sequence: Sequence
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last known token, so its logits give the next one."""
        return self.end == self.sequence.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)


class Scheduler:
    """Decides each step's chunks; blocks come from the `KVCacheManager`, which the scheduler only asks for slots."""

    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self._share_slots(out)
        for sequence in list(self.running):
            if budget == 0:
                break
            if sequence.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop to make room
            count = chunk_size(sequence, min(sequence.num_tokens - sequence.num_computed_tokens, budget))
            if count == 0:
                # NOTE: it waits for a step where the block fits; only steps whose budget the sequences ahead of
                # it take could starve it, and they finish their prompts or decode one token each.
                continue
            if not self._reserve(sequence, count, out):
                continue
            out.chunks.append(ScheduledChunk(sequence, sequence.num_computed_tokens, count))
            budget -= count
        if not out.preempted:
            self._order_waiting_fairly()
            budget = self._admit(out, budget)
        return out

    def _reserve(self, sequence: Sequence, count: int, out: SchedulerOutput) -> bool:
        """Slots for `count` more tokens of a running sequence, preempting the newest others if needed."""
        while not self.kv.allocate_slots(sequence, count):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is sequence:
                return False
        return True

    # --- fairness between clients (GenerationRequest.client_id) ---------------------------------------------

    def _order_waiting_fairly(self) -> None:
        """Reorder the queue round-robin by client, fewest running first: a client's k-th waiting sequence ranks
        as if it had k more running. The sort is stable, so each client's own sequences keep their order."""
        if len(self.waiting) < 2:
            return
        load = Counter(s.request.client_id for s in self.running)
        ranked = []
        for position, sequence in enumerate(self.waiting):
            client = sequence.request.client_id
            ranked.append((load[client], position, sequence))
            load[client] += 1
        ranked.sort(key=lambda item: (item[0], item[1]))
        self.waiting = deque(sequence for _, _, sequence in ranked)

    def _share_slots(self, out: SchedulerOutput) -> None:
        """All slots taken while a client waits with two fewer running than another: preempt that one's newest."""
        if not self.waiting or len(self.running) < self.max_num_seqs:
            return
        running = Counter(s.request.client_id for s in self.running)
        fewest = min(running[s.request.client_id] for s in self.waiting)
        busiest, count = running.most_common(1)[0]
        if count < fewest + 2:
            return
        victim = next(s for s in reversed(self.running) if s.request.client_id == busiest)
        self._preempt(victim, out)

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        held_back: list[Sequence] = []  # n > 1 siblings waiting for their leader's prompt blocks
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            sequence = self.waiting.popleft()
            if self.kv.is_waiting_for(sequence, self.running):
                held_back.append(sequence)
                continue
            queried = self.kv.lookup(sequence)
            count = chunk_size(sequence, min(sequence.num_tokens - sequence.num_computed_tokens, budget))
            if count == 0 or not self.kv.allocate_slots(sequence, count):
                self.kv.free(sequence)  # a waiting sequence holds no blocks, or waiters could starve each other
                self.waiting.appendleft(sequence)  # no room now; it stays first in line
                break
            self.kv.pool.record_lookup(queried, sequence.num_computed_tokens)
            if sequence.num_preemptions == 0:
                sequence.num_cached_tokens = sequence.num_computed_tokens
            sequence.status = SequenceStatus.RUNNING
            self.running.append(sequence)
            out.chunks.append(ScheduledChunk(sequence, sequence.num_computed_tokens, count))
            budget -= count
        self.waiting.extendleft(reversed(held_back))
        return budget

    def _preempt(self, sequence: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(sequence)
        self.kv.free(sequence)
        sequence.release_prompt_state()
        sequence.status = SequenceStatus.WAITING
        sequence.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(sequence)
        out.preempted.append(sequence)

    def finish(self, sequence: Sequence) -> None:
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self.kv.free(sequence)
        sequence.release_prompt_state()
        sequence.status = SequenceStatus.FINISHED


def chunk_size(sequence: Sequence, count: int) -> int:
    """`count`, or fewer so that the chunk from the sequence's computed tokens does not end inside one of its
    bidirectional attention blocks (0: the block's end is out of reach this step)."""
    start = sequence.num_computed_tokens
    end = start + count
    for first, stop in sequence.attention_blocks:
        if first < end < stop:
            return max(first - start, 0)
    return count
