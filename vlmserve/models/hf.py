"""The generic adapter for transformers VLMs (`AutoModelForImageTextToText` and friends).

The paged engine runs a transformers VLM without a port by splitting its forward pass at the seams every
decoder-only VLM in transformers shares: the vision tower (`get_image_features`), the text embeddings with image
features scattered over the image placeholder tokens, the model's own position helper (`get_rope_index` for
M-RoPE families), the decoder (`model.model.language_model`) and `lm_head`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from vlmserve.models.base import KVLayout, ModelAdapter, PromptEmbedding
from vlmserve.types import PreparedPrompt

logger = logging.getLogger(__name__)

#: keys of the processor output that run along the token axis (left-padded when batching)
_PER_TOKEN_KEYS = ("attention_mask", "mm_token_type_ids", "token_type_ids")

#: families whose decoder needs more than embeddings + positions + causal attention (see README's table)
PAGED_UNSUPPORTED: dict[str, str] = {
    "gemma3": "image tokens attend bidirectionally within their image block (needs its own packed mask)",
    "paligemma": "prefix-LM attention over the prompt and 1-based positions (needs its own packed mask)",
    "qwen3_vl": "deepstack visual features are injected after early decoder layers",
    "qwen3_vl_moe": "deepstack visual features are injected after early decoder layers",
    "ovis2": "visual indicator tokens take embeddings from the vision tower's own vocabulary",
    "mllama": "cross-attention layers over image states",
    "qwen3_5": "linear-attention (recurrent) layers keep no KV cache",
    "qwen3_5_moe": "linear-attention (recurrent) layers keep no KV cache",
}


class HFAdapter(ModelAdapter):
    """A transformers VLM served through its own processor, vision tower and decoder."""

    #: loaded from code shipped in the checkpoint (--trust-remote-code): served by the generate engine only
    is_remote_code = False

    def __init__(self, model: Any, processor: Any, *, max_model_len: int, eos_token_ids: frozenset[int],
                 image_token_id: int | None) -> None:
        super().__init__(model, processor, max_model_len=max_model_len, eos_token_ids=eos_token_ids,
                         image_token_id=image_token_id)
        self.family = str(getattr(model.config, "model_type", "unknown"))
        self._base = getattr(model, "model", model)
        # Idefics2/3 and SmolVLM call their decoder `text_model`; everyone else `language_model`.
        self._decoder = getattr(self._base, "language_model", None) or getattr(self._base, "text_model", None)
        self._text_config = model.config.get_text_config()
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_token_id: int = pad if pad is not None else min(eos_token_ids, default=0)

    # --- generate engine -------------------------------------------------------------------------------------

    def collate(self, prompts: list[PreparedPrompt]) -> dict[str, Any]:
        width = max(p.num_tokens for p in prompts)
        device = self.device
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([[self.pad_token_id] * (width - p.num_tokens) + p.token_ids for p in prompts]),
            "attention_mask": torch.tensor([[0] * (width - p.num_tokens) + [1] * p.num_tokens for p in prompts]),
        }
        keys = {k for p in prompts for k in p.model_inputs}
        for key in sorted(keys - {"input_ids", "attention_mask"}):
            values = [p.model_inputs.get(key) for p in prompts]
            if key in _PER_TOKEN_KEYS:
                batch[key] = torch.cat([_left_pad(v, p.num_tokens, width) for v, p in zip(values, prompts, strict=True)])
            else:
                present = [v for v in values if v is not None]
                batch[key] = torch.cat(present) if isinstance(present[0], torch.Tensor) else _flatten(present)
        return {k: _to_device(v, device, self.dtype) for k, v in batch.items()}

    # --- paged engine ----------------------------------------------------------------------------------------

    def paged_support(self) -> str | None:
        if self.is_remote_code:
            return "the model runs code shipped in its repository, whose internals are unknown"
        if self.family in PAGED_UNSUPPORTED:
            return PAGED_UNSUPPORTED[self.family]
        if self._decoder is None or not hasattr(self.model, "lm_head"):
            return "the model has no separate decoder and lm_head"
        if not hasattr(self._base, "get_image_features"):
            return "the model has no get_image_features"
        if getattr(self._text_config, "is_encoder_decoder", False):
            return "encoder-decoder architecture"
        other = set(getattr(self._text_config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
        if other:
            return f"decoder layers of type {', '.join(sorted(other))} are not plain attention"
        return None

    @property
    def kv_layout(self) -> KVLayout:
        cfg = self._text_config
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        num_layers = cfg.num_hidden_layers
        layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * num_layers
        window = getattr(cfg, "sliding_window", None)
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        return KVLayout(num_layers=num_layers, num_kv_heads=getattr(cfg, "num_key_value_heads", num_heads),
                        head_dim=head_dim, sliding_windows=windows)

    @property
    def num_position_rows(self) -> int:
        return 3 if hasattr(self._base, "get_rope_index") else 1

    @torch.inference_mode()
    def encode_images(self, prompt: PreparedPrompt) -> list[torch.Tensor]:
        flat = self._image_features(prompt.model_inputs)
        sizes = [span.end - span.start for span in prompt.image_spans]
        if len(sizes) == len(prompt.image_hashes) and sum(sizes) == flat.shape[0]:
            return list(flat.split(sizes))
        # NOTE: image runs could not be matched one-to-one with images; keep the features as one piece.
        return [flat]

    @torch.inference_mode()
    def encode_image_batch(self, prompts: list[PreparedPrompt]) -> list[list[torch.Tensor]]:
        """One vision-tower call for the images of all `prompts` where their inputs pack along the first axis
        (patch-packed towers: Qwen2-VL, Qwen2.5-VL, GLM-4.1V; fixed-size towers: LLaVA); else one call each."""
        merged = _packed_image_inputs([p.model_inputs for p in prompts]) if len(prompts) > 1 else None
        sizes = [[span.end - span.start for span in p.image_spans] for p in prompts]
        if merged is None or any(len(s) != len(p.image_hashes) for s, p in zip(sizes, prompts, strict=True)):
            return super().encode_image_batch(prompts)
        flat = self._image_features(merged)
        if sum(map(sum, sizes)) != flat.shape[0]:
            return super().encode_image_batch(prompts)
        per_prompt = flat.split([sum(s) for s in sizes])
        return [list(features.split(s)) for features, s in zip(per_prompt, sizes, strict=True)]

    def _image_features(self, model_inputs: dict[str, Any]) -> torch.Tensor:
        """The vision tower's output for every image in `model_inputs`, as (image tokens, hidden)."""
        kwargs = _matching_kwargs(self._base.get_image_features, model_inputs, self.device, self.dtype)
        output = self._base.get_image_features(**kwargs)
        if hasattr(output, "pooler_output") and output.pooler_output is not None:
            output = output.pooler_output
        elif hasattr(output, "last_hidden_state"):
            output = output.last_hidden_state
        if isinstance(output, torch.Tensor):
            return output.reshape(-1, output.shape[-1])
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in output])

    @torch.inference_mode()
    def embed_prompt(self, prompt: PreparedPrompt, image_embeds: list[torch.Tensor]) -> PromptEmbedding:
        ids = torch.tensor(prompt.token_ids, device=self.device)
        embeds = self.embed_tokens(ids)
        if image_embeds:
            assert self.image_token_id is not None, "images reach only models with an image token"
            mask = ids.eq(self.image_token_id)
            features = torch.cat(image_embeds).to(embeds.dtype)
            if int(mask.sum()) != features.shape[0]:
                raise RuntimeError(f"{int(mask.sum())} image tokens but {features.shape[0]} image features")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features)
        positions, delta = self._prompt_positions(prompt, ids)
        return PromptEmbedding(inputs_embeds=embeds, positions=positions, rope_delta=delta)

    def _prompt_positions(self, prompt: PreparedPrompt, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        if not hasattr(self._base, "get_rope_index"):
            return torch.arange(len(ids), device=self.device).unsqueeze(0), 0
        inputs = dict(prompt.model_inputs)
        inputs["input_ids"] = ids.unsqueeze(0)
        inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
        if not prompt.image_spans:
            # a prompt built without the processor (token ids sent to /v1/completions) is all text: type 0
            inputs.setdefault("mm_token_type_ids", torch.zeros_like(inputs["input_ids"]))
        kwargs = _matching_kwargs(self._base.get_rope_index, inputs, self.device, self.dtype)
        position_ids, deltas = self._base.get_rope_index(**kwargs)
        return position_ids[:, 0, :], int(deltas.reshape(-1)[0])

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids)

    @property
    def text_model(self) -> torch.nn.Module:
        assert self._decoder is not None, self.paged_support()
        return self._decoder

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden).float()
        softcap = getattr(self._text_config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits


def _left_pad(value: torch.Tensor | None, length: int, width: int) -> torch.Tensor:
    if value is None:
        value = torch.zeros(1, length, dtype=torch.long)
    return torch.nn.functional.pad(value, (width - value.shape[-1], 0))


def _flatten(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(v if isinstance(v, list) else [v])
    return out


def _to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device)


#: image inputs whose first axis runs over patches (with a grid per image) or over whole same-size images
_PACKABLE_IMAGE_KEYS = {"pixel_values", "image_grid_thw"}


def _packed_image_inputs(inputs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The image inputs of several prompts as one, concatenated along the first axis, or None where that would
    not mean "these images, one after another": keys beyond pixels and grids (sizes, masks, patch counts), pixels of
    different shapes without a grid to tell them apart, or prompts without images."""
    keys = {k for model_inputs in inputs for k in model_inputs if k not in {*_PER_TOKEN_KEYS, "input_ids"}}
    if not keys or not keys <= _PACKABLE_IMAGE_KEYS or "pixel_values" not in keys:
        return None
    merged: dict[str, Any] = {}
    for key in keys:
        values = [model_inputs.get(key) for model_inputs in inputs]
        if not all(isinstance(v, torch.Tensor) for v in values):
            return None
        if len({tuple(v.shape[1:]) for v in values}) != 1:
            return None
        merged[key] = torch.cat(values)
    if "image_grid_thw" not in keys and merged["pixel_values"].dim() != 4:
        return None  # without a grid, only (images, channels, height, width) pixels are plainly image after image
    return merged


def _matching_kwargs(fn: Any, inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The subset of `inputs` that `fn` accepts by name, moved to the model's device."""
    names = inspect.signature(fn).parameters
    return {k: _to_device(v, device, dtype) for k, v in inputs.items() if k in names}
