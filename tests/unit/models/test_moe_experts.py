"""vlmserve.models.moe_experts against transformers' own MoE blocks: same router, experts computed by transformers'
loop over experts ("eager") vs our grouped GEMMs (torch's grouped matmul and the padded batched-matmul fallback).

Inputs are random, with some experts steered to receive no token at all (empty groups) and some to receive many.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vlmserve.models import hf_compat, moe_experts

TOLERANCE = 1e-5
NUM_EXPERTS = 8
STARVED = (5, 6, 7)  # experts whose router row points away from every input: they get no token


def _qwen3_vl_moe_block() -> Any:
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    config = Qwen3VLMoeTextConfig(hidden_size=32, moe_intermediate_size=16, num_experts=NUM_EXPERTS,
                                  num_experts_per_tok=3)
    return Qwen3VLMoeTextSparseMoeBlock(config)


def _glm4v_moe_block() -> Any:
    from transformers.models.glm4v_moe.configuration_glm4v_moe import Glm4vMoeTextConfig
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextMoE

    config = Glm4vMoeTextConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=NUM_EXPERTS,
                                num_experts_per_tok=3, n_group=2, topk_group=2, n_shared_experts=1,
                                routed_scaling_factor=2.5)
    return Glm4vMoeTextMoE(config)


BLOCKS = {"qwen3_vl_moe": _qwen3_vl_moe_block, "glm4v_moe": _glm4v_moe_block}


def _randomised(block: Any, seed: int) -> Any:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        # every input has a large positive first feature; the starved experts' router rows weigh it negatively
        block.gate.weight[list(STARVED), 0] = -50.0
    return block.eval()


def _inputs(tokens: int, seed: int) -> torch.Tensor:
    hidden = torch.randn(1, tokens, 32, generator=torch.Generator().manual_seed(seed))
    hidden[..., 0] = hidden[..., 0].abs() + 2.0
    return hidden


def _routed(block: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, weights, index = block.gate(hidden.reshape(-1, hidden.shape[-1]))
    return index, weights


def _outputs(block: Any, hidden: torch.Tensor, implementation: str) -> torch.Tensor:
    block.experts.config._experts_implementation = implementation
    with torch.no_grad():
        return block(hidden)


@pytest.fixture(autouse=True, scope="module")
def _registered() -> None:
    hf_compat.register_experts(moe_experts.EXPERTS_NAME, moe_experts.grouped_experts_forward)


@pytest.mark.parametrize("method", ["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("family", sorted(BLOCKS))
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_grouped_experts_equal_transformers_loop(family: str, method: str, tokens: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    block = _randomised(BLOCKS[family](), seed=tokens)
    hidden = _inputs(tokens, seed=tokens + 1)
    index, _ = _routed(block, hidden)
    assert not set(index.flatten().tolist()) & set(STARVED)  # empty groups are really exercised
    if tokens == 64:
        assert index.flatten().bincount(minlength=NUM_EXPERTS).max() >= 16  # and long ones

    expected = _outputs(block, hidden, "eager")
    monkeypatch.setattr(moe_experts, "grouped_method", lambda weight: method)
    got = _outputs(block, hidden, moe_experts.EXPERTS_NAME)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert (got - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("method", ["grouped_mm", "padded_bmm"])
def test_each_expert_contributes_with_its_own_routing_weight(method: str) -> None:
    """Direct check of the formula: token t's output is sum_k w[t,k] * expert_{idx[t,k]}(x_t), including a token
    routed twice to the same expert and experts nobody chose."""
    experts = _randomised(_qwen3_vl_moe_block(), seed=3).experts
    hidden = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    index = torch.tensor([[0, 2, 4], [2, 2, 1], [4, 0, 3], [1, 0, 2]])
    weights = torch.rand(4, 3, generator=torch.Generator().manual_seed(5))

    def expert(e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (experts.gate_up_proj[e] @ x).chunk(2)
        return experts.down_proj[e] @ (experts.act_fn(gate) * up)

    expected = torch.stack([sum(weights[t, k] * expert(int(index[t, k]), hidden[t]) for k in range(3))
                            for t in range(4)])
    with torch.no_grad():
        got = moe_experts.grouped_experts_forward(experts, hidden, index, weights, method=method)
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_a_wrong_routing_weight_is_caught() -> None:
    """The comparison above is sensitive to routing: the same experts with the k weights of each token rotated
    (every token still sums to the same total weight) differ from the model's loop well beyond the tolerance."""
    block = _randomised(_qwen3_vl_moe_block(), seed=7)
    hidden = _inputs(16, seed=8)
    expected = _outputs(block, hidden, "eager")
    flat = hidden.reshape(-1, 32)
    index, weights = _routed(block, hidden)
    with torch.no_grad():
        mutated = moe_experts.grouped_experts_forward(block.experts, flat, index, weights.roll(1, dims=-1))
        correct = moe_experts.grouped_experts_forward(block.experts, flat, index, weights)
    assert (correct - expected.reshape(-1, 32)).abs().max().item() <= TOLERANCE
    assert (mutated - expected.reshape(-1, 32)).abs().max().item() > 100 * TOLERANCE


def test_bfloat16_stays_close_to_the_loop() -> None:
    block = _randomised(_qwen3_vl_moe_block(), seed=9).to(torch.bfloat16)
    hidden = _inputs(32, seed=10).to(torch.bfloat16)
    expected = _outputs(block, hidden, "eager").float()
    got = _outputs(block, hidden, moe_experts.EXPERTS_NAME).float()
    assert (got - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()


def test_offsets_mark_empty_groups() -> None:
    sorted_ids = torch.tensor([0, 0, 2, 2, 2, 5])
    assert moe_experts.expert_offsets(sorted_ids, 7).tolist() == [2, 2, 5, 5, 5, 6, 6]


def test_install_switches_every_expert_module_of_a_model() -> None:
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  deepstack_visual_indexes=[0])
    model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(text_config=text, vision_config=vision))
    modules = hf_compat.experts_modules(model)
    assert len(modules) == 2
    assert moe_experts.install_grouped_experts(model) == 2
    assert {hf_compat.experts_name(m) for m in modules} == {moe_experts.EXPERTS_NAME}
    hf_compat.use_experts(model, "eager")  # and back: the bench measures transformers' loop on the same model
    assert {hf_compat.experts_name(m) for m in modules} == {"eager"}


def test_install_leaves_layouts_it_does_not_handle() -> None:
    block = _qwen3_vl_moe_block()
    block.experts.has_bias = True
    assert not moe_experts.supported(block.experts)
    assert moe_experts.supported(_qwen3_vl_moe_block().experts)
