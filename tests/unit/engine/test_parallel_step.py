"""The step plan rank 0 broadcasts: every input of a forward survives the trip's packing, deepstack lists included
(the two-process round trip itself runs in tests/integration/engine/test_tensor_parallel.py)."""

from __future__ import annotations

import torch

from vlmserve.engine.attention import AttentionBatch
from vlmserve.engine.kv_cache import KVCache
from vlmserve.engine.parallel.step import EAGER, ForwardPlan, _by_dtype
from vlmserve.models.base import KVLayout


def test_plan_carries_attention_metadata_and_stacked_extras() -> None:
    cache = KVCache.allocate(KVLayout(num_layers=1, num_kv_heads=1, head_dim=4), 4, 2, dtype=torch.float32,
                             device=torch.device("cpu"))
    batch = AttentionBatch(cache=cache, slot_mapping=torch.arange(3), cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32),
                           seq_lens=torch.tensor([3], dtype=torch.int32),
                           block_tables=torch.tensor([[0, 1]], dtype=torch.int32), max_q_len=3, max_seq_len=3)
    layers = [torch.randn(2, 8), torch.randn(2, 8)]
    mask = torch.tensor([[True, False, True]])
    plan = ForwardPlan.of(EAGER, torch.randn(1, 3, 8), torch.arange(3).expand(3, 1, 3), batch,
                          {"visual_pos_masks": mask, "deepstack_visual_embeds": layers})
    rebuilt = plan.attention(cache)
    assert torch.equal(rebuilt.block_tables, batch.block_tables) and rebuilt.max_seq_len == 3
    extras = plan.extras()
    assert torch.equal(extras["visual_pos_masks"], mask)
    assert isinstance(extras["deepstack_visual_embeds"], list)
    assert all(torch.equal(a, b) for a, b in zip(extras["deepstack_visual_embeds"], layers, strict=True))
    specs = [(n, tuple(t.shape), t.dtype) for n, t in sorted(plan.tensors.items())]
    groups = _by_dtype(specs)
    # one flat buffer per dtype: float32 (embeds, deepstack), int64, int32, bool (sent as bytes)
    assert set(groups) == {torch.float32, torch.int64, torch.int32, torch.bool}
    assert sum(len(members) for members in groups.values()) == len(plan.tensors)


def test_plan_carries_bidirectional_blocks() -> None:
    # Gemma 3 / PaliGemma steps: workers must mask exactly as rank 0 does, blocks and the window rule included.
    cache = KVCache.allocate(KVLayout(num_layers=1, num_kv_heads=1, head_dim=4), 4, 2, dtype=torch.float32,
                             device=torch.device("cpu"))
    bounds = (torch.tensor([0, 1, 1], dtype=torch.int32), torch.tensor([0, 2, 2], dtype=torch.int32))
    for spare in (False, True):
        batch = AttentionBatch(cache, torch.arange(3), torch.tensor([0, 3], dtype=torch.int32),
                               torch.tensor([3], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32),
                               max_q_len=3, max_seq_len=3, block_bounds=bounds, blocks_spare_window=spare)
        rebuilt = ForwardPlan.of(EAGER, torch.randn(1, 3, 8), torch.arange(3), batch).attention(cache)
        assert rebuilt.block_bounds is not None and rebuilt.blocks_spare_window is spare
        assert all(torch.equal(a, b) for a, b in zip(rebuilt.block_bounds, bounds, strict=True))
    causal = AttentionBatch(cache, torch.arange(3), torch.tensor([0, 3], dtype=torch.int32),
                            torch.tensor([3], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32),
                            max_q_len=3, max_seq_len=3)
    assert ForwardPlan.of(EAGER, torch.randn(1, 3, 8), torch.arange(3), causal).attention(cache).block_bounds is None
