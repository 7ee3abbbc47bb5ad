"""The port's vision tower, resampler, rotary, decoder block and full forward against float64 references.

The references (`qwen_vl_chat_reference.py`) are written from the published description and read only the raw
checkpoint tensors and config.json, so they share no code with the port.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from qwen_vl_chat_reference import (
    block_reference,
    logits_reference,
    ntk_alpha,
    resampler_reference,
    rotate,
    sincos_entry,
    vision_reference,
)

from tests.fixtures.tiny.qwen_vl_chat import build_qwen_vl_chat
from vlmserve.models.qwen_vl_chat.adapter import load
from vlmserve.models.qwen_vl_chat.modeling import apply_rotary, dynamic_ntk_alpha, logn_scale
from vlmserve.models.qwen_vl_chat.visual import sincos_2d_table


def close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Agreement relative to the reference's scale (float32 port vs float64 reference)."""
    scale = reference.abs().max().item()
    error = (ours.double() - reference).abs().max().item()
    assert error <= tolerance * scale, f"max error {error:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def config(qwen_vl_chat_dir: Path) -> dict[str, Any]:
    return json.loads((qwen_vl_chat_dir / "config.json").read_text())


def test_resampler_positions_are_the_2d_sincos_table(qwen_vl_chat_state: dict[str, torch.Tensor]) -> None:
    stored = qwen_vl_chat_state["transformer.visual.attn_pool.pos_embed"]
    dim = stored.shape[1]
    assert torch.equal(torch.from_numpy(sincos_2d_table(dim, 16)), stored)
    for row, col, channel in [(0, 0, 0), (3, 7, 5), (15, 2, dim // 4 + 1), (9, 11, dim // 2 + 3), (5, 5, dim - 1)]:
        assert stored[row * 16 + col, channel].item() == pytest.approx(sincos_entry(dim, 16, row, col, channel),
                                                                       abs=1e-6)


def test_vision_tower_matches_reference(qwen_vl_chat_adapter: Any, config: dict[str, Any],
                                        qwen_vl_chat_state: dict[str, torch.Tensor]) -> None:
    size = config["visual"]["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = torch.stack(qwen_vl_chat_adapter.model.get_image_features(pixels))
    assert ours.shape == (2, 256, config["hidden_size"])
    close(ours, vision_reference(qwen_vl_chat_state, config["visual"], pixels))


def test_resampler_matches_reference(qwen_vl_chat_adapter: Any, config: dict[str, Any],
                                     qwen_vl_chat_state: dict[str, torch.Tensor]) -> None:
    patches = torch.randn(2, 16, config["visual"]["width"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = qwen_vl_chat_adapter.model.transformer.visual.attn_pool(patches)
    reference = torch.stack([resampler_reference(qwen_vl_chat_state, "transformer.visual.attn_pool.", x.double())
                             for x in patches])
    close(ours, reference)


@pytest.mark.parametrize(("rotary_dim", "alpha"), [(32, 1.0), (16, 1.0), (32, 7.0)])
def test_rotary_matches_pairwise_rotation(rotary_dim: int, alpha: float) -> None:
    head_dim, base = 32, 10000.0
    positions = [0, 1, 5, 100, 2047, 3000]
    x = torch.randn(1, 2, len(positions), head_dim, generator=torch.Generator().manual_seed(3))
    d = rotary_dim
    inv_freq = 1.0 / (base * alpha ** (d / (d - 2))) ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.tensor(positions, dtype=torch.float32)[None, :, None] * inv_freq
    table = torch.cat([freqs, freqs], -1)
    ours = apply_rotary(x, table.cos(), table.sin())
    for head in range(2):
        expected = rotate(x[0, head].double(), positions, base * alpha ** (d / (d - 2)), d)
        # float32 angles (as in the original) carry ~1e-4 absolute error at position 3000
        close(ours[0, head], expected, 1e-4)


def test_ntk_and_logn_factors_follow_the_original_formulas() -> None:
    for length in (1, 2048, 2049, 4096, 4097, 8192, 20000):
        assert dynamic_ntk_alpha(length, 2048) == ntk_alpha(length, 2048)
    assert dynamic_ntk_alpha(4096, 2048) == 3.0 and dynamic_ntk_alpha(4097, 2048) == 7.0
    scale = logn_scale(torch.tensor([[0, 2046, 2047, 2048, 4095]]), 2048)
    expected = [1.0, 1.0, 1.0, torch.log(torch.tensor(2049.0)) / torch.log(torch.tensor(2048.0)), 12 / 11]
    close(scale[0], torch.tensor(expected, dtype=torch.float64), 1e-6)


@pytest.mark.parametrize("first_position", [0, 2040])  # 2040: logn scaling starts inside the sequence
def test_decoder_block_matches_reference(qwen_vl_chat_adapter: Any, config: dict[str, Any],
                                         qwen_vl_chat_state: dict[str, torch.Tensor], first_position: int) -> None:
    transformer = qwen_vl_chat_adapter.model.transformer
    positions = list(range(first_position, first_position + 24))
    x = torch.randn(1, 24, config["hidden_size"], generator=torch.Generator().manual_seed(4))
    rows = torch.tensor([positions])
    with torch.no_grad():
        ours = transformer.h[1](x, position_embeddings=transformer.rotary_emb(rows),
                                query_scale=logn_scale(rows, config["seq_length"]), attention_mask=None)
    close(ours[0], block_reference(qwen_vl_chat_state, config, 1, x[0].double(), positions))


def _two_image_prompt(adapter: Any) -> tuple[dict[str, torch.Tensor], list[int]]:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare these"},
                                                 {"type": "image"}, {"type": "text", "text": " two images."}]}]
    text = adapter.processor.apply_chat_template(conversation, add_generation_prompt=True)
    size = adapter.processor.image_size
    images = [torch.rand(size, size, 3, generator=torch.Generator().manual_seed(s)).mul(255).to(torch.uint8).numpy()
              for s in (5, 6)]
    inputs = adapter.processor(text=[text], images=images, return_tensors="pt")
    return inputs, inputs["input_ids"][0].tolist()


def test_full_forward_with_two_images_matches_reference(qwen_vl_chat_adapter: Any, config: dict[str, Any],
                                                        qwen_vl_chat_state: dict[str, torch.Tensor]) -> None:
    inputs, ids = _two_image_prompt(qwen_vl_chat_adapter)
    with torch.no_grad():
        ours = qwen_vl_chat_adapter.model(**inputs).logits[0]
    close(ours, logits_reference(qwen_vl_chat_state, config, ids, inputs["pixel_values"]))


@pytest.fixture(scope="module")
def short_context(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint with seq_length 64, so that dynamic NTK and logn scaling act on short prompts."""
    from safetensors.torch import load_file

    path = build_qwen_vl_chat(tmp_path_factory.mktemp("qwen_vl_chat_short"), seed=3, seq_length=64)
    state: dict[str, torch.Tensor] = {}
    for file in path.glob("model-*.safetensors"):
        state.update(load_file(file))
    adapter = load(path, device="cpu", dtype=torch.float32, max_model_len=None)
    return adapter, json.loads((path / "config.json").read_text()), state


def test_long_prompt_with_image_applies_ntk_and_logn(short_context: Any) -> None:
    adapter, config, state = short_context
    inputs, ids = _two_image_prompt(adapter)
    assert ntk_alpha(len(ids), 64) > 1
    with torch.no_grad():
        ours = adapter.model(**inputs).logits[0]
    close(ours, logits_reference(state, config, ids, inputs["pixel_values"]))


def test_decode_keeps_the_prefill_ntk_factor(short_context: Any) -> None:
    adapter, config, state = short_context
    ids = torch.randint(0, 300, (1, 128), generator=torch.Generator().manual_seed(7)).tolist()[0]
    next_id = 42
    assert (ntk_alpha(128, 64), ntk_alpha(129, 64)) == (3, 7)  # the step crosses an NTK boundary
    with torch.no_grad():
        prefill = adapter.model(input_ids=torch.tensor([ids]), use_cache=True)
        step = adapter.model(input_ids=torch.tensor([[next_id]]), past_key_values=prefill.past_key_values,
                             position_ids=torch.tensor([[128]]), use_cache=True).logits[0, -1]
    kept = logits_reference(state, config, [*ids, next_id], alpha=3)[-1]
    recomputed = logits_reference(state, config, [*ids, next_id], alpha=7)[-1]
    close(step, kept)
    assert (step.double() - recomputed).abs().max() > 1e-3 * recomputed.abs().max()


def test_bfloat16_model_runs_and_stays_close_to_float32(qwen_vl_chat_dir: Path, qwen_vl_chat_adapter: Any) -> None:
    bf16 = load(qwen_vl_chat_dir, device="cpu", dtype=torch.bfloat16, max_model_len=None)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    inputs, _ = _two_image_prompt(bf16)
    with torch.no_grad():
        low = bf16.model(**inputs).logits[0]
        full = qwen_vl_chat_adapter.model(**inputs).logits[0]
        generated = bf16.model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert low.dtype == torch.bfloat16 and generated.shape[1] == inputs["input_ids"].shape[1] + 3
    close(low.float(), full.double(), 5e-2)
