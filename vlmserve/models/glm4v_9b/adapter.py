"""The engines' view of GLM-4V-9B: `matches(config)` and `load(path, ...)` for the registry, and the adapter."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, cast

import torch

from vlmserve.errors import ModelLoadError
from vlmserve.models.base import KVLayout, ModelAdapter, PromptEmbedding
from vlmserve.models.glm4v_9b.config import ChatGLMConfig
from vlmserve.models.glm4v_9b.modeling import ChatGLMForConditionalGeneration
from vlmserve.models.glm4v_9b.positions import image_runs, rope_delta, sequence_positions
from vlmserve.models.glm4v_9b.processor import MAX_IMAGES_PER_CONVERSATION, Glm4vProcessor
from vlmserve.types import ImageSpan, PreparedPrompt

logger = logging.getLogger(__name__)


def matches(config: dict[str, Any]) -> bool:
    """True for the original GLM-4V-9B config.json: ChatGLM keys plus an EVA2-CLIP `vision_config` and boi/eoi."""
    vision = config.get("vision_config")
    return (
        config.get("model_type") == "chatglm"
        and isinstance(vision, dict)
        and {"image_size", "patch_size", "num_positions", "scaling_factor"} <= vision.keys()
        and config.get("boi_token_id") is not None
        and config.get("eoi_token_id") is not None
    )


def load(path: str | Path, *, device: str, dtype: torch.dtype, max_model_len: int | None) -> Glm4vAdapter:
    """Load the checkpoint directory unchanged (config.json, sharded safetensors, tokenizer.model)."""
    path = Path(path)
    try:
        config = ChatGLMConfig.from_pretrained(path)
        if not config.original_rope:
            raise ModelLoadError(f"{path}: original_rope=false is a different rotary layout (CogAgent-style "
                                 "checkpoints); only GLM-4V-9B's interleaved layout is implemented")
        # NOTE: with accelerate installed, device_map streams the shards straight onto the device (28 GB in bf16
        # for the full model) instead of staging them in host memory first.
        placement: dict[str, Any] = {"device_map": device} if importlib.util.find_spec("accelerate") else {}
        model = ChatGLMForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype, **placement)
        torch.nn.Module.to(model, device)  # in place (transformers types its own `to` wrapper too narrowly)
        processor = Glm4vProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load GLM-4V-9B from {path}: {type(exc).__name__}: {exc}") from exc
    return build_adapter(model, processor, max_model_len)


def build_adapter(model: ChatGLMForConditionalGeneration, processor: Glm4vProcessor,
                  max_model_len: int | None) -> Glm4vAdapter:
    """The adapter over a loaded (or shard-loaded) model."""
    config = model.config
    model.eval()
    limit = config.seq_length if max_model_len is None else max_model_len
    if limit > config.seq_length:
        logger.warning("max_model_len %d exceeds the %d positions GLM-4V-9B was trained for", limit,
                       config.seq_length)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    return Glm4vAdapter(model, processor, max_model_len=limit, eos_token_ids=frozenset(int(e) for e in eos),
                        image_token_id=processor.image_token_id)


class Glm4vAdapter(ModelAdapter):
    """GLM-4V-9B for both engines.

    Image layout: each image is a run boi, N x `<|endoftext|>`, eoi in the prompt (N = 1600 at 1120 px);
    `encode_images` returns N + 2 rows per image (the vision tower's boi row, N image rows, its eoi row) and
    `embed_prompt` writes them over the whole run. Positions follow the original (see positions.py), so
    `rope_delta` is -(N - 1) per image.
    """

    family = "glm4v_9b"
    max_images_per_prompt = MAX_IMAGES_PER_CONVERSATION

    model: ChatGLMForConditionalGeneration

    @property
    def config(self) -> ChatGLMConfig:
        return cast(ChatGLMConfig, self.model.config)

    @property
    def _image_marks(self) -> tuple[int, int]:
        return int(self.config.boi_token_id), int(self.config.eoi_token_id)  # type: ignore[arg-type]

    # --- generate engine -------------------------------------------------------------------------------------

    def collate(self, prompts: list[PreparedPrompt]) -> dict[str, Any]:
        pad_id = self.processor.tokenizer.pad_token_id
        longest = max(p.num_tokens for p in prompts)
        input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        pixels = []
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - prompt.num_tokens :] = torch.tensor(prompt.token_ids)
            attention_mask[row, longest - prompt.num_tokens :] = 1
            if prompt.model_inputs.get("pixel_values") is not None:
                pixels.append(prompt.model_inputs["pixel_values"])
        batch: dict[str, Any] = {"input_ids": input_ids.to(self.device),
                                 "attention_mask": attention_mask.to(self.device)}
        if pixels:
            batch["pixel_values"] = torch.cat(pixels).to(device=self.device, dtype=self.dtype)
        return batch

    # --- paged engine ----------------------------------------------------------------------------------------

    @property
    def kv_layout(self) -> KVLayout:
        config = self.config
        return KVLayout(num_layers=config.num_layers, num_kv_heads=config.num_key_value_heads,
                        head_dim=config.kv_channels)

    def image_spans(self, token_ids: list[int]) -> tuple[ImageSpan, ...]:
        """Each image's whole run, boi to eoi inclusive (the rows `encode_images` fills)."""
        runs = image_runs(torch.tensor(token_ids), *self._image_marks)
        return tuple(ImageSpan(begin, end + 1, index) for index, (begin, end) in enumerate(runs))

    @torch.no_grad()
    def encode_images(self, prompt: PreparedPrompt) -> list[torch.Tensor]:
        pixel_values = prompt.model_inputs.get("pixel_values")
        if pixel_values is None:
            return []
        return self.model.get_image_features(pixel_values)

    @torch.no_grad()
    def embed_prompt(self, prompt: PreparedPrompt, image_embeds: list[torch.Tensor],
                     video_embeds: list[torch.Tensor] | None = None) -> PromptEmbedding:
        token_ids = torch.tensor(prompt.token_ids, dtype=torch.long, device=self.device)
        embeds = self.model.get_input_embeddings()(token_ids[None])
        if image_embeds:
            embeds = self.model.merge_image_features(token_ids[None], embeds, image_embeds)
        positions = sequence_positions(token_ids, *self._image_marks)
        return PromptEmbedding(inputs_embeds=embeds[0], positions=positions[None],
                               rope_delta=rope_delta(len(prompt.token_ids), positions))

    @torch.no_grad()
    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids.to(self.device))

    @property
    def text_model(self) -> torch.nn.Module:
        return self.model.text_model

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden).float()
