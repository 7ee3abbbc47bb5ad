"""Mllama (Llama 3.2 Vision) on the paged engine: cross-attention layers over each request's own vision states.

Mllama's image features never enter the token embeddings: its `<|image|>` token keeps its text embedding and the
decoder's cross-attention layers read the vision states of the request's images. On the paged engine:

- at a request's prefill, the vision tower and projector give its vision states (`vision_states`, one piece per
  image: tiles x patches rows, padding tiles included, as the model's forward keeps them), and each cross-attention
  layer's k_proj / v_proj / k_norm turn them into K/V once (`build_cross_kv`); the engine keeps them per sequence
  beside the paged cache (`vlmserve.engine.cross_state`);
- per packed row, the vision tokens it may see come from the processor's `cross_attention_mask` (token x image x
  tile), a generated token repeating the prompt's last row as transformers' generate extends the mask; a row that
  sees no tile attends all of them with equal weight and its MLP output is zeroed (`full_text_row_masked_out_mask`),
  exactly as `_prepare_cross_attention_mask` builds it;
- each cross-attention decoder layer is replaced, during engine steps only, by a loop over the step's sequences
  (`install`): a sequence with cross K/V runs the model's own layer forward on its rows, handed its K/V through a
  one-layer stand-in of the cache the module reads on decode steps; a sequence without images passes through
  unchanged, as the model skips these layers when it has no cross-attention state. The layer's attention call
  reaches our attention function (the text config names it), which sends modules marked by `install` to
  `cross_attention_forward` (plain attention over the given K/V) instead of the paged self-attention cache.

NOTE: one layer call per sequence with images per cross-attention layer (a per-request loop, not a packed kernel);
the rows of text-only sequences cost nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from vlmserve.models import hf_compat
from vlmserve.types import PreparedPrompt

#: set on cross-attention modules by `install`: the attention function sends them to `cross_attention_forward`
CROSS_ATTENTION_MARK = "_vlmserve_cross_attention"


@dataclass
class CrossKV:
    """One request's cross-attention inputs: per cross-attention layer, K and V (1, kv heads, vision tokens,
    head dim); `visible` (prompt tokens, vision tokens): which vision tokens each prompt token may see."""

    layers: dict[int, tuple[torch.Tensor, torch.Tensor]]
    visible: torch.Tensor

    @property
    def nbytes(self) -> int:
        tensors = [t for kv in self.layers.values() for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors) + self.visible.numel()

    def row_masks(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """For token positions `positions`: the additive attention mask (1, 1, rows, vision tokens) and the row
        mask (1, 1, rows, 1), as transformers' `_prepare_cross_attention_mask` makes them."""
        rows = self.visible[positions.clamp(max=self.visible.shape[0] - 1)]
        seen = rows.any(dim=-1, keepdim=True)
        additive = torch.zeros(rows.shape, dtype=dtype, device=rows.device)
        additive = additive.masked_fill(~rows, torch.finfo(dtype).min) * seen.to(dtype)
        return additive[None, None], seen.to(dtype)[None, None]


def cross_attention_layers(decoder: torch.nn.Module) -> list[int]:
    return [int(i) for i in getattr(decoder.config, "cross_attention_layers", None) or ()]


def missing_parts(base: Any) -> str | None:
    """Why the model cannot take this path (None: it can)."""
    if hasattr(base, "vision_model") and hasattr(base, "multi_modal_projector"):
        return None
    return "the spec names cross-attention but the model has no vision_model or multi_modal_projector"


def prefix_scope(prompt: PreparedPrompt) -> str | None:
    """The prefix-cache scope of a prompt: every row attends the vision states (a row that sees no tile attends all
    of them evenly), so every block of a prompt with images depends on all of them, the blocks before its first
    <|image|> included; text-only prompts share blocks as usual."""
    return "images:" + ",".join(prompt.image_hashes) if prompt.image_hashes else None


def prompt_kv(decoder: torch.nn.Module, prompt: PreparedPrompt, states: list[torch.Tensor]) -> CrossKV | None:
    """`build_cross_kv` for a prompt from its images' `vision_states`; None for a prompt without images."""
    if not states:
        return None
    return build_cross_kv(decoder, states, prompt.model_inputs["cross_attention_mask"])


def _layer(decoder: torch.nn.Module, index: int) -> Any:
    layers: Any = decoder.layers
    return layers[index]


