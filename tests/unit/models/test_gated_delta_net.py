"""Qwen3.5's gated delta-net layer on packed ragged steps equals the layer's own forward over whole sequences.

Two sequences are fed the way the paged engine feeds them: prompt chunks of both in one step, the rest of one
prompt resumed from its carried state, then both decoding a token in one batched step; every output row must equal
the module's own forward over the sequence in one piece (from a zero state, as `generate`'s prefill runs it).
"""

from __future__ import annotations

import pytest
import torch

from vlmserve.models import gated_delta_net, hf_compat


@pytest.fixture(scope="module")
def decoder() -> torch.nn.Module:
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextModel

    config = Qwen3_5TextConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                               layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                               linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                               linear_num_value_heads=4)
    torch.manual_seed(0)
    model = Qwen3_5TextModel(config).eval()
    with torch.no_grad():  # outputs of order 1, so that the absolute tolerance below means something
        model.layers[0].linear_attn.out_proj.weight.mul_(100)
    return model


def test_layout_names_the_linear_layers_and_their_state(decoder: torch.nn.Module) -> None:
    layout = gated_delta_net.recurrent_layout(decoder)
    assert layout is not None
    assert layout.layers == (0,)
    assert layout.conv_shape == (2 * 2 * 8 + 4 * 8, 3)  # q, k (2 heads of 8) and v (4 heads of 8); kernel 4
    assert layout.state_shape == (4, 8, 8)


@torch.inference_mode()
def test_packed_steps_equal_the_whole_sequence_forward(decoder: torch.nn.Module) -> None:
    module = hf_compat.linear_attention_modules(decoder)[0]
    layout = gated_delta_net.recurrent_layout(decoder)
    assert layout is not None
    torch.manual_seed(1)
    a, b = torch.randn(10, 32), torch.randn(6, 32)
    expected_a = module(hidden_states=a.unsqueeze(0))[0]
    expected_b = module(hidden_states=b.unsqueeze(0))[0]

    conv = torch.zeros(2, *layout.conv_shape)
    state = torch.zeros(2, *layout.state_shape)
    # step 1: a's first 6 prompt rows and b's 5 prompt rows
    out1, conv1, state1 = gated_delta_net.packed_forward(module, torch.cat([a[:6], b[:5]]), [(0, 6), (6, 11)],
                                                         conv, state)
    # step 2: the rest of a's prompt, resumed from its state
    out2, conv2, state2 = gated_delta_net.packed_forward(module, a[6:9], [(0, 3)], conv1[:1], state1[:1])
    # step 3: one decode row each, as one batch
    out3, _, _ = gated_delta_net.packed_forward(module, torch.stack([a[9], b[5]]), [(0, 1), (1, 2)],
                                                torch.cat([conv2, conv1[1:]]), torch.cat([state2, state1[1:]]))
    got_a = torch.cat([out1[:6], out2, out3[:1]])
    got_b = torch.cat([out1[6:], out3[1:]])
    torch.testing.assert_close(got_a, expected_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_b, expected_b, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_a_carried_state_matters(decoder: torch.nn.Module) -> None:
    """Resuming from zeros instead of the carried state gives different rows (the test above could not pass by
    ignoring the state)."""
    module = hf_compat.linear_attention_modules(decoder)[0]
    layout = gated_delta_net.recurrent_layout(decoder)
    assert layout is not None
    torch.manual_seed(2)
    a = torch.randn(8, 32)
    expected = module(hidden_states=a.unsqueeze(0))[0]
    zeros_conv, zeros_state = torch.zeros(1, *layout.conv_shape), torch.zeros(1, *layout.state_shape)
    _, conv, _ = gated_delta_net.packed_forward(module, a[:5], [(0, 5)], zeros_conv, zeros_state)
    wrong, _, _ = gated_delta_net.packed_forward(module, a[5:], [(0, 3)], conv, zeros_state)
    assert expected.abs().max() > 0.1
    assert (wrong - expected[5:]).abs().max() > 1e-2
