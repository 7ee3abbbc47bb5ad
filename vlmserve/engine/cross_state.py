"""Per-sequence cross-attention K/V (Mllama), kept beside the paged KV cache.

A cross-attention layer's K/V depend on the request's images only, and their size on the request (images x
tiles x patches), so they do not live in fixed-size blocks. Each sequence with images holds one entry, with the
same lifecycle as its blocks (`kv_cache_manager`):

    prefill starts ──► the runner encodes the prompt's images and puts the K/V of every cross-attention layer
    each step ──► the step's rows of the sequence attend its entry (`models.cross_attention`)
    finished / preempted / aborted / failed ──► the entry goes with the blocks; a preempted sequence recomputes
                                                from token 0, its images included (the image-embedding cache may
                                                spare it the vision tower), and builds its K/V again

NOTE: the entries are not counted in the KV-cache memory budget (the memory profile sizes the paged cache only);
a Llama 3.2 11B request with one 4-tile image holds 8 layers x 2 x 6,404 x 8 x 128 values (~200 MiB in bf16).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from vlmserve.models.cross_attention import CrossKV, CrossSegment

if TYPE_CHECKING:
    from vlmserve.engine.request import Sequence


class CrossKVStore:
    """The running sequences' cross-attention K/V, by sequence."""

    def __init__(self) -> None:
        self._entries: dict[int, CrossKV] = {}

    def put(self, sequence: Sequence, kv: CrossKV) -> None:
        self._entries[id(sequence)] = kv

    def get(self, sequence: Sequence) -> CrossKV | None:
        return self._entries.get(id(sequence))

    def release(self, sequence: Sequence) -> None:
        self._entries.pop(id(sequence), None)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(kv.nbytes for kv in self._entries.values())

    def segments(self, sequences: list[Sequence], starts: list[int], cu_seqlens: list[int]) -> list[CrossSegment]:
        """A packed step's view: sequence i owns rows cu_seqlens[i]..cu_seqlens[i + 1], from token `starts[i]`."""
        segments = []
        for sequence, start, (first, last) in zip(sequences, starts, itertools.pairwise(cu_seqlens), strict=True):
            kv = self.get(sequence)
            if kv is None and sequence.request.prompt.image_hashes:  # never skip an image request's layers
                raise RuntimeError(f"sequence {sequence.request_id} has images but no cross-attention K/V")
            segments.append(CrossSegment(first, last, start, kv))
        return segments
