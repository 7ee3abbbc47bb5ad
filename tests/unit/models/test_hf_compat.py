"""Each transformers internal vlmserve relies on (vlmserve/models/hf_compat.py), checked on the installed version.

CI runs this file on both ends of the supported transformers range; a failure here names the internal that moved.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vlmserve.models import hf_compat


def _tiny_llama(**overrides: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_a_registered_attention_receives_the_calls_and_can_reproduce_sdpa() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = _tiny_llama(attn_implementation="sdpa")
    ids = torch.tensor([[3, 7, 11, 5, 9]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    calls: list[tuple[int, tuple[int, ...]]] = []

    def recording(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append((int(module.layer_idx), tuple(query.shape)))
        return sdpa_attention_forward(module, query, *args, **kwargs)

    hf_compat.register_attention("vlmserve_test_recording", recording)
    assert hf_compat.attention_name(model.model.config) == "sdpa"
    hf_compat.use_attention(model.model.config, "vlmserve_test_recording")
    assert hf_compat.attention_name(model.model.config) == "vlmserve_test_recording"
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert calls == [(0, (1, 4, 5, 8)), (1, (1, 4, 5, 8))]  # (batch, heads, tokens, head_dim), per layer
    torch.testing.assert_close(got, expected)
    assert hf_compat.attention_function(model.config, sdpa_attention_forward) is recording


def test_attention_function_falls_back_to_eager() -> None:
    def eager(*args: Any) -> None:
        return None

    assert hf_compat.attention_function(SimpleNamespace(_attn_implementation="eager"), eager) is eager


def test_the_cache_travels_under_this_versions_name() -> None:
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model = _tiny_llama()
    with torch.no_grad():
        output = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    cache = hf_compat.output_cache(output)
    assert isinstance(cache, Cache) and cache.get_seq_length() == 3  # a real model's output, under cache_name()
    built = hf_compat.with_cache(CausalLMOutputWithPast, cache, logits=output.logits)
    assert hf_compat.output_cache(built) is cache and built.logits is output.logits
    kwargs: dict[str, Any] = {"cache": cache, "other": 1}
    assert hf_compat.cache_argument(None, kwargs) is cache and kwargs == {"other": 1}
    assert hf_compat.cache_argument(cache, {}) is cache


def test_generate_hands_a_port_its_cache_under_either_name() -> None:
    """A model forward taking `past_key_values` still gets the cache `generate` passes (as `cache` from 5.25)."""
    model = _tiny_llama()
    seen: list[int] = []
    original = model.forward

    def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        cache = hf_compat.cache_argument(past_key_values, kwargs)
        seen.append(0 if cache is None else cache.get_seq_length())
        return original(*args, **{hf_compat.cache_name(): cache}, **kwargs)

    forward.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]  # generate checks kwargs
    model.forward = forward  # type: ignore[method-assign]
    with torch.no_grad():
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen == [0, 3, 4]  # prefill, then each decode step sees the growing cache


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_causal_mask_takes_the_cache_under_its_name(implementation: str) -> None:
    from transformers.cache_utils import DynamicCache

    model = _tiny_llama(attn_implementation=implementation)
    config = model.config
    cache = DynamicCache(config=config)
    embeds = torch.zeros(1, 4, config.hidden_size)
    mask = hf_compat.causal_mask(config=config, inputs_embeds=embeds, attention_mask=torch.ones(1, 4, dtype=torch.long),
                                 cache_value=cache, position_ids=torch.arange(4)[None])
    if mask is None:  # sdpa may skip the mask and use is_causal
        assert implementation == "sdpa"
        return
    allowed = mask[0, 0] == 0 if mask.dtype != torch.bool else mask[0, 0]
    assert torch.equal(allowed, torch.ones(4, 4, dtype=torch.bool).tril())


def test_rope_index_gives_mrope_rows_and_the_decode_delta() -> None:
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)
    base = Qwen2VLModel(config).eval()
    ids = torch.tensor([[1, 2, 62, 60, 60, 60, 60, 63, 3]])  # a 4x4-patch image: 2x2 tokens after merging
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": torch.tensor([[1, 4, 4]]),
              "mm_token_type_ids": (ids == 60).long(), "pixel_values": torch.zeros(16, 3 * 2 * 14 * 14)}
    positions, delta = hf_compat.rope_index(base, inputs)
    assert positions.shape == (3, 9)
    assert positions[:, :3].tolist() == [[0, 1, 2]] * 3  # text: the same position on every row
    assert positions[:, 3:7].tolist() == [[3, 3, 3, 3], [3, 3, 4, 4], [3, 4, 3, 4]]  # t, h, w of the 2x2 grid
    assert positions[:, 7:].tolist() == [[5, 6]] * 3
    assert delta == int(positions.max()) + 1 - ids.shape[1]


def test_deepstack_features_are_one_tensor_per_layer() -> None:
    a, b = torch.ones(2, 4), torch.zeros(3, 4)
    per_image = SimpleNamespace(deepstack_features=[(a, b), (b, a)])  # 5.25: per layer, one tensor per image
    per_layer = SimpleNamespace(deepstack_features=[torch.cat([a, b]), torch.cat([b, a])])  # 5.17
    for output in (per_image, per_layer):
        layers = hf_compat.deepstack_features(output)
        assert layers is not None and [t.shape for t in layers] == [(5, 4), (5, 4)]
        assert torch.equal(layers[0], torch.cat([a, b]))
    assert hf_compat.deepstack_features(SimpleNamespace(pooler_output=a)) is None


def test_granite4_vision_layer_features_follow_its_config_and_decoder() -> None:
    from transformers import Granite4VisionConfig
    from transformers.models.granite4_vision.modeling_granite4_vision import Granite4VisionTextModel

    config = Granite4VisionConfig(text_config={"num_hidden_layers": 6}, deepstack_layer_map=[[-1, 4], [0, 9]],
                                  spatial_target_layers=[2, 4, -1, 0])
    assert hf_compat.injection_layers(config) == (0, 2, 4)  # sorted, once each, only layers the decoder has
    a, b, c = torch.ones(2, 4), torch.zeros(1, 4), torch.full((3, 4), 2.0)
    output = SimpleNamespace(deepstack_features=[(4, [a, b]), (2, [c]), (4, [c])])  # (layer, one per image)
    by_layer = hf_compat.features_by_layer(output)
    assert set(by_layer) == {2, 4} and torch.equal(by_layer[4], c)  # the last pair for a layer wins, as in forward
    mask = torch.tensor([[False, True, True, True]])
    kwargs = hf_compat.layer_feature_kwargs((2, 4), mask, [c, c])
    assert kwargs["vision_mask"].shape == (1, 4, 1) and list(kwargs["deepstack_features"]) == [2, 4]
    assert {"vision_mask", "deepstack_features"} <= inspect.signature(Granite4VisionTextModel.forward).parameters.keys()
    with pytest.raises(RuntimeError, match="injection layers"):
        hf_compat.layer_feature_kwargs((2, 4), mask, [c])


def test_logit_scale_follows_the_installed_forward() -> None:
    class Scaled:
        config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(logit_scale=0.5))

        def forward(self, hidden: Any) -> Any:
            return hidden * self.config.get_text_config().logit_scale

    class Unscaled(Scaled):
        def forward(self, hidden: Any) -> Any:
            return hidden

    assert hf_compat.logit_scale(Scaled()) == 0.5
    assert hf_compat.logit_scale(Unscaled()) is None
    assert hf_compat.logit_scale(_tiny_llama()) is None  # no logit_scale in the config


@pytest.mark.parametrize("model", ["LlavaNextVideoModel", "LlavaOnevisionModel"])
def test_video_features_take_one_videos_frames_under_this_versions_name(model: str) -> None:
    get_video_features = hf_compat.transformers_class(model).get_video_features
    frames = torch.zeros(1, 2, 3, 8, 8)
    (name, value), = hf_compat.video_features_inputs(get_video_features, frames).items()
    assert value is frames
    inspect.signature(get_video_features).bind(None, **{name: value})  # binds: the name is the one it requires


def test_video_newline_is_read_from_the_installed_get_video_features() -> None:
    import transformers
    from packaging.version import Version

    onevision = hf_compat.transformers_class("LlavaOnevisionModel").get_video_features
    assert hf_compat.video_features_end_with_newline(onevision) == (Version(transformers.__version__) >= Version("5.25"))
    assert not hf_compat.video_features_end_with_newline(hf_compat.transformers_class(
        "LlavaNextVideoModel").get_video_features)


def test_processor_internals() -> None:
    processor_cls = hf_compat.transformers_class("Qwen2VLProcessor")
    assert processor_cls.__name__ == "Qwen2VLProcessor" and "image_processor" in processor_cls.get_attributes()
    with pytest.raises(ImportError):
        hf_compat.transformers_class("NoSuchProcessor")
    assert hf_compat.processor_class_name("qwen2_vl") == "Qwen2VLProcessor"
    assert hf_compat.processor_class_name("no_such_model") is None
    pil = hf_compat.pil_image_processor_class("qwen2_vl", "Qwen2VLImageProcessorFast")
    assert pil is not None and pil.__name__ == "Qwen2VLImageProcessorPil"
    assert hf_compat.pil_image_processor_class("no_such_model", "X") is None
    video = hf_compat.placeholder_video_processor()
    assert type(video).__name__ == "BaseVideoProcessor"


def test_pixtral_processor_imports_without_torchvision_beside_its_pil_twin() -> None:
    """Mistral 3's processor module takes a helper from the torchvision image processor module; the Pil module's
    function of the same name must be the same code (checked where torchvision imports) and stand in otherwise."""
    import sys

    from transformers.models.pixtral import image_processing_pil_pixtral as pil
    from transformers.utils import is_torchvision_available

    processor_cls = hf_compat.transformers_class("PixtralProcessor")
    module = sys.modules[processor_cls.__module__]
    helper = module.get_resize_output_image_size
    if is_torchvision_available():
        from transformers.models.pixtral import image_processing_pixtral as torchvision_module

        assert helper is torchvision_module.get_resize_output_image_size
        assert inspect.getsource(helper) == inspect.getsource(pil.get_resize_output_image_size)
        assert inspect.getsource(torchvision_module._num_image_tokens) == inspect.getsource(pil._num_image_tokens)
    else:
        assert helper is pil.get_resize_output_image_size
        assert "transformers.models.pixtral.image_processing_pixtral" not in sys.modules  # only while importing


# --- hybrid decoders ------------------------------------------------------------------------------------------

def _tiny_qwen3_5_text() -> Any:
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextModel

    config = Qwen3_5TextConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                               layer_types=["linear_attention", "full_attention", "linear_attention"],
                               linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                               linear_num_value_heads=2)
    torch.manual_seed(0)
    return Qwen3_5TextModel(config).eval()


def test_linear_attention_modules_are_the_linear_layers_token_mixers() -> None:
    decoder = _tiny_qwen3_5_text()
    modules = hf_compat.linear_attention_modules(decoder)
    assert list(modules) == [0, 2]
    assert all(modules[i] is decoder.layers[i].linear_attn for i in (0, 2))
    assert hf_compat.linear_attention_modules(_tiny_llama().model) == {}


@torch.inference_mode()
def test_gated_delta_rules_take_fla_s_convention_and_agree() -> None:
    """Both rules take (batch, tokens, heads, dim) tensors by keyword and return (output, final state); the chunked
    one over a sequence equals the token-by-token one, and resuming from a returned state continues the sequence."""
    module = hf_compat.linear_attention_modules(_tiny_qwen3_5_text())[0]
    chunk_rule, token_rule = hf_compat.gated_delta_rules(module)
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    g, beta = -torch.rand(1, 6, 2), torch.rand(1, 6, 2)
    kwargs = {"output_final_state": True, "use_qk_l2norm_in_kernel": True}
    whole, whole_state = chunk_rule(q, k, v, g=g, beta=beta, initial_state=None, **kwargs)
    first, state = chunk_rule(q[:, :4], k[:, :4], v[:, :4], g=g[:, :4], beta=beta[:, :4], initial_state=None,
                              **kwargs)
    outputs = [first]
    for t in (4, 5):
        out, state = token_rule(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g=g[:, t:t + 1],
                                beta=beta[:, t:t + 1], initial_state=state, **kwargs)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, dim=1), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(state, whole_state, atol=1e-5, rtol=0)
    assert whole.shape == (1, 6, 2, 8) and whole_state.shape == (1, 2, 8, 8)


@torch.inference_mode()
def test_visual_indicator_embeddings_are_what_ovis2_s_image_features_give_its_indicator_tokens() -> None:
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, vocab_size=64, hidden_stride=2, num_visual_indicator_tokens=5)
    text = dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2)
    indicator_ids = [120, 121, 122, 123, 124]
    config = Ovis2Config(vision_config=vision, text_config=text, image_token_id=119, hidden_size=64, vocab_size=128,
                         visual_indicator_token_ids=indicator_ids)
    torch.manual_seed(0)
    base = Ovis2ForConditionalGeneration(config).eval().model
    expected = base.get_image_features(pixel_values=torch.randn(1, 3, 32, 32), return_dict=True)
    got = hf_compat.visual_indicator_embeddings(base)
    assert list(got) == indicator_ids
    torch.testing.assert_close(torch.stack(list(got.values())), expected.visual_indicator_features)


def test_a_registered_experts_implementation_receives_the_expert_calls() -> None:
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextModel

    config = Qwen3VLMoeTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  num_experts=4, num_experts_per_tok=2)
    model = Qwen3VLMoeTextModel(config).eval()
    experts = hf_compat.experts_modules(model)
    assert len(experts) == 2 and all(hasattr(m, "gate_up_proj") for m in experts)
    calls: list[tuple[int, ...]] = []

    def recording(module: Any, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(index.shape))
        return torch.zeros_like(hidden)

    hf_compat.register_experts("vlmserve_test_experts", recording)
    hf_compat.use_experts(model, "vlmserve_test_experts")
    assert {hf_compat.experts_name(m) for m in experts} == {"vlmserve_test_experts"}
    with torch.no_grad():
        model(inputs_embeds=torch.randn(1, 3, 32))
    assert calls == [(3, 2), (3, 2)]
