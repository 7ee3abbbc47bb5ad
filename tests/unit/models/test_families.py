"""The paged allow-list (models/families.py): what is on it, what is refused and why, and that the head is the
model's own — shown on a tiny Granite-4 Vision, whose head divides by `logits_scaling` and whose decoder takes
vision features before several of its layers (a family the old deny-list let through to the paged engine with
both dropped)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from tests.fixtures.tiny.registry import FAMILIES
from vlmserve.errors import InvalidRequestError
from vlmserve.models.families import FAMILY_SPECS, REFUSED, bidirectional_blocks, own_head, refusal
from vlmserve.models.hf import HFAdapter
from vlmserve.types import PreparedPrompt


def test_every_tiny_family_with_a_blocker_or_extras_is_off_the_allow_list() -> None:
    for name, family in FAMILIES.items():
        if family.paged_blocker or (family.recipe_extras and name not in {*BIDIRECTIONAL, *CROSS_ATTENTION}):
            assert name not in FAMILY_SPECS, name
            assert refusal(name) is not None
    assert not FAMILY_SPECS.keys() & REFUSED.keys()


#: families whose recipe extras are their bidirectional blocks, which the paged attention implements
BIDIRECTIONAL = {"gemma3": "image_runs", "paligemma": "prefix"}
#: families whose recipe extras are cross-attention layers over per-request K/V (models/cross_attention.py)
CROSS_ATTENTION = {"mllama"}


def test_cross_attention_families_carry_their_flag() -> None:
    for name in CROSS_ATTENTION:
        assert FAMILY_SPECS[name].cross_attention and refusal(name) is None
    assert not any(spec.cross_attention for name, spec in FAMILY_SPECS.items() if name not in CROSS_ATTENTION)


def test_bidirectional_families_carry_their_rule() -> None:
    for name, rule in BIDIRECTIONAL.items():
        assert FAMILY_SPECS[name].bidirectional == rule and refusal(name) is None
    assert FAMILY_SPECS["paligemma"].position_offset == 1 and FAMILY_SPECS["paligemma"].blocks_spare_window
    assert not FAMILY_SPECS["gemma3"].blocks_spare_window


def test_bidirectional_blocks_follow_transformers_rules() -> None:
    types = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 0, 1, 1]])
    # Gemma 3: each run of image tokens (type 1) is a block
    assert bidirectional_blocks("image_runs", types) == ((2, 5), (6, 7), (8, 10))
    # PaliGemma: every type-0 token (at inference: the whole prompt) is one block
    assert bidirectional_blocks("prefix", torch.zeros(1, 6, dtype=torch.long)) == ((0, 6),)
    assert bidirectional_blocks("prefix", torch.tensor([0, 0, 0, 1, 1])) == ((0, 3),)
    with pytest.raises(InvalidRequestError, match="not one run"):
        bidirectional_blocks("prefix", types)
    # without token_type_ids (a prompt of token ids only) the model's own forward is causal too
    assert bidirectional_blocks("image_runs", None) == () and bidirectional_blocks("none", types) == ()


def test_an_unknown_family_is_refused_with_a_reason() -> None:
    assert "allow-list" in (refusal("some_new_vlm") or "")
    assert refusal("qwen2_vl") is None
    assert refusal("qwen3_vl") is None  # deepstack is packed per step
    assert refusal("granite4_vision") is None  # its layer features are packed per step too


def test_a_spec_with_unimplemented_extras_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dataclasses.replace(FAMILY_SPECS["llava"], extras=("deepstack", "cross_attention_states"))
    monkeypatch.setitem(FAMILY_SPECS, "llava", spec)
    reason = refusal("llava") or ""
    assert "cross_attention_states" in reason and "deepstack" not in reason


@pytest.fixture(scope="module")
def granite4_vision() -> Any:
    from transformers import Granite4VisionConfig, Granite4VisionForConditionalGeneration

    # NOTE: vision and Q-Former widths of 64: transformers 5.25 derives the Q-Former's heads as vision width // 64
    # (5.17 takes the given config), so narrower towers give it zero heads.
    config = Granite4VisionConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        text_config={"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "logits_scaling": 8.0,
                     "embedding_multiplier": 12.0},
        qformer_config={"model_type": "blip_2_qformer", "num_hidden_layers": 1, "intermediate_size": 64,
                        "hidden_size": 64, "num_attention_heads": 1, "encoder_hidden_size": 64,
                        "use_qformer_text_input": False, "cross_attention_frequency": 1},
        image_token_index=95, deepstack_layer_map=[[0, 0], [1, 1]], spatial_target_layers=[0, 1, 0, 1],
        downsample_rate="1/2", image_grid_pinpoints=[[28, 56], [56, 28]], vision_feature_select_strategy="full",
        projector_dropout=0.0)
    torch.manual_seed(0)
    return Granite4VisionForConditionalGeneration(config).eval()


def test_granite4_vision_runs_paged_with_layer_features(granite4_vision: Any) -> None:
    adapter = HFAdapter(granite4_vision, None, max_model_len=64, eos_token_ids=frozenset({0}), image_token_id=95)
    assert adapter.paged_support() is None
    assert FAMILY_SPECS["granite4_vision"].extras == ("layer_features",)


@torch.inference_mode()
def test_granite4_vision_packed_layer_features_reproduce_its_forward(granite4_vision: Any) -> None:
    """The adapter's image rows ([zeros | features before each injection layer]) handed to the decoder under the
    runner's packed names give the model's own logits. This config sends three feature groups to layer 0 and
    three to layer 1: the forward keeps the last of each (it collects them in a dict), and so must we."""
    adapter = HFAdapter(granite4_vision, None, max_model_len=256, eos_token_ids=frozenset({0}), image_token_id=95)
    inputs = {"pixel_values": torch.randn(1, 3, 3, 28, 28, generator=torch.Generator().manual_seed(2)),
              "image_sizes": torch.tensor([[28, 28]])}
    features = adapter.encode_images(PreparedPrompt(token_ids=[], model_inputs=inputs))
    ids = [5, 6, *[95] * features[0].shape[0], 7, 8, 9]
    embedding = adapter.embed_prompt(PreparedPrompt(token_ids=ids, model_inputs=inputs), features)
    extras = embedding.extras
    assert extras is not None and extras["deepstack"].shape[0] == 2  # layers 0 and 1, one tensor each
    hidden = adapter.text_model(inputs_embeds=embedding.inputs_embeds[None], position_ids=embedding.positions,
                                visual_pos_masks=extras["visual_mask"][None],
                                deepstack_visual_embeds=list(extras["deepstack"])).last_hidden_state
    expected = granite4_vision(input_ids=torch.tensor([ids]), **inputs).logits[0]
    assert torch.allclose(adapter.compute_logits(hidden[0]), expected, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_the_head_is_the_models_own(granite4_vision: Any) -> None:
    """`own_head` gives exactly the logits of the model's forward (divided by logits_scaling = 8); the bare
    lm_head the generic adapter used to call does not."""
    ids = torch.randint(0, 90, (1, 10), generator=torch.Generator().manual_seed(1))
    expected = granite4_vision(input_ids=ids).logits[0]
    hidden = granite4_vision.model.language_model(input_ids=ids).last_hidden_state[0]
    assert torch.equal(own_head(granite4_vision)(hidden), expected)
    assert torch.allclose(granite4_vision.lm_head(hidden) / 8.0, expected)
    assert not torch.allclose(granite4_vision.lm_head(hidden), expected, atol=1e-2)
    assert type(granite4_vision.model).__name__ == "Granite4VisionModel"  # the pass-through lives in a copy only
