"""The one layer tensor parallelism adds: a row-parallel projection.

A column-parallel projection (Q/K/V, gate/up) needs no layer of its own: it is a plain `nn.Linear` holding this
rank's output rows; its input is the full hidden state every rank has. The projection after it (o_proj, down_proj)
then sees only this rank's slice of its input features, so each rank computes a partial sum of the full output;
`RowParallelLinear` adds the ranks' partial sums (one all-reduce) and the bias once, after the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.engine.parallel.group import TensorParallelGroup


class RowParallelLinear(nn.Module):
    """`y = all_reduce(x_shard @ W_shard.T) + b`: this rank's input columns of a projection, summed over ranks.

    NOTE: `dist.all_reduce` on NCCL is captured by CUDA graphs (every rank captures and replays the same graphs
    in the same order: the workers mirror rank 0's capture). Under `--compile-decoder` it is a graph break; that
    combination has not run on a GPU yet.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, group: TensorParallelGroup,
                 device: torch.device | str = "meta", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (of {self.in_features * self.group.size}), "
                f"out_features={self.out_features}, bias={self.bias is not None}, ranks={self.group.size}")


def column_linear(template: nn.Linear, out_features: int) -> nn.Linear:
    """A meta `nn.Linear` like `template` with `out_features` output rows (this rank's share)."""
    return nn.Linear(template.in_features, out_features, bias=template.bias is not None, device="meta",
                     dtype=template.weight.dtype)


def row_linear(template: nn.Linear, in_features: int, group: TensorParallelGroup) -> RowParallelLinear:
    """A meta `RowParallelLinear` replacing `template`, holding `in_features` of its input columns."""
    return RowParallelLinear(in_features, template.out_features, bias=template.bias is not None, group=group,
                             dtype=template.weight.dtype)