@torch.inference_mode()
def vision_states(base: Any, model_inputs: dict[str, Any], device: torch.device, dtype: torch.dtype
                  ) -> list[torch.Tensor]:
    """The prompt's vision states as the model's forward makes them, one (tiles x patches, hidden) piece per
    image."""
    pixels = model_inputs["pixel_values"].to(device, dtype)
    output = base.vision_model(pixel_values=pixels, aspect_ratio_ids=model_inputs["aspect_ratio_ids"].to(device),
                               aspect_ratio_mask=model_inputs["aspect_ratio_mask"].to(device))
    states = base.multi_modal_projector(output.last_hidden_state)  # (1, images, tiles, patches, hidden)
    return list(states.reshape(states.shape[1], -1, states.shape[-1]).unbind(0))


@torch.inference_mode()
def build_cross_kv(decoder: torch.nn.Module, states: list[torch.Tensor], cross_attention_mask: torch.Tensor
                   ) -> CrossKV:
    """K/V of every cross-attention layer over the request's vision states, and each prompt token's visible
    vision tokens from the processor's (1, tokens, images, tiles) `cross_attention_mask`."""
    flat = torch.cat(states).unsqueeze(0)
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for index in cross_attention_layers(decoder):
        module: Any = _layer(decoder, index).cross_attn
        shape = (1, -1, module.num_key_value_heads, module.head_dim)
        keys = module.k_norm(module.k_proj(flat).view(shape).transpose(1, 2))
        values = module.v_proj(flat).view(shape).transpose(1, 2)
        layers[index] = (keys.contiguous(), values.contiguous())
    mask = cross_attention_mask[0].to(flat.device).bool()  # (tokens, images, tiles)
    num_tiles = mask.shape[1] * mask.shape[2]
    if flat.shape[1] % num_tiles:
        raise RuntimeError(f"{flat.shape[1]} vision tokens do not split over {num_tiles} image tiles")
    visible = mask.reshape(mask.shape[0], num_tiles).repeat_interleave(flat.shape[1] // num_tiles, dim=1)
    return CrossKV(layers=layers, visible=visible)


@dataclass
class CrossSegment:
    """One sequence's rows [start, end) of a packed step, its first token position, and its cross K/V (None: no
    image, the cross-attention layers leave its rows as they are)."""

    start: int
    end: int
    first_position: int
    kv: CrossKV | None


class _OneLayerCache:
    """What `MllamaTextCrossAttention` reads on a decode step (`get_seq_length`, `layers[i].keys/values`), for one
    layer of one request."""

    def __init__(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.layers = {layer: _Entry(keys, values)}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 1


@dataclass
class _Entry:
    keys: torch.Tensor
    values: torch.Tensor


def install(decoder: torch.nn.Module, current: Any) -> None:
    """Route the decoder's cross-attention layers through the per-sequence loop while an engine step is active
    (`current()` returns its `AttentionBatch`, or None outside a step: the model's own forward runs)."""
    for index in cross_attention_layers(decoder):
        layer = _layer(decoder, index)
        layer.cross_attn.__dict__[CROSS_ATTENTION_MARK] = True
        original = layer.__dict__.get("_vlmserve_original_forward", layer.forward)
        layer.__dict__["_vlmserve_original_forward"] = original
        layer.__dict__["forward"] = functools.partial(_forward, index, original, current)


def _forward(index: int, original: Any, current: Any, hidden_states: torch.Tensor, *args: Any,
             **kwargs: Any) -> torch.Tensor:
    batch = current()
    if batch is None:
        return original(hidden_states, *args, **kwargs)
    out = hidden_states.clone()
    for segment in batch.cross or ():
        if segment.kv is None or segment.end == segment.start:
            continue
        keys, values = segment.kv.layers[index]
        positions = torch.arange(segment.first_position, segment.first_position + segment.end - segment.start,
                                 device=hidden_states.device)
        mask, row_mask = segment.kv.row_masks(positions, hidden_states.dtype)
        rows = hidden_states[:, segment.start:segment.end]
        out[:, segment.start:segment.end] = original(
            rows, cross_attention_states=None, cross_attention_mask=mask, attention_mask=None,
            full_text_row_masked_out_mask=row_mask, use_cache=False,
            **{hf_compat.cache_name(): _OneLayerCache(index, keys, values)})
    return out


def cross_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Plain attention of one request's rows over its vision K/V (transformers' attention signature: q/k/v
    (1, heads, T, head_dim) → (1, T, heads, head_dim)); nothing is written to the paged cache."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=scaling)
    return out.transpose(1, 2).contiguous(), None
