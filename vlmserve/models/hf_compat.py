"""The one place vlmserve relies on transformers internals: private names, calling conventions, renamed arguments.

Everything here moved or may move between transformers minor releases; each helper is checked by
tests/unit/models/test_hf_compat.py on the installed version, and CI runs those tests at both ends of the
supported range (pyproject.toml). Public, stable API (`AutoModel*`, `GenerationConfig`, `LogitsProcessor` ...) is
imported where it is used.

What changed inside the range (5.17 -> 5.25, read and run):
- 5.25 renamed the KV cache argument and output field `past_key_values` -> `cache` (models, `generate`,
  `create_causal_mask`, the `*OutputWithPast` classes); the old name warns (FutureWarning, an error in our tests).
- 5.25 returns Qwen3-VL's deepstack features per layer as one tensor per image, not one tensor per layer.
- 5.25's Aya Vision applies Cohere's `logit_scale` in its forward; 5.17's does not.
- 5.25 renamed LLaVA-NeXT-Video's and LLaVA-OneVision's `get_video_features(pixel_values=...)` to
  `pixel_values_videos`, and LLaVA-OneVision's now ends each video with its `image_newline` row itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

#: versions the whole engine and model suite was run on (pyproject.toml's range is drawn from these)
VERIFIED_VERSIONS = ("5.17.0", "5.25.0")


# --- attention ---------------------------------------------------------------------------------------------------

def register_attention(name: str, function: Callable[..., Any]) -> None:
    """Make `function` an attention implementation transformers' modules can dispatch to by `name`.

    The calling convention we rely on: `function(module, query, key, value, attention_mask, scaling=...,
    dropout=..., sliding_window=..., softcap=..., **kwargs)` with (batch, heads, tokens, head_dim) tensors after
    rotary and `module.layer_idx` set; it returns (output (batch, tokens, heads, head_dim), weights or None).
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(name, function)


def attention_function(config: Any, eager: Callable[..., Any]) -> Callable[..., Any]:
    """The attention function the modules built from `config` dispatch to (`eager` for "eager"): how a native
    port's attention lets the paged engine (or sdpa) take over without knowing the architecture."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)


def attention_name(config: Any) -> str | None:
    """The attention implementation the modules built from `config` use now (to put it back after a switch)."""
    return getattr(config, "_attn_implementation", None)


def use_attention(config: Any, name: str | None) -> None:
    """Switch the modules built from `config` (and only those) to the registered attention `name`.

    NOTE: `_attn_implementation` is read by every attention module at call time; the public
    `set_attn_implementation` would switch the whole model (vision tower included) and validate the name
    against the built-in ones.
    """
    config._attn_implementation = name


# --- MoE experts ---------------------------------------------------------------------------------------------------

def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The expert modules of `model` that dispatch by `config._experts_implementation` (classes decorated with
    transformers' `use_experts_implementation`, which records `has_gate` / `is_transposed` ... on each instance and
    gives the class `_apply_gate`)."""
    return [m for m in model.modules()
            if hasattr(type(m), "_apply_gate") and hasattr(m, "is_transposed") and hasattr(m, "config")]


def register_experts(name: str, function: Callable[..., Any]) -> None:
    """Make `function(module, hidden_states (tokens, hidden), top_k_index (tokens, k), top_k_weights (tokens, k))`
    an experts implementation the modules can dispatch to by `name`."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, function)


def experts_name(module: torch.nn.Module) -> str | None:
    """The experts implementation an expert module dispatches to now."""
    return getattr(getattr(module, "config", None), "_experts_implementation", None)


def use_experts(model: Any, name: str) -> None:
    """Switch every expert module of `model` (all sub-models) to the registered implementation `name` ("eager":
    transformers' loop over experts; "grouped_mm": transformers' own grouped GEMM)."""
    model.set_experts_implementation(name)


# --- the KV cache argument ----------------------------------------------------------------------------------------

@cache
def cache_name() -> str:
    """What this transformers calls the KV cache in model arguments and outputs: `cache` (5.25+) or
    `past_key_values` (earlier)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


def cache_argument(past_key_values: Any, kwargs: dict[str, Any]) -> Any:
    """The cache a model's forward was given, under either name (`generate` passes `cache=` from 5.25 on)."""
    renamed = kwargs.pop("cache", None)
    return past_key_values if past_key_values is not None else renamed


def with_cache(output_cls: type, cache_value: Any, **fields: Any) -> Any:
    """`output_cls(**fields)` (a transformers `*OutputWithPast`) carrying the cache under this version's name."""
    return output_cls(**fields, **{cache_name(): cache_value})


def output_cache(output: Any) -> Any:
    """The cache a transformers model output carries, under either name."""
    return getattr(output, cache_name(), None)


def causal_mask(*, config: Any, inputs_embeds: torch.Tensor, attention_mask: Any, cache_value: Any,
                position_ids: torch.Tensor | None) -> Any:
    """`transformers.masking_utils.create_causal_mask`, with the cache under the name this version takes."""
    from transformers.masking_utils import create_causal_mask

    parameters = inspect.signature(create_causal_mask).parameters
    name = "cache" if "cache" in parameters else "past_key_values"
    return create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              position_ids=position_ids, **{name: cache_value})


