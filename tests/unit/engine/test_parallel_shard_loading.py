"""Shard loading without processes: each rank's tensors, read slice by slice from safetensors, are exactly the
right rows/columns of the full weights (heads, replicated KV heads, fused QKV and gate/up halves)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmserve.config import ModelConfig
from vlmserve.engine.parallel.group import TensorParallelGroup
from vlmserve.engine.parallel.layers import RowParallelLinear
from vlmserve.engine.parallel.shard_loader import check_supported, load_shard
from vlmserve.engine.parallel.sharding import HeadSplit
from vlmserve.errors import TensorParallelError
from vlmserve.models.loader import load_model


def _group(rank: int, size: int) -> TensorParallelGroup:
    # no communicator: loading issues no collective (only a forward does)
    return TensorParallelGroup(rank=rank, size=size, device=torch.device("cpu"), device_group=None, cpu_group=None)


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny.registry import FAMILIES

    return FAMILIES["llava"].build(tmp_path_factory.mktemp("tp-llava") / "llava")


@pytest.fixture(scope="module")
def glm4v_9b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny.glm4v_9b import build_glm4v_9b

    return build_glm4v_9b(tmp_path_factory.mktemp("tp-glm") / "glm4v_9b")


@pytest.mark.parametrize("rank", [0, 1])
def test_llava_rank_holds_its_heads_and_columns(llava: Path, rank: int) -> None:
    full = dict(load_model(ModelConfig(model=str(llava), device="cpu")).model.named_parameters())
    shard = load_shard(ModelConfig(model=str(llava), device="cpu"), _group(rank, 2))
    params = dict(shard.model.named_parameters())
    layer = "model.language_model.layers.1"
    head_dim, rows = 16, 2 * 16  # 4 query heads, 2 KV heads of 16 over 2 ranks: 2 query heads, 1 KV head each
    q, kv = slice(rank * rows, (rank + 1) * rows), slice(rank * head_dim, (rank + 1) * head_dim)
    assert torch.equal(params[f"{layer}.self_attn.q_proj.weight"], full[f"{layer}.self_attn.q_proj.weight"][q])
    for name in ("k_proj", "v_proj"):
        assert torch.equal(params[f"{layer}.self_attn.{name}.weight"], full[f"{layer}.self_attn.{name}.weight"][kv])
    assert torch.equal(params[f"{layer}.self_attn.o_proj.weight"], full[f"{layer}.self_attn.o_proj.weight"][:, q])
    cols = slice(rank * 64, (rank + 1) * 64)  # intermediate 128
    for name in ("gate_proj", "up_proj"):
        assert torch.equal(params[f"{layer}.mlp.{name}.weight"], full[f"{layer}.mlp.{name}.weight"][cols])
    assert torch.equal(params[f"{layer}.mlp.down_proj.weight"], full[f"{layer}.mlp.down_proj.weight"][:, cols])
    assert isinstance(shard.text_model.layers[1].mlp.down_proj, RowParallelLinear)
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight",
                 "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(params[name], full[name])  # replicated, vision tower included
    assert shard.kv_layout.num_kv_heads == 1


@pytest.mark.parametrize("rank", [0, 1])
def test_glm4v_9b_fused_projections_split_per_part(glm4v_9b: Path, rank: int) -> None:
    full = dict(load_model(ModelConfig(model=str(glm4v_9b), device="cpu")).model.named_parameters())
    shard = dict(load_shard(ModelConfig(model=str(glm4v_9b), device="cpu"), _group(rank, 2)).model.named_parameters())
    layer = "transformer.encoder.layers.0"
    qkv = full[f"{layer}.self_attention.query_key_value.weight"]  # [4 Q heads | 2 K | 2 V] x 16 rows
    q, k, v = qkv[:64], qkv[64:96], qkv[96:128]
    expected = torch.cat([q[rank * 32:(rank + 1) * 32], k[rank * 16:(rank + 1) * 16], v[rank * 16:(rank + 1) * 16]])
    assert torch.equal(shard[f"{layer}.self_attention.query_key_value.weight"], expected)
    bias = full[f"{layer}.self_attention.query_key_value.bias"]
    assert torch.equal(shard[f"{layer}.self_attention.query_key_value.bias"],
                       torch.cat([bias[rank * 32:(rank + 1) * 32], bias[64 + rank * 16:64 + (rank + 1) * 16],
                                  bias[96 + rank * 16:96 + (rank + 1) * 16]]))
    gate_up = full[f"{layer}.mlp.dense_h_to_4h.weight"]  # [gate 96 | up 96]
    assert torch.equal(shard[f"{layer}.mlp.dense_h_to_4h.weight"],
                       torch.cat([gate_up[rank * 48:(rank + 1) * 48], gate_up[96 + rank * 48:96 + (rank + 1) * 48]]))
    assert torch.equal(shard[f"{layer}.mlp.dense_4h_to_h.weight"],
                       full[f"{layer}.mlp.dense_4h_to_h.weight"][:, rank * 48:(rank + 1) * 48])


def test_kv_heads_replicate_where_fewer_than_ranks() -> None:
    split = HeadSplit("tiny", num_heads=8, num_kv_heads=2, head_dim=4, size=4)
    # ranks 0, 1 hold query heads 0-3, which read KV head 0; ranks 2, 3 hold heads 4-7, which read KV head 1
    assert [split.kv_rows(rank) for rank in range(4)] == [(0, 4), (0, 4), (4, 8), (4, 8)]
    assert [split.q_rows(rank) for rank in range(4)] == [(0, 8), (8, 16), (16, 24), (24, 32)]


def test_head_counts_that_do_not_split_are_refused() -> None:
    with pytest.raises(TensorParallelError, match="6 attention heads do not split over --tensor-parallel-size 4"):
        HeadSplit("tiny", num_heads=6, num_kv_heads=2, head_dim=4, size=4)
    with pytest.raises(TensorParallelError, match="3 KV heads"):
        HeadSplit("tiny", num_heads=12, num_kv_heads=3, head_dim=4, size=2)


def test_dummy_load_format_fills_every_shard_without_reading_weights(llava: Path) -> None:
    shard = load_shard(ModelConfig(model=str(llava), device="cpu", load_format="dummy"), _group(1, 2))
    params = dict(shard.model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    assert params["model.language_model.layers.0.self_attn.q_proj.weight"].shape == (32, 64)
    assert torch.equal(params["model.language_model.norm.weight"], torch.ones(64))


def test_cross_attention_families_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}), encoding="utf-8")
    with pytest.raises(TensorParallelError, match="mllama cannot be sharded by --tensor-parallel-size: its cross"):
        check_supported(tmp_path, 2, trust_remote_code=False)
