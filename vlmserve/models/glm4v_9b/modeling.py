"""GLM-4V-9B as a transformers `PreTrainedModel`, loading the original checkpoint's tensors by their own names.

Parameter tree (identical to the original `ChatGLMForConditionalGeneration`):

    transformer.embedding.word_embeddings            Embedding(padded_vocab_size, hidden)
    transformer.encoder.layers.N.{input_layernorm, self_attention.{query_key_value, dense},
                                   post_attention_layernorm, mlp.{dense_h_to_4h, dense_4h_to_h}}
    transformer.encoder.final_layernorm
    transformer.output_layer                         Linear(hidden, padded_vocab_size), untied
    transformer.vision.*                             EVA2-CLIP tower (see vision.py)

The original also saves `transformer.rotary_pos_emb.inv_freq` (a buffer); it holds nothing the rotary embedding
needs (the original recomputes it with rope_ratio), so loading ignores it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlmserve.models import hf_compat
from vlmserve.models.glm4v_9b.config import ChatGLMConfig
from vlmserve.models.glm4v_9b.language import GLMBlock, GLMTransformer
from vlmserve.models.glm4v_9b.positions import batch_positions, image_runs
from vlmserve.models.glm4v_9b.vision import EVA2CLIPModel, PatchEmbedding


class Embedding(nn.Module):
    """Token embeddings (`transformer.embedding.word_embeddings`)."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class ChatGLMModel(nn.Module):
    """The `transformer` submodule: embeddings, decoder, output layer and vision tower."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.vision = EVA2CLIPModel(config)


class ChatGLMPreTrainedModel(PreTrainedModel):
    """Weight init and loading rules shared by GLM-4V-9B models."""

    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["GLMBlock", "VisionLayer"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]
    _supports_sdpa = True
    _supports_flash_attn = False  # untested here (no flash-attn wheels on our machines)
    _supports_flex_attn = False
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # the raw parameters the generic rules do not know (only used for random test models)
        if isinstance(module, EVA2CLIPModel):
            init.normal_(module.boi, mean=0.0, std=0.02)
            init.normal_(module.eoi, mean=0.0, std=0.02)
        elif isinstance(module, PatchEmbedding):
            init.normal_(module.cls_embedding, mean=0.0, std=0.02)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """GLM-4V-9B: image + text in, next-token logits out; works with `generate` and a `DynamicCache`.

    Inputs are our processor's: `input_ids` with each image run expanded (boi, N placeholders, eoi) and
    `pixel_values` (num_images, 3, S, S), images in the order their runs appear (row by row).
    """

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        if not config.original_rope:
            # NOTE: original_rope=False (a non-interleaved rotary) belongs to other ChatGLM-based checkpoints
            # (e.g. CogAgent); GLM-4V-9B ships True.
            raise NotImplementedError("only the original (interleaved) ChatGLM rotary layout is implemented")
        self.transformer = ChatGLMModel(config)
        self.post_init()

    # --- pieces the adapter and generate use -----------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        if not isinstance(value, nn.Embedding):
            raise TypeError("GLM-4V-9B's input embeddings are an nn.Embedding")
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    @property
    def text_model(self) -> GLMTransformer:
        return self.transformer.encoder

    def get_image_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """One (N + 2, hidden) tensor per image: the boi row, N image rows, the eoi row."""
        vision = self.transformer.vision
        pixels = pixel_values.to(device=vision.conv.weight.device, dtype=vision.conv.weight.dtype)
        return list(vision(pixels).unbind(0))

    def position_ids_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return batch_positions(input_ids, self.config.boi_token_id, self.config.eoi_token_id, attention_mask)

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                             features: list[torch.Tensor]) -> torch.Tensor:
        """Replace every image run (boi..eoi inclusive) of `inputs_embeds` with the next image's features."""
        merged = inputs_embeds.clone()
        remaining = iter(features)
        for row, ids in enumerate(input_ids):
            for begin, end in image_runs(ids, self.config.boi_token_id, self.config.eoi_token_id):
                feature = next(remaining, None)
                if feature is None or feature.shape[0] != end - begin + 1:
                    raise ValueError("image runs in input_ids do not match the images given")
                merged[row, begin : end + 1] = feature.to(merged.dtype)
        if next(remaining, None) is not None:
            raise ValueError("more images given than image runs in input_ids")
        return merged

    # --- forward / generate ----------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values: Any = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            assert input_ids is not None
            inputs_embeds = self.transformer.embedding(input_ids)
            if pixel_values is not None:
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds,
                                                          self.get_image_features(pixel_values))
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        past_key_values = hf_compat.cache_argument(past_key_values, kwargs)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        is_prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        if position_ids is None and input_ids is not None and is_prefill:
            position_ids = self.position_ids_for(input_ids, attention_mask)
        outputs = self.transformer.encoder(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                           attention_mask=attention_mask, past_key_values=past_key_values,
                                           **kwargs)
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.transformer.output_layer(hidden)
        return hf_compat.with_cache(CausalLMOutputWithPast, past_key_values if use_cache else None, logits=logits)

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor,
                                             model_kwargs: dict[str, Any]) -> torch.Tensor:
        # generate extends these by +1 per step, which is exactly the original's numbering after the prompt
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        if input_ids is None or not torch.is_tensor(input_ids) or input_ids.dtype.is_floating_point:
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        return self.position_ids_for(input_ids, model_kwargs.get("attention_mask"))


__all__ = ["ChatGLMForConditionalGeneration", "ChatGLMModel", "GLMBlock"]
