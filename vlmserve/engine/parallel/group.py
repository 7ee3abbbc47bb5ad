"""The tensor-parallel process group of this process: who we are, and the two communicators we talk over.

Tensors (activations all-reduced inside the decoder, the step's inputs) go over the device group: NCCL on CUDA,
gloo on CPU. The step header (shapes, dtypes, scalars: a pickled object) goes over a gloo group on CUDA too, so
that describing a step never needs a GPU round trip (vLLM keeps the same split of a CPU and a device group).
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

#: an idle server's workers wait for the next step's header (on the gloo group) as long as the server is idle
_IDLE_TIMEOUT = datetime.timedelta(days=365)
#: joining the group, and the device group's collectives: a rank missing for this long has died
_TIMEOUT = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's place in the group: `rank` of `size`; rank 0 runs the scheduler."""

    rank: int
    size: int
    device: torch.device
    device_group: Any
    cpu_group: Any

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place (what a row-parallel projection does with its partial output)."""
        dist.all_reduce(tensor, group=self.device_group)
        return tensor

    def agree_min(self, value: int) -> int:
        """The smallest `value` of all ranks (e.g. the KV blocks every rank can hold)."""
        box = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(box, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(box.item())

    def gather_errors(self, error: str | None) -> list[str]:
        """Every rank's start-up error (None where it started), so that all ranks fail together, not hang."""
        errors: list[str | None] = [None] * self.size
        dist.all_gather_object(errors, error, group=self.cpu_group)
        return [f"rank {rank}: {e}" for rank, e in enumerate(errors) if e is not None]


_current: TensorParallelGroup | None = None


def current() -> TensorParallelGroup | None:
    """The group this process joined, or None without tensor parallelism."""
    return _current


def free_init_method() -> str:
    """A rendezvous address on this host: a TCP port free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def init_group(rank: int, size: int, init_method: str, device_type: str) -> TensorParallelGroup:
    """Join the group (blocks until all `size` ranks have joined) and make it this process's current group."""
    global _current
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        backend = "nccl"
    else:
        device, backend = torch.device(device_type), "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=_TIMEOUT)
    world = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    _current = TensorParallelGroup(rank=rank, size=size, device=device, device_group=world, cpu_group=cpu_group)
    return _current


def destroy_group() -> None:
    global _current
    if _current is not None and dist.is_initialized():
        dist.destroy_process_group()
    _current = None
