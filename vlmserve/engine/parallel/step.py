"""The per-forward broadcast from rank 0 to the workers: what to run and on which inputs.

Rank 0 sends a `ForwardPlan` before each decoder forward it runs (eager or a CUDA-graph replay). The header —
kind, scalars, names, shapes and dtypes — is one pickled object over the gloo group; the tensors follow as one
flat buffer per dtype over the device group (NCCL on GPU), so a decode step costs one small host broadcast and
two or three device broadcasts, whatever the batch.

NOTE: vLLM replaces the pickled header with a shared-memory ring buffer; a GPU run will tell whether ours costs
enough per step to matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from vlmserve.engine.attention import AttentionBatch
from vlmserve.engine.kv_cache import KVCache
from vlmserve.engine.parallel.group import TensorParallelGroup

EAGER, GRAPHED, STOP = "eager", "graphed", "stop"
_ATTENTION_TENSORS = ("slot_mapping", "cu_seqlens_q", "seq_lens", "block_tables")


@dataclass
class ForwardPlan:
    """One decoder forward: `kind` (eager, graphed, stop), its tensors by name and its integer scalars."""

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, int] = field(default_factory=dict)
    #: names of tensors that the decoder takes as a list (Qwen3-VL's per-layer deepstack features), sent stacked
    stacked: tuple[str, ...] = ()

    @classmethod
    def of(cls, kind: str, embeds: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
           extras: dict[str, Any] | None = None) -> ForwardPlan:
        tensors = {"embeds": embeds, "positions": positions,
                   **{name: getattr(batch, name) for name in _ATTENTION_TENSORS}}
        if batch.block_bounds is not None:  # Gemma 3 / PaliGemma: the bidirectional blocks of this step
            tensors["block_first"], tensors["block_last"] = batch.block_bounds
        stacked = []
        for name, value in (extras or {}).items():
            if isinstance(value, (list, tuple)):
                value = torch.stack(list(value))
                stacked.append(name)
            tensors[f"extra.{name}"] = value
        scalars = {"max_q_len": batch.max_q_len, "max_seq_len": batch.max_seq_len,
                   "blocks_spare_window": int(batch.blocks_spare_window)}
        return cls(kind, tensors, scalars, tuple(stacked))

    def attention(self, cache: KVCache) -> AttentionBatch:
        bounds = None
        if "block_first" in self.tensors:
            bounds = (self.tensors["block_first"], self.tensors["block_last"])
        return AttentionBatch(cache, self.tensors["slot_mapping"], self.tensors["cu_seqlens_q"],
                              self.tensors["seq_lens"], self.tensors["block_tables"],
                              max_q_len=self.scalars["max_q_len"], max_seq_len=self.scalars["max_seq_len"],
                              block_bounds=bounds, blocks_spare_window=bool(self.scalars["blocks_spare_window"]))

    def extras(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.tensors.items():
            if key.startswith("extra."):
                name = key.removeprefix("extra.")
                out[name] = list(value.unbind(0)) if name in self.stacked else value
        return out


class StepChannel:
    """Rank 0 `send`s plans; every other rank `receive`s them in the same order."""

    def __init__(self, group: TensorParallelGroup) -> None:
        self._group = group

    def send(self, plan: ForwardPlan) -> None:
        assert self._group.is_driver
        names = sorted(plan.tensors)
        header = (plan.kind, plan.scalars, plan.stacked,
                  [(n, tuple(plan.tensors[n].shape), plan.tensors[n].dtype) for n in names])
        dist.broadcast_object_list([header], src=0, group=self._group.cpu_group)
        for dtype, members in _by_dtype(header[3]).items():
            flat = torch.cat([plan.tensors[n].reshape(-1).to(_wire(dtype)) for n, _ in members])
            dist.broadcast(flat.to(self._group.device), src=0, group=self._group.device_group)

    def send_stop(self) -> None:
        self.send(ForwardPlan(STOP))

    def receive(self) -> ForwardPlan:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self._group.cpu_group)
        kind, scalars, stacked, specs = box[0]
        tensors: dict[str, torch.Tensor] = {}
        for dtype, members in _by_dtype(specs).items():
            sizes = [_numel(shape) for _, shape in members]
            flat = torch.empty(sum(sizes), dtype=_wire(dtype), device=self._group.device)
            dist.broadcast(flat, src=0, group=self._group.device_group)
            for (name, shape), part in zip(members, flat.split(sizes), strict=True):
                tensors[name] = part.view(shape).to(dtype)
        return ForwardPlan(kind, tensors, scalars, stacked)


def _by_dtype(specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> dict[torch.dtype, list[tuple[str, Any]]]:
    groups: dict[torch.dtype, list[tuple[str, Any]]] = {}
    for name, shape, dtype in specs:
        groups.setdefault(dtype, []).append((name, shape))
    return groups


def _wire(dtype: torch.dtype) -> torch.dtype:
    """Booleans travel as bytes (not every backend reduces or broadcasts bool)."""
    return torch.uint8 if dtype == torch.bool else dtype


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
