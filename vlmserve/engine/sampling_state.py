"""The persistent, batched sampling state of the running sequences: one row ("slot") per sequence.

A sequence takes a slot the first time it is sampled and gives it back when it finishes, is aborted or is
preempted. Everything a step needs per row lives in tensors indexed by slot, so a step of B rows costs a fixed
handful of tensor ops whatever B is, instead of a handful per row:

- `scalars` (slots, 7): temperature, top-p, top-k, min-p, presence, frequency and repetition penalty;
- `counts` (slots, vocab): how often each token was *generated* (prompt tokens excluded, as in OpenAI's and
  vLLM's presence/frequency penalties), updated with every step's tokens; allocated when a row first needs it;
- `prompt_mask` (slots, vocab): tokens of the prompt, for the repetition penalty, which (as in transformers and
  vLLM) counts the prompt as well as the output;
- `bias_ids`/`bias_values` (slots, width): each row's logit_bias, padded with zero-valued entries;
- `end_ids` (slots, width): the tokens masked while fewer than `min_tokens` were generated (EOS unless
  ignore_eos, and the request's `stop_token_ids`), padded by repeating the row's first one.

A slot re-entering after preemption is rebuilt from the sequence's prompt and output tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlmserve.engine.sampler import SequenceSampling

#: columns of `SamplingState.scalars`
TEMPERATURE, TOP_P, TOP_K, MIN_P, PRESENCE, FREQUENCY, REPETITION = range(7)
_NUM_SCALARS = 7


class SamplingState:
    """Slots of per-sequence sampling settings and generated-token counts, kept on the sampling device."""

    def __init__(self, device: torch.device | str, vocab_size: int, *, initial_slots: int = 8) -> None:
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self._capacity = initial_slots
        self._host_scalars = torch.zeros(initial_slots, _NUM_SCALARS)
        self.scalars = self._host_scalars.to(self.device)
        self._dirty = False
        self._free = list(range(initial_slots - 1, -1, -1))
        self.rows: dict[int, SequenceSampling] = {}  # slot → the sequence holding it
        self.counts: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None
        self.bias_ids: torch.Tensor | None = None
        self.bias_values: torch.Tensor | None = None
        self.end_ids: torch.Tensor | None = None

    # --- rows entering and leaving ---------------------------------------------------------------------------

    def slots_for(self, sequences: list[SequenceSampling]) -> list[int]:
        """The slot of each sequence, giving one (and filling it) to those that have none yet."""
        slots = [s.slot if s.slot is not None else self._enter(s) for s in sequences]
        if self._dirty:
            self.scalars = self._host_scalars.to(self.device, non_blocking=True)
            self._dirty = False
        return slots

    def release(self, sequence: SequenceSampling) -> None:
        """The sequence left the batch (finished, aborted or preempted); its slot is free for another."""
        slot = sequence.slot
        if slot is None:
            return
        sequence.slot = None
        del self.rows[slot]
        self._free.append(slot)

    @property
    def num_active(self) -> int:
        return len(self.rows)

    def _enter(self, sequence: SequenceSampling) -> int:
        if not self._free:
            self._grow()
        slot = self._free.pop()
        sequence.slot = slot
        self.rows[slot] = sequence
        params = sequence.params
        self._host_scalars[slot] = torch.tensor([
            params.temperature, params.top_p, float(params.top_k), params.min_p, params.presence_penalty,
            params.frequency_penalty, params.repetition_penalty])
        self._dirty = True
        if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
            self._fill_counts(slot, sequence.output_token_ids)
        if params.repetition_penalty != 1.0:
            self._fill_prompt_mask(slot, sequence.prompt_token_ids)
        if params.logit_bias:
            self._fill_bias(slot, params.logit_bias)
        elif self.bias_ids is not None and self.bias_values is not None:
            self.bias_values[slot].zero_()  # a previous holder's bias must not leak into this row
        if params.min_tokens and sequence.end_token_ids:
            self._fill_end_ids(slot, sorted(sequence.end_token_ids))
        return slot

    def _grow(self) -> None:
        old = self._capacity
        new = old * 2
        self._capacity = new
        self._host_scalars = torch.cat([self._host_scalars, torch.zeros(old, _NUM_SCALARS)])
        self._dirty = True
        self._free.extend(range(new - 1, old - 1, -1))
        self.counts = _grow_rows(self.counts, new)
        self.prompt_mask = _grow_rows(self.prompt_mask, new)
        self.bias_ids = _grow_rows(self.bias_ids, new)
        self.bias_values = _grow_rows(self.bias_values, new)
        self.end_ids = _grow_rows(self.end_ids, new)

    # --- per-slot buffers, filled when a row enters ----------------------------------------------------------

    def _fill_counts(self, slot: int, output_token_ids: list[int]) -> None:
        if self.counts is None:
            self.counts = torch.zeros(self._capacity, self.vocab_size, dtype=torch.int32, device=self.device)
        row = self.counts[slot]
        row.zero_()
        ids = [t for t in output_token_ids if 0 <= t < self.vocab_size]
        if ids:
            row.index_add_(0, torch.tensor(ids, device=self.device),
                           torch.ones(len(ids), dtype=torch.int32, device=self.device))

    def _fill_prompt_mask(self, slot: int, prompt_token_ids: list[int]) -> None:
        if self.prompt_mask is None:
            self.prompt_mask = torch.zeros(self._capacity, self.vocab_size, dtype=torch.bool, device=self.device)
        row = self.prompt_mask[slot]
        row.zero_()
        ids = [t for t in prompt_token_ids if 0 <= t < self.vocab_size]
        if ids:
            row[torch.tensor(ids, device=self.device)] = True

    def _fill_bias(self, slot: int, logit_bias: Mapping[int, float]) -> None:
        items = [(int(k), float(v)) for k, v in logit_bias.items() if 0 <= int(k) < self.vocab_size]
        self.bias_ids, self.bias_values = _ensure_width(self.bias_ids, self.bias_values, self._capacity,
                                                        len(items), self.device)
        assert self.bias_ids is not None and self.bias_values is not None
        self.bias_ids[slot].zero_()
        self.bias_values[slot].zero_()
        if items:
            self.bias_ids[slot, :len(items)] = torch.tensor([k for k, _ in items], device=self.device)
            self.bias_values[slot, :len(items)] = torch.tensor([v for _, v in items], device=self.device)

    def _fill_end_ids(self, slot: int, end_ids: list[int]) -> None:
        width = max(len(end_ids), self.end_ids.shape[1] if self.end_ids is not None else 0)
        if self.end_ids is None or self.end_ids.shape[1] < width:
            grown = torch.zeros(self._capacity, width, dtype=torch.long, device=self.device)
            if self.end_ids is not None:
                # pad old rows by repeating their first id, which keeps the padding harmless
                grown[:] = self.end_ids[:, :1]
                grown[:, :self.end_ids.shape[1]] = self.end_ids
            self.end_ids = grown
        padded = end_ids + [end_ids[0]] * (width - len(end_ids))
        self.end_ids[slot] = torch.tensor(padded, device=self.device)

    # --- what a step does with the rows ----------------------------------------------------------------------

    def apply_bias(self, logits: torch.Tensor, slots: torch.Tensor) -> None:
        """Add each row's logit_bias (rows without one hold zeros)."""
        assert self.bias_ids is not None and self.bias_values is not None
        logits.scatter_add_(1, self.bias_ids[slots], self.bias_values[slots])

    def mask_end_tokens(self, logits: torch.Tensor, rows: list[int], slots: list[int]) -> None:
        """Forbid the end tokens of `rows` (batch positions) whose sequences are still below min_tokens."""
        assert self.end_ids is not None
        ids = self.end_ids[torch.tensor(slots, device=self.device)]
        at = torch.tensor(rows, device=self.device).unsqueeze(1).expand_as(ids)
        logits.index_put_((at, ids), torch.tensor(float("-inf"), device=logits.device))

    def apply_penalties(self, logits: torch.Tensor, slots: torch.Tensor, *, repetition: bool) -> torch.Tensor:
        """Repetition penalty (prompt and output tokens), then frequency and presence (generated tokens only).
        Rows with neutral settings come out unchanged."""
        assert self.counts is not None
        counts = self.counts[slots]
        seen = counts > 0
        scalars = self.scalars[slots]
        if repetition:
            assert self.prompt_mask is not None
            penalty = torch.where(seen | self.prompt_mask[slots], scalars[:, REPETITION:REPETITION + 1], 1.0)
            logits = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = logits - scalars[:, FREQUENCY:FREQUENCY + 1] * counts
        return logits - scalars[:, PRESENCE:PRESENCE + 1] * seen

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count this step's chosen tokens (one per row; a row appears once per step)."""
        if self.counts is not None:
            self.counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)


def _grow_rows(tensor: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    extra = tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, extra])


def _ensure_width(ids: torch.Tensor | None, values: torch.Tensor | None, rows: int, width: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    current = ids.shape[1] if ids is not None else 0
    if ids is not None and values is not None and current >= width:
        return ids, values
    new_ids = torch.zeros(rows, max(width, 1), dtype=torch.long, device=device)
    new_values = torch.zeros(rows, max(width, 1), dtype=torch.float32, device=device)
    if ids is not None and values is not None:
        new_ids[:, :current] = ids
        new_values[:, :current] = values
    return new_ids, new_values
