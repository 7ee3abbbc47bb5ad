"""Per-sequence recurrent state of hybrid decoders (Qwen3.5's linear-attention layers), kept beside the paged KV.

A recurrent layer's state after token n is a function of tokens 0..n only: unlike KV it cannot be read back from
blocks, shared between prompts or rebuilt for part of a sequence. So each running sequence holds one slot of a
fixed pool, with the same lifecycle as its blocks (`kv_cache_manager`):

    admitted with 0 computed tokens ──► takes a free slot (at most max_num_seqs run, and the pool has one more
                                        slot, for the engine's health probe)
    each step ──► its recurrent layers start from the slot's state (from zeros when its chunk starts at token 0);
                  the states after the step's rows are written back only once the whole step, sampling included,
                  succeeded (`RecurrentStep.commit`), so a failed step that is re-run does not apply its rows twice
    finished / preempted / failed ──► the slot goes back; a preempted sequence recomputes from token 0
    prefix cache ──► off for these models: a cached block has no state to resume from

The layers themselves run through `ModelAdapter.run_recurrent`, installed over each layer's forward by `install`;
outside an engine step (the generate engine, `generate` in the self-check) the model's own forward runs.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmserve.models.base import ModelAdapter, RecurrentLayout


class StateSlots:
    """The free slots of the state pool (ids only; the tensors are `RecurrentStates`)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        return self._free.popleft() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)


@dataclass
class RecurrentStates:
    """Per recurrent layer: conv left contexts (slots, channels, kernel - 1) in the model's dtype and delta-rule
    states (slots, heads, key dim, value dim) in float32; `num_tokens[slot]`: the tokens the slot's state has seen."""

    conv: dict[int, torch.Tensor]
    state: dict[int, torch.Tensor]
    num_tokens: list[int]

    @classmethod
    def allocate(cls, layout: RecurrentLayout, num_slots: int, *, dtype: torch.dtype,
                 device: torch.device) -> RecurrentStates:
        conv = {layer: torch.zeros(num_slots, *layout.conv_shape, dtype=dtype, device=device)
                for layer in layout.layers}
        state = {layer: torch.zeros(num_slots, *layout.state_shape, dtype=torch.float32, device=device)
                 for layer in layout.layers}
        return cls(conv=conv, state=state, num_tokens=[0] * num_slots)


@dataclass
class RecurrentStep:
    """One step's view of the pool: sequence i of the step owns rows `segments[i]`, uses `slots[i]` and starts
    from zeros when `is_fresh[i]`. `states` None: nothing is read or kept (the memory profile's scratch step)."""

    states: RecurrentStates | None
    slots: list[int]
    segments: list[tuple[int, int]]
    is_fresh: list[bool]
    ends: list[int]  # the token count each sequence's state will have seen after this step
    _staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _index: torch.Tensor | None = None
    _fresh: torch.Tensor | None = None

    @classmethod
    def scratch(cls, cu_seqlens: list[int]) -> RecurrentStep:
        segments = list(itertools.pairwise(cu_seqlens))
        return cls(None, [0] * len(segments), segments, [True] * len(segments), [0] * len(segments))

    def check(self, starts: list[int]) -> None:
        """Refuse a step whose sequences do not resume exactly where their slot's state stopped."""
        if self.states is None:
            return
        for slot, start, fresh in zip(self.slots, starts, self.is_fresh, strict=True):
            if not fresh and self.states.num_tokens[slot] != start:
                raise RuntimeError(f"recurrent state slot {slot} has seen {self.states.num_tokens[slot]} tokens but "
                                   f"the step resumes at token {start}")

    def gather(self, layer: int, conv_like: torch.Tensor, state_like: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's sequences' (conv, state) before this step, zeros for fresh ones."""
        count = len(self.slots)
        if self.states is None:
            return (conv_like.new_zeros(count, *conv_like.shape[1:]),
                    state_like.new_zeros(count, *state_like.shape[1:]))
        if self._index is None:  # made once per step, used by every layer
            self._index = torch.tensor(self.slots, device=conv_like.device)
            self._fresh = torch.tensor(self.is_fresh, device=conv_like.device) if any(self.is_fresh) else None
        conv, state = self.states.conv[layer][self._index], self.states.state[layer][self._index]
        if self._fresh is not None:
            conv = conv.masked_fill(self._fresh[:, None, None], 0)
            state = state.masked_fill(self._fresh[:, None, None, None], 0)
        return conv, state

    def stage(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        self._staged[layer] = (conv, state)

    def commit(self) -> None:
        """Write the staged states back to the pool: call once the step as a whole succeeded."""
        if self.states is None or not self._staged:
            return
        index = self._index if self._index is not None else torch.tensor(
            self.slots, device=next(iter(self._staged.values()))[0].device)
        for layer, (conv, state) in self._staged.items():
            self.states.conv[layer][index] = conv.to(self.states.conv[layer].dtype)
            self.states.state[layer][index] = state.to(self.states.state[layer].dtype)
        for slot, end in zip(self.slots, self.ends, strict=True):
            self.states.num_tokens[slot] = end
        self._staged.clear()


def install(adapter: ModelAdapter, current: Any) -> None:
    """Route each recurrent layer of the adapter's decoder through `adapter.run_recurrent` while an engine step is
    active (`current()` returns its `AttentionBatch`, or None outside a step)."""
    layout = adapter.recurrent_layout
    if layout is None:
        return
    for layer, module in adapter.recurrent_modules().items():
        original = module.__dict__.get("_vlmserve_original_forward", module.forward)
        module.__dict__["_vlmserve_original_forward"] = original
        module.__dict__["forward"] = functools.partial(_forward, adapter, layout, layer, module, original, current)


def _forward(adapter: ModelAdapter, layout: RecurrentLayout, layer: int, module: torch.nn.Module, original: Any,
             current: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    batch = current()
    if batch is None:
        return original(*args, **kwargs)
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    step: RecurrentStep = batch.recurrent or RecurrentStep.scratch(batch.cu_seqlens_q.tolist())
    conv_like = hidden.new_empty(0, *layout.conv_shape)
    state_like = hidden.new_empty(0, *layout.state_shape, dtype=torch.float32)
    conv, state = step.gather(layer, conv_like, state_like)
    out, new_conv, new_state = adapter.run_recurrent(module, hidden[0], step.segments, conv, state)
    step.stage(layer, new_conv, new_state)
    return out.unsqueeze(0)
