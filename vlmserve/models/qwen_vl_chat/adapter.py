"""Qwen-VL-Chat as both engines see it: `matches(config)` picks the published checkpoint, `load(...)` builds it.

Prompts: every image is a run of `num_image_queries` (256) <imgpad> tokens between <img> and </img>; the
resampler's features replace those tokens' embeddings in order. Positions are plain 1-D indices (no M-RoPE).

Generation stops at <|im_end|> (the end of the assistant's turn), at <|endoftext|> (the checkpoint's
generation_config eos) and at <|im_start|> (the original's chat() treats it as a stop word too).

Dynamic NTK makes the rotary base depend on the prompt's length once a prompt exceeds seq_length (2048): the
factor is the prompt's (`PromptEmbedding.ntk_alpha`), kept by the paged engine per sequence and applied per row
of the packed step, as the original applies it per request. Its KV therefore differs from a shorter prompt's
with the same prefix: the factor scopes the prefix cache (`prefix_cache_scope`). The default context stays
seq_length, the published config's; `max_model_len` raises it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmserve.models.base import KVLayout, ModelAdapter, PromptEmbedding
from vlmserve.models.qwen_vl_chat.modeling import QwenVLChatForCausalLM, QwenVLChatModel, dynamic_ntk_alpha
from vlmserve.models.qwen_vl_chat.tokenizer import ENDOFTEXT, IM_END, IM_START
from vlmserve.types import PreparedPrompt


def matches(config: dict[str, Any]) -> bool:
    """True for the published Qwen-VL-Chat / Qwen-VL config.json (not its GPTQ-quantized Int4 variant)."""
    visual = config.get("visual")
    return (config.get("model_type") == "qwen" and isinstance(visual, dict) and "image_start_id" in visual
            and "quantization_config" not in config)


def load(path: str | Path, *, device: str, dtype: torch.dtype, max_model_len: int | None) -> ModelAdapter:
    """Load the checkpoint directory `path` for serving."""
    from vlmserve.models.qwen_vl_chat.checkpoint import load_checkpoint
    from vlmserve.models.qwen_vl_chat.processor import QwenVLChatProcessor

    model = load_checkpoint(path, device=device, dtype=dtype)
    processor = QwenVLChatProcessor.from_pretrained(path)
    return QwenVLChatAdapter(model, processor, max_model_len=max_model_len)


class QwenVLChatAdapter(ModelAdapter):
    """The native Qwen-VL-Chat port behind the `ModelAdapter` contract."""

    family = "qwen_vl_chat"
    max_images_per_prompt = None
    strip_answer_whitespace = True  # the original chat() returns its decoded answer stripped

    def __init__(self, model: QwenVLChatForCausalLM, processor: Any, *, max_model_len: int | None = None) -> None:
        tokenizer = processor.tokenizer
        stops = frozenset(tokenizer.convert_tokens_to_ids(t) for t in (IM_END, ENDOFTEXT, IM_START))
        config = model.config
        super().__init__(model, processor, max_model_len=max_model_len or config.seq_length, eos_token_ids=stops,
                         image_token_id=config.image_pad_id)
        self.pad_token_id: int = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
        model.generation_config.eos_token_id = sorted(stops)
        model.generation_config.pad_token_id = self.pad_token_id

    def ntk_alpha(self, prompt: PreparedPrompt) -> float:
        """The prompt's dynamic-NTK factor (1.0 up to seq_length tokens), as the original chooses it at prefill."""
        config = self.model.config
        return dynamic_ntk_alpha(prompt.num_tokens, config.seq_length) if config.use_dynamic_ntk else 1.0

    def prefix_cache_scope(self, prompt: PreparedPrompt) -> str | None:
        alpha = self.ntk_alpha(prompt)
        return None if alpha == 1.0 else f"ntk_alpha={alpha:g}"

    # --- generate engine -------------------------------------------------------------------------------------

    def collate(self, prompts: list[PreparedPrompt]) -> dict[str, Any]:
        width = max(p.num_tokens for p in prompts)
        ids = [[self.pad_token_id] * (width - p.num_tokens) + list(p.token_ids) for p in prompts]
        mask = [[0] * (width - p.num_tokens) + [1] * p.num_tokens for p in prompts]
        batch: dict[str, Any] = {"input_ids": torch.tensor(ids, device=self.device),
                                 "attention_mask": torch.tensor(mask, device=self.device)}
        pixels = [p.model_inputs["pixel_values"] for p in prompts if p.model_inputs.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels).to(device=self.device, dtype=self.dtype)
        return batch

    # --- paged engine ----------------------------------------------------------------------------------------

    @property
    def kv_layout(self) -> KVLayout:
        config = self.model.config
        return KVLayout(num_layers=config.num_hidden_layers, num_kv_heads=config.num_attention_heads,
                        head_dim=config.kv_channels)

    @torch.inference_mode()
    def encode_images(self, prompt: PreparedPrompt) -> list[torch.Tensor]:
        pixel_values = prompt.model_inputs.get("pixel_values")
        if pixel_values is None:
            return []
        return self.model.get_image_features(pixel_values.to(self.device))

    @torch.inference_mode()
    def embed_prompt(self, prompt: PreparedPrompt, image_embeds: list[torch.Tensor],
                     video_embeds: list[torch.Tensor] | None = None) -> PromptEmbedding:
        ids = torch.tensor(prompt.token_ids, device=self.device)
        embeds = self.embed_tokens(ids)
        slots = torch.eq(ids, self.model.config.image_pad_id)
        num_features = sum(int(e.shape[0]) for e in image_embeds)
        if int(slots.sum()) != num_features:
            raise RuntimeError(f"{int(slots.sum())} <imgpad> tokens but {num_features} image features")
        if image_embeds:
            features = torch.cat(image_embeds).to(embeds.dtype)
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), features)
        positions = torch.arange(len(ids), device=self.device).unsqueeze(0)
        return PromptEmbedding(inputs_embeds=embeds, positions=positions, rope_delta=0,
                               ntk_alpha=self.ntk_alpha(prompt))

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer.wte(token_ids)

    @property
    def text_model(self) -> QwenVLChatModel:
        return self.model.transformer

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()
