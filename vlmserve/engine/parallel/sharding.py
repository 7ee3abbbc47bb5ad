"""Which slice of which weight each rank holds: the sharding plan of a decoder, per family.

Attention is split by heads (Megatron-style, as vLLM's ColumnParallelLinear/RowParallelLinear do): rank r holds
query heads [r·H/N, (r+1)·H/N) — their rows of q_proj and their columns of o_proj — and the KV heads those query
heads read. With fewer KV heads than ranks, each KV head is replicated on the N/KV ranks whose query heads read
it. The MLP is split by intermediate columns: gate/up rows and down columns. o_proj and down_proj become
`RowParallelLinear` (one all-reduce each); everything else (embeddings, norms, lm_head, the vision tower) is
replicated.

`shard_decoder` replaces the decoder's projections with meta modules of this rank's shape and returns the plan:
for each sharded parameter, the pieces of the checkpoint tensor (along one dimension) that make up this rank's
tensor. The loader reads exactly those pieces. The decoder's configuration is updated to this rank's head counts,
so the KV-cache layout (and anything else reading it) sees the heads this rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vlmserve.engine.parallel.group import TensorParallelGroup
from vlmserve.engine.parallel.layers import column_linear, row_linear
from vlmserve.errors import TensorParallelError

Pieces = tuple[tuple[int, int], ...]
FLAG = "--tensor-parallel-size"


@dataclass
class ShardPlan:
    """parameter name → (dimension, pieces [start, end) of the full tensor along it, concatenated in order)."""

    slices: dict[str, tuple[int, Pieces]] = field(default_factory=dict)

    def add(self, name: str, dim: int, *pieces: tuple[int, int]) -> None:
        self.slices[name] = (dim, tuple(pieces))


@dataclass(frozen=True)
class HeadSplit:
    """How `num_heads` query heads and `num_kv_heads` KV heads of `head_dim` split over `size` ranks."""

    family: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    size: int

    def __post_init__(self) -> None:
        heads, kv, n = self.num_heads, self.num_kv_heads, self.size
        if heads % n:
            raise TensorParallelError(f"{self.family}: {heads} attention heads do not split over {FLAG} {n}")
        if kv % n and n % kv:
            raise TensorParallelError(f"{self.family}: {kv} KV heads neither split over nor replicate evenly "
                                      f"onto {FLAG} {n} ranks")

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.size

    @property
    def kv_heads_per_rank(self) -> int:
        return max(1, self.num_kv_heads // self.size)

    def q_rows(self, rank: int) -> tuple[int, int]:
        start = rank * self.heads_per_rank * self.head_dim
        return start, start + self.heads_per_rank * self.head_dim

    def kv_rows(self, rank: int) -> tuple[int, int]:
        # query head h reads KV head h // (H / KV); this rank's first query head decides its KV heads
        first_kv = rank * self.heads_per_rank // (self.num_heads // self.num_kv_heads)
        return first_kv * self.head_dim, (first_kv + self.kv_heads_per_rank) * self.head_dim


def split_rows(total: int, rank: int, size: int, what: str, family: str) -> tuple[int, int]:
    if total % size:
        raise TensorParallelError(f"{family}: {what} of {total} does not split over {FLAG} {size}")
    share = total // size
    return rank * share, (rank + 1) * share


def module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def linear(parent: nn.Module, name: str, family: str) -> nn.Linear:
    module = getattr(parent, name, None)
    if type(module) is not nn.Linear:
        raise TensorParallelError(f"{family}: decoder layers have no plain nn.Linear `{name}`; {FLAG} > 1 supports "
                                  "decoders with q_proj/k_proj/v_proj/o_proj and gate_proj/up_proj/down_proj "
                                  "(or gate_up_proj) projections")
    return module


def set_shard_attributes(attention: nn.Module, split: HeadSplit) -> None:
    """Head counts some attention modules keep as attributes (read by eager attention or shape code)."""
    for name, value in (("num_heads", split.heads_per_rank), ("num_key_value_heads", split.kv_heads_per_rank),
                        ("num_kv_heads", split.kv_heads_per_rank),
                        ("num_key_value_groups", split.heads_per_rank // split.kv_heads_per_rank)):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, value)


def shard_standard_decoder(model: nn.Module, decoder: nn.Module, text_config: Any, family: str,
                           group: TensorParallelGroup) -> ShardPlan:
    """Shard a transformers decoder whose layers have `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`
    (or a fused `mlp.gate_up_proj`, GLM-4.1V's); refuse anything else (MoE blocks included) by name."""
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not layers:
        raise TensorParallelError(f"{family}: the decoder has no `layers` list; {FLAG} > 1 cannot shard it")
    num_heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    split = HeadSplit(family, num_heads, getattr(text_config, "num_key_value_heads", None) or num_heads, head_dim,
                      group.size)
    names = module_names(model)
    plan = ShardPlan()
    for layer in layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attention is None or mlp is None:
            raise TensorParallelError(f"{family}: decoder layers without self_attn/mlp cannot be sharded by {FLAG}")
        if not hasattr(mlp, "down_proj") or hasattr(mlp, "experts"):
            raise TensorParallelError(f"{family}: mixture-of-experts (or otherwise non-standard) MLP blocks are not "
                                      f"sharded yet; serve this model without {FLAG}")
        _shard_attention(attention, split, names[id(attention)], group, plan)
        _shard_mlp(mlp, names[id(mlp)], family, group, plan)
    text_config.head_dim = head_dim
    text_config.num_attention_heads = split.heads_per_rank
    text_config.num_key_value_heads = split.kv_heads_per_rank
    return plan


def _shard_attention(attention: nn.Module, split: HeadSplit, prefix: str, group: TensorParallelGroup,
                     plan: ShardPlan) -> None:
    rank, family = group.rank, split.family
    q, k, v, o = (linear(attention, n, family) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    q_rows, kv_rows = split.q_rows(rank), split.kv_rows(rank)
    for name, module, rows in (("q_proj", q, q_rows), ("k_proj", k, kv_rows), ("v_proj", v, kv_rows)):
        setattr(attention, name, column_linear(module, rows[1] - rows[0]))
        plan.add(f"{prefix}.{name}.weight", 0, rows)
        if module.bias is not None:
            plan.add(f"{prefix}.{name}.bias", 0, rows)
    attention.o_proj = row_linear(o, q_rows[1] - q_rows[0], group)
    plan.add(f"{prefix}.o_proj.weight", 1, q_rows)
    set_shard_attributes(attention, split)


def _shard_mlp(mlp: nn.Module, prefix: str, family: str, group: TensorParallelGroup, plan: ShardPlan) -> None:
    down = linear(mlp, "down_proj", family)
    rows = split_rows(down.in_features, group.rank, group.size, "the MLP's intermediate size", family)
    width = rows[1] - rows[0]
    if hasattr(mlp, "gate_up_proj"):  # [gate | up] in one projection: this rank's rows of each half
        fused = linear(mlp, "gate_up_proj", family)
        mlp.gate_up_proj = column_linear(fused, 2 * width)
        half = down.in_features
        plan.add(f"{prefix}.gate_up_proj.weight", 0, rows, (half + rows[0], half + rows[1]))
        if fused.bias is not None:
            plan.add(f"{prefix}.gate_up_proj.bias", 0, rows, (half + rows[0], half + rows[1]))
    else:
        for name in ("gate_proj", "up_proj"):
            module = linear(mlp, name, family)
            setattr(mlp, name, column_linear(module, width))
            plan.add(f"{prefix}.{name}.weight", 0, rows)
            if module.bias is not None:
                plan.add(f"{prefix}.{name}.bias", 0, rows)
    mlp.down_proj = row_linear(down, width, group)
    plan.add(f"{prefix}.down_proj.weight", 1, rows)


def shard_glm4v_9b(model: Any, group: TensorParallelGroup) -> ShardPlan:
    """GLM-4V-9B's decoder: a fused `query_key_value` ([Q heads | K groups | V groups] rows: this rank's rows of
    each part) and a fused `dense_h_to_4h` ([gate | up]: this rank's rows of each half)."""
    config = model.config
    family = "glm4v_9b"
    split = HeadSplit(family, config.num_attention_heads, config.num_key_value_heads, config.kv_channels,
                      group.size)
    names = module_names(model)
    plan = ShardPlan()
    q_size, kv_size = split.num_heads * split.head_dim, split.num_kv_heads * split.head_dim
    q_rows, kv_rows = split.q_rows(group.rank), split.kv_rows(group.rank)
    qkv_pieces = (q_rows, (q_size + kv_rows[0], q_size + kv_rows[1]),
                  (q_size + kv_size + kv_rows[0], q_size + kv_size + kv_rows[1]))
    for layer in model.text_model.layers:
        attention, mlp = layer.self_attention, layer.mlp
        prefix = names[id(attention)]
        fused = linear(attention, "query_key_value", family)
        attention.query_key_value = column_linear(fused, sum(end - start for start, end in qkv_pieces))
        plan.add(f"{prefix}.query_key_value.weight", 0, *qkv_pieces)
        if fused.bias is not None:
            plan.add(f"{prefix}.query_key_value.bias", 0, *qkv_pieces)
        attention.dense = row_linear(linear(attention, "dense", family), q_rows[1] - q_rows[0], group)
        plan.add(f"{prefix}.dense.weight", 1, q_rows)
        set_shard_attributes(attention, split)
        _shard_glm_mlp(mlp, names[id(mlp)], config.ffn_hidden_size, group, plan)
    config.num_attention_heads = split.heads_per_rank
    config.multi_query_attention = True
    config.multi_query_group_num = split.kv_heads_per_rank
    return plan


def _shard_glm_mlp(mlp: nn.Module, prefix: str, ffn: int, group: TensorParallelGroup, plan: ShardPlan) -> None:
    rows = split_rows(ffn, group.rank, group.size, "ffn_hidden_size", "glm4v_9b")
    width = rows[1] - rows[0]
    fused = linear(mlp, "dense_h_to_4h", "glm4v_9b")
    mlp.dense_h_to_4h = column_linear(fused, 2 * width)
    pieces = (rows, (ffn + rows[0], ffn + rows[1]))
    plan.add(f"{prefix}.dense_h_to_4h.weight", 0, *pieces)
    if fused.bias is not None:
        plan.add(f"{prefix}.dense_h_to_4h.bias", 0, *pieces)
    mlp.dense_4h_to_h = row_linear(linear(mlp, "dense_4h_to_h", "glm4v_9b"), width, group)
    plan.add(f"{prefix}.dense_4h_to_h.weight", 1, rows)