# --- model pieces the paged engine calls -------------------------------------------------------------------------

def rope_index(base: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """An M-RoPE model's prompt positions (rows, tokens) and its decode delta, from its own `get_rope_index`.

    `inputs` holds one prompt's processor outputs (`input_ids` (1, tokens), grids, `mm_token_type_ids` ...);
    only the arguments this version's `get_rope_index` names are passed.
    """
    accepted = inspect.signature(base.get_rope_index).parameters
    position_ids, deltas = base.get_rope_index(**{k: v for k, v in inputs.items() if k in accepted})
    return position_ids[:, 0, :], int(torch.as_tensor(deltas).reshape(-1)[0])


def deepstack_features(output: Any) -> list[torch.Tensor] | None:
    """Qwen3-VL's deepstack features from `get_image_features`: one (image tokens, hidden) tensor per decoder
    layer they are added to, all images concatenated; None for models without deepstack."""
    layers = getattr(output, "deepstack_features", None)
    if layers is None:
        return None
    return [torch.cat(list(layer)) if isinstance(layer, (list, tuple)) else layer for layer in layers]


def injection_layers(config: Any) -> tuple[int, ...]:
    """Granite 4 Vision: the decoder layers its vision features are added before, in increasing order — every
    target of `deepstack_layer_map` and `spatial_target_layers` its decoder reaches (the forward's loop only
    matches indices 0..num_hidden_layers-1)."""
    num_layers = config.get_text_config().num_hidden_layers
    targets = [int(layer) for _, layer in config.deepstack_layer_map or ()]
    targets += [int(layer) for layer in config.spatial_target_layers or ()]
    return tuple(sorted({layer for layer in targets if 0 <= layer < num_layers}))


def features_by_layer(output: Any) -> dict[int, torch.Tensor]:
    """Granite 4 Vision's `get_image_features` output as {decoder layer: (image tokens, hidden)}, all images
    concatenated. A later (layer, features) pair for a layer replaces an earlier one, as in the model's forward,
    which collects them into a dict."""
    return {int(layer): torch.cat(list(per_image)) for layer, per_image in output.deepstack_features}


def layer_feature_kwargs(layers: tuple[int, ...], visual_mask: torch.Tensor,
                         features: list[torch.Tensor]) -> dict[str, Any]:
    """Granite 4 Vision's decoder arguments for features packed per step: `visual_mask` (1, tokens) bool and one
    (image rows, hidden) tensor per layer of `layers`. Its decoder adds them before each layer, at `vision_mask`."""
    if len(features) != len(layers):
        raise RuntimeError(f"{len(features)} packed feature layers for {len(layers)} injection layers")
    return {"vision_mask": visual_mask.unsqueeze(-1), "deepstack_features": dict(zip(layers, features, strict=True))}


def video_features_inputs(get_video_features: Callable[..., Any], pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """`pixels` (one video's frames) under the name this version's `get_video_features` takes them by."""
    accepted = inspect.signature(get_video_features).parameters
    return {"pixel_values_videos" if "pixel_values_videos" in accepted else "pixel_values": pixels}


def video_features_end_with_newline(get_video_features: Callable[..., Any]) -> bool:
    """Whether this version's `get_video_features` appends LLaVA-OneVision's `image_newline` row itself (5.25)
    rather than leaving it to the model's forward (5.17). Read from its source, like `logit_scale`."""
    try:
        return "image_newline" in inspect.getsource(get_video_features)
    except (OSError, TypeError):
        return False


def logit_scale(model: Any) -> float | None:
    """The factor this version's model multiplies its logits by beyond `lm_head` (Cohere's `logit_scale`, used by
    Aya Vision), or None where its forward applies none.

    NOTE: read from the forward's source because 5.17's Aya Vision ignores the config's `logit_scale` and 5.25's
    applies it; the paged engine must agree with `generate` on the installed version.
    """
    scale = getattr(model.config.get_text_config(), "logit_scale", None)
    if scale is None:
        return None
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return float(scale)
    return float(scale) if "logit_scale" in source else None


# --- processor loading --------------------------------------------------------------------------------------------

def transformers_class(name: str) -> Any:
    """A transformers class by name, imported from its own module.

    NOTE: without torchvision the top-level lazy names of some classes resolve to import stubs even when the
    class itself needs no torchvision; `_class_to_module` is transformers' private name -> module table.
    """
    import transformers

    module_name = getattr(transformers, "_class_to_module", {}).get(name)
    if module_name is None:
        raise ImportError(f"transformers has no class {name}")
    return getattr(_import_beside_pil_twin(f"transformers.{module_name}"), name)


def _import_beside_pil_twin(module_name: str) -> Any:
    """Import `module_name`; where that fails only because it imports helpers from its family's torchvision image
    processor module, import it against that module's Pil twin instead.

    NOTE: Pixtral's processor module (Mistral 3's processor) takes `get_resize_output_image_size` from
    `image_processing_pixtral`, which imports torchvision; `image_processing_pil_pixtral` defines the same
    function (tests/unit/models/test_hf_compat.py holds that where torchvision imports). The twin stands in only
    while the module imports: later imports of the torchvision module fail as they would without us.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("torchvision"):
            raise
        missing = exc
    package = module_name.rpartition(".")[0]
    family = package.rpartition(".")[2]
    torchvision_module = f"{package}.image_processing_{family}"
    try:
        twin = importlib.import_module(f"{package}.image_processing_pil_{family}")
    except ImportError:
        raise missing from None
    sys.modules[torchvision_module] = twin
    try:
        return importlib.import_module(module_name)
    finally:
        del sys.modules[torchvision_module]


def processor_class_name(model_type: str) -> str | None:
    """The processor class transformers' AutoProcessor maps `model_type` to."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return PROCESSOR_MAPPING_NAMES.get(model_type)


def pil_image_processor_class(model_type: str, declared: str) -> Any:
    """The Pil (torchvision-free) variant of the image processor class `declared` for `model_type`, or None.

    NOTE: transformers 5 keeps it in `models/<model_type>/image_processing_pil_<model_type>.py`, named
    `<Base>Pil`; its top-level lazy name refuses to load without torchvision in some versions.
    """
    name = declared.removesuffix("Fast").removesuffix("Pil") + "Pil"
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.image_processing_pil_{model_type}")
    except ImportError:
        return None
    return getattr(module, name, None)


def placeholder_video_processor() -> Any:
    """A bare `BaseVideoProcessor`, built without torchvision, to fill a processor's video slot."""
    from transformers.video_processing_utils import BaseVideoProcessor

    return BaseVideoProcessor()


# --- hybrid decoders (Qwen3.5's gated delta-net layers) ---------------------------------------------------------

def linear_attention_modules(decoder: Any) -> dict[int, torch.nn.Module]:
    """A hybrid decoder's linear-attention token mixers by layer index: `layers[i].linear_attn` where the text
    config's `layer_types[i]` is "linear_attention" (Qwen3.5, Qwen3.5-MoE, Qwen3-Next)."""
    layer_types = list(getattr(decoder.config, "layer_types", None) or ())
    return {index: layer.linear_attn for index, layer in enumerate(decoder.layers)
            if index < len(layer_types) and layer_types[index] == "linear_attention"}


def gated_delta_rules(module: torch.nn.Module) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The chunked and the token-by-token gated delta rule the module's own forward calls (its modeling module's
    `torch_chunk_gated_delta_rule` and `torch_recurrent_gated_delta_rule`, FLA's calling convention:
    `(query, key, value, g=, beta=, initial_state=, output_final_state=, use_qk_l2norm_in_kernel=)` with
    (batch, tokens, heads, dim) tensors, returning (output, final state)).

    NOTE: 5.25's versions repeat key heads up to the value heads themselves, 5.17's callers do it first; callers
    here pass as many key heads as value heads, which both take.
    """
    import sys

    source = sys.modules[type(module).__module__]
    return source.torch_chunk_gated_delta_rule, source.torch_recurrent_gated_delta_rule


# --- Ovis2's visual indicator tokens ----------------------------------------------------------------------------

def visual_indicator_embeddings(base: Any) -> dict[int, torch.Tensor]:
    """Ovis2's indicator tokens (<IMG_START>, <IMG_GRID>, <IMG_COL>, <IMG_ROW>, <IMG_END>) and the embeddings its
    forward gives them in a prompt with images: the last rows of the visual vocabulary (`visual_embeddings_table`
    over the top `num_visual_indicator_tokens` ids, what `get_image_features` returns as
    `visual_indicator_features`), in `visual_indicator_token_ids` order. They depend on the weights only."""
    num = int(base.vision_tower.num_visual_indicator_tokens)
    size = int(base.visual_vocab_size)
    device = base.visual_embeddings_table.weight.device
    vectors = base.visual_embeddings_table(torch.arange(size - num, size, device=device))
    return {int(token): vectors[i] for i, token in enumerate(base.visual_indicator_token_ids)}


# --- loading without from_pretrained (tensor-parallel shards) ----------------------------------------------------

def no_init_weights() -> Any:
    """A context in which transformers' modules skip their random weight initialisation."""
    from transformers import initialization

    return initialization.no_init_weights()


def checkpoint_key_renamer(model: Any) -> Callable[[str], tuple[str, bool]]:
    """checkpoint key → (the model's parameter name, whether a weight *conversion* — not a plain rename — would
    be needed). `from_pretrained` renames legacy checkpoint keys (`model.layers.*` → `model.language_model.*`,
    `visual.*` → `model.visual.*`) through the model's registered conversion mapping; this applies the same
    renamings to one key at a time."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = dict(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str) -> tuple[str, bool]:
        name, converter = rename_source_key(key, renamings, converters, prefix, names)
        return name, converter is not None

    return rename
