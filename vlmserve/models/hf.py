"""The generic adapter for transformers VLMs (`AutoModelForImageTextToText` and friends).

The paged engine runs a transformers VLM without a port by splitting its forward pass at the seams every
decoder-only VLM in transformers shares: the vision tower (`get_image_features`), the text embeddings with image
features scattered over the image placeholder tokens, the model's own position helper (`get_rope_index` for
M-RoPE families), the decoder (`model.model.language_model`) and the model's own output head. Which of these a
family needs, and whether it may run paged at all, is its `FamilySpec` on the allow-list in `models/families.py`;
families without one are served by the generate engine.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vlmserve.models import cross_attention, gated_delta_net, hf_compat
from vlmserve.models.base import KVLayout, ModelAdapter, PromptEmbedding, RecurrentLayout
from vlmserve.models.families import FamilySpec, bidirectional_blocks, family_spec, refusal
from vlmserve.models.hf_inputs import collate_prompts, matching_kwargs, packed_image_inputs, to_device
from vlmserve.models.video_processing import (
    SHARED_TOKEN_VIDEO_FAMILIES,
    FrameVideoProcessor,
    GridVideoProcessor,
)
from vlmserve.models.vision_budget import (
    patch_geometry,
    split_by_patches,
    split_video_groups,
    synthetic_inputs,
)
from vlmserve.models.vision_graphs import GRAPHABLE_VISION_FAMILIES, VisionGraphs
from vlmserve.types import PreparedPrompt

logger = logging.getLogger(__name__)


class HFAdapter(ModelAdapter):
    """A transformers VLM served through its own processor, vision tower and decoder."""

    #: loaded from code shipped in the checkpoint (--trust-remote-code): served by the generate engine only
    is_remote_code = False
    #: whether the decoder carries the hook that hands it Granite 4 Vision's layer features (see the spec setter)
    _hooked = False

    def __init__(self, model: Any, processor: Any, *, max_model_len: int, eos_token_ids: frozenset[int],
                 image_token_id: int | None) -> None:
        super().__init__(model, processor, max_model_len=max_model_len, eos_token_ids=eos_token_ids,
                         image_token_id=image_token_id)
        self.family = str(getattr(model.config, "model_type", "unknown"))
        self._base = getattr(model, "model", model)
        self._text_config = model.config.get_text_config()
        self._head: Any = None
        self.spec = family_spec(self.family)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_token_id: int = pad if pad is not None else min(eos_token_ids, default=0)
        # Tower calls are cut at a patch budget where images are independent rows of one packed input.
        self.vision_geometry = (patch_geometry(processor) if self.spec is not None and self.spec.vision_attention == "varlen"
                                else None)
        self._vision_graphs: VisionGraphs | None = None
        if isinstance(getattr(processor, "video_processor", None), (GridVideoProcessor, FrameVideoProcessor)):
            config = model.config
            video_token = getattr(config, "video_token_id", getattr(config, "video_token_index", None))
            if self.family in SHARED_TOKEN_VIDEO_FAMILIES:
                video_token = image_token_id  # GLM-4.1V writes video frames with the image token
            self.video_token_id = video_token if isinstance(video_token, int) else None
        self._indicators: dict[int, torch.Tensor] | None = None  # Ovis2's visual indicator embeddings

    # --- generate engine -------------------------------------------------------------------------------------

    def collate(self, prompts: list[PreparedPrompt]) -> dict[str, Any]:
        return collate_prompts(prompts, self.pad_token_id, self.device, self.dtype)

    # --- paged engine ----------------------------------------------------------------------------------------

    @property
    def spec(self) -> FamilySpec | None:
        """The family's paged spec (vlmserve.models.families); None when the family is not on the allow-list."""
        return self._spec

    @spec.setter
    def spec(self, spec: FamilySpec | None) -> None:
        self._spec = spec
        self._head = None  # built from the spec on first use
        self._decoder = getattr(self._base, spec.decoder, None) if spec is not None else None
        if self._decoder is not None and self._has_layer_features and not self._hooked:
            # The runner packs every deepstack-like extra under Qwen3-VL's argument names; Granite 4 Vision's
            # decoder takes them under its own, keyed by layer (the one translation, on every rank alike).
            self._decoder.register_forward_pre_hook(self._layer_feature_arguments, with_kwargs=True)
            self._hooked = True

    def _layer_feature_arguments(self, module: torch.nn.Module, args: tuple[Any, ...],
                                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if "visual_pos_masks" not in kwargs or not self._has_layer_features:
            return None
        mask, features = kwargs.pop("visual_pos_masks"), kwargs.pop("deepstack_visual_embeds")
        kwargs.update(hf_compat.layer_feature_kwargs(hf_compat.injection_layers(self.model.config), mask, features))
        return args, kwargs

    def paged_support(self) -> str | None:
        if self.is_remote_code:
            return "the model runs code shipped in its repository, whose internals are unknown"
        reason = refusal(self.family)
        if reason is not None or self.spec is None:
            return reason or "no paged spec"
        if self._decoder is None or not hasattr(self.model, "lm_head"):
            return f"the model has no decoder at .model.{self.spec.decoder} or no lm_head"
        if self.spec.positions == "rope_index" and not hasattr(self._base, "get_rope_index"):
            return "the spec asks for get_rope_index positions but the model has no get_rope_index"
        if self.has_cross_attention and (missing := cross_attention.missing_parts(self._base)):
            return missing
        if not self.has_cross_attention and not hasattr(self._base, "get_image_features"):
            return "the model has no get_image_features"
        if getattr(self._text_config, "is_encoder_decoder", False):
            return "encoder-decoder architecture"
        other = set(getattr(self._text_config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
        if self.spec.recurrent == "gated_delta_net" and "linear_attention" in other:
            if self.recurrent_layout is None:
                return "the spec names gated delta-net layers but the decoder has no layers[i].linear_attn"
            other.discard("linear_attention")
        if other:
            return f"decoder layers of type {', '.join(sorted(other))} are not plain attention"
        return None

    @property
    def kv_layout(self) -> KVLayout:
        cfg = self._text_config
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        recurrent = self.recurrent_layout
        attention_layers = None if recurrent is None else tuple(
            i for i in range(cfg.num_hidden_layers) if i not in recurrent.layers)
        # Sliding windows need nothing here: transformers passes each layer's window to the attention function.
        return KVLayout(num_layers=cfg.num_hidden_layers, num_kv_heads=getattr(cfg, "num_key_value_heads", num_heads),
                        head_dim=head_dim, attention_layers=attention_layers)

    @property
    def recurrent_layout(self) -> RecurrentLayout | None:
        if self.spec is None or self.spec.recurrent is None or self._decoder is None:
            return None
        return gated_delta_net.recurrent_layout(self._decoder)

    def recurrent_modules(self) -> dict[int, torch.nn.Module]:
        if self.recurrent_layout is None:
            return {}
        return hf_compat.linear_attention_modules(self.text_model)

    def run_recurrent(self, module: torch.nn.Module, hidden: torch.Tensor, segments: list[tuple[int, int]],
                      conv: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return gated_delta_net.packed_forward(module, hidden, segments, conv, state)

    @property
    def has_cross_attention(self) -> bool:
        return self.spec is not None and self.spec.cross_attention

    def cross_attention_kv(self, prompt: PreparedPrompt, image_embeds: list[torch.Tensor]) -> Any:
        return cross_attention.prompt_kv(self.text_model, prompt, image_embeds) if self.has_cross_attention else None

    def prefix_cache_scope(self, prompt: PreparedPrompt) -> str | None:
        return cross_attention.prefix_scope(prompt) if self.has_cross_attention else None

    @property
    def num_position_rows(self) -> int:
        return self.spec.num_position_rows if self.spec is not None else 1

    def attention_blocks(self, prompt: PreparedPrompt) -> tuple[tuple[int, int], ...]:
        if self.spec is None:
            return ()
        return bidirectional_blocks(self.spec.bidirectional, prompt.model_inputs.get("token_type_ids"))

    @property
    def blocks_spare_window(self) -> bool:
        return self.spec is not None and self.spec.blocks_spare_window

    @torch.inference_mode()
    def encode_images(self, prompt: PreparedPrompt) -> list[torch.Tensor]:
        if self.has_cross_attention:  # Mllama: vision states per image, for the cross-attention layers
            return cross_attention.vision_states(self._base, prompt.model_inputs, self.device, self.dtype)
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
        packable = self.spec.packable_image_keys if self.spec is not None else frozenset()
        merged = packed_image_inputs([p.model_inputs for p in prompts], packable) if len(prompts) > 1 else None
        sizes = [[span.end - span.start for span in p.image_spans] for p in prompts]
        if merged is None or any(len(s) != len(p.image_hashes) for s, p in zip(sizes, prompts, strict=True)):
            return super().encode_image_batch(prompts)
        flat = self._image_features(merged)
        if sum(map(sum, sizes)) != flat.shape[0]:
            return super().encode_image_batch(prompts)
        per_prompt = flat.split([sum(s) for s in sizes])
        return [list(features.split(s)) for features, s in zip(per_prompt, sizes, strict=True)]

    def _image_features(self, model_inputs: dict[str, Any]) -> torch.Tensor:
        """The vision tower's output for every image in `model_inputs`, as (image tokens, hidden), in calls of at
        most the patch budget (the memory profile ran one call at that budget)."""
        if self.vision_geometry is None:
            return self._tower(model_inputs)
        parts = [self._tower(part) for part in split_by_patches(model_inputs, self.vision_geometry.patch_budget)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.inference_mode()
    def run_vision_at_budget(self) -> bool:
        if self.vision_geometry is None:
            return False
        budget = self.vision_geometry.patch_budget
        self._tower(synthetic_inputs(self.vision_geometry, budget, self.device, self.dtype))
        return True

    def enable_vision_graphs(self) -> bool:
        if self.family not in GRAPHABLE_VISION_FAMILIES or self.device.type != "cuda":
            return False
        # NOTE: calls over the graphs' patch cap run eagerly; the memory profile measured an eager call at the
        # (larger) patch budget, and the graph pool needs at most about one such call's activations.
        self._vision_graphs = VisionGraphs(self._base.visual)
        return True

    def _tower(self, model_inputs: dict[str, Any]) -> torch.Tensor:
        if self._vision_graphs is not None and "image_grid_thw" in model_inputs:
            pixels = model_inputs["pixel_values"].to(self.device, self.dtype)
            try:
                features = self._vision_graphs(pixels, model_inputs["image_grid_thw"])
            except Exception:  # a tower that cannot be captured still runs, only slower
                logger.exception("vision tower graph capture failed for %s; the tower runs eagerly", self.family)
                self._vision_graphs = None
                features = None
            if features is not None:
                return features
        return self._features(self._base.get_image_features, model_inputs)

    @torch.inference_mode()
    def encode_videos(self, prompt: PreparedPrompt) -> list[torch.Tensor]:
        """The vision tower's features of each video of `prompt`, in tower calls of at most the patch budget.

        NOTE: the Qwen towers attend within one temporal patch group at a time (their cu_seqlens and rotary
        positions repeat per group), so a video cut between groups encodes exactly as it does whole."""
        if "video_grid_thw" not in prompt.model_inputs:
            return self._frame_video_features(prompt)
        grid = prompt.model_inputs["video_grid_thw"]
        pixels = prompt.model_inputs["pixel_values_videos"]
        merge = self.processor.video_processor.merge_size ** 2
        budget = self.vision_geometry.patch_budget if self.vision_geometry is not None else None
        pieces = []
        for frames in split_video_groups(pixels, grid, budget):
            pieces.append(self._features(self._base.get_video_features, frames))
        flat = torch.cat(pieces)
        return list(flat.split([int(t * h * w) // merge for t, h, w in grid.tolist()]))

    def _frame_video_features(self, prompt: PreparedPrompt) -> list[torch.Tensor]:
        """LLaVA-NeXT-Video / LLaVA-OneVision: every frame through the tower and the family's pooling, video after
        video; LLaVA-OneVision then ends each video with its `image_newline` row.

        NOTE: before 5.25 that newline row is the one step of the model's forward done here rather than by the model
        (its `get_video_features` stops before it); the video logprob test checks it against `generate`."""
        pixels = prompt.model_inputs["pixel_values_videos"]
        videos = []
        for video in pixels.split(1):
            inputs = hf_compat.video_features_inputs(self._base.get_video_features, video)
            features = self._features(self._base.get_video_features, inputs)
            newline = getattr(self._base, "image_newline", None)
            if (self.family == "llava_onevision" and newline is not None
                    and not hf_compat.video_features_end_with_newline(self._base.get_video_features)):
                features = torch.cat([features, newline[None, :].to(features.dtype)])
            videos.append(features)
        return videos

    def _features(self, tower: Any, model_inputs: dict[str, Any]) -> torch.Tensor:
        """`tower` (get_image_features or get_video_features) on `model_inputs`, as (tokens, hidden) rows with any
        deepstack features beside them."""
        kwargs = matching_kwargs(tower, model_inputs, self.device, self.dtype)
        output = tower(**kwargs)
        if self._has_layer_features:
            return self._layer_features(output)
        deepstack = hf_compat.deepstack_features(output) if self._has_deepstack else None
        if hasattr(output, "pooler_output") and output.pooler_output is not None:
            output = output.pooler_output
        elif hasattr(output, "last_hidden_state"):
            output = output.last_hidden_state
        pieces = [output] if isinstance(output, torch.Tensor) else list(output)
        features = torch.cat([t.reshape(-1, t.shape[-1]) for t in pieces])
        if deepstack:
            # NOTE: one row per image token, [features | layer-1 deepstack | layer-2 …] side by side, so the
            # per-image split and the image-embedding cache carry the deepstack features with the image.
            features = torch.cat([features, *(d.reshape(features.shape[0], -1) for d in deepstack)], dim=-1)
        return features

    def _layer_features(self, output: Any) -> torch.Tensor:
        """Granite 4 Vision: one row per image token, [zeros | features before layer l1 | l2 …] side by side (the
        layout of Qwen3-VL's deepstack rows): the model zeroes its image tokens' embeddings and adds each layer's
        features before that layer.

        NOTE: the zero block costs the image-embedding cache one hidden-wide row per image token; it keeps one
        layout (and one packing path in the runner) for both families."""
        by_layer = hf_compat.features_by_layer(output)
        layers = [by_layer[layer] for layer in hf_compat.injection_layers(self.model.config)]
        return torch.cat([torch.zeros_like(layers[0]), *layers], dim=-1)

    @property
    def _has_deepstack(self) -> bool:
        """Whether prompts carry deepstack-like extras ("visual_mask", "deepstack"), packed per step by the runner."""
        return self.spec is not None and ("deepstack" in self.spec.extras or self._has_layer_features)

    @property
    def _has_layer_features(self) -> bool:
        return self.spec is not None and "layer_features" in self.spec.extras

    @torch.inference_mode()
    def embed_prompt(self, prompt: PreparedPrompt, image_embeds: list[torch.Tensor],
                     video_embeds: list[torch.Tensor] | None = None) -> PromptEmbedding:
        ids = torch.tensor(prompt.token_ids, device=self.device)
        embeds = self.embed_tokens(ids)
        visual: list[tuple[torch.Tensor, torch.Tensor]] = []  # (token mask, feature rows) per modality
        if self.has_cross_attention:  # the images reach the decoder through cross_attention_kv, not embeddings
            image_embeds = []
        in_video = self._shared_token_video_mask(prompt, ids)
        if image_embeds:
            assert self.image_token_id is not None, "images reach only models with an image token"
            visual.append((ids.eq(self.image_token_id) & ~in_video, torch.cat(image_embeds).to(embeds.dtype)))
        if video_embeds:
            assert self.video_token_id is not None, "videos reach only models with a video token"
            mask = in_video if self.video_token_id == self.image_token_id else ids.eq(self.video_token_id)
            visual.append((mask, torch.cat(video_embeds).to(embeds.dtype)))
        hidden = embeds.shape[-1]
        for mask, features in visual:
            if int(mask.sum()) != features.shape[0]:
                raise RuntimeError(f"{int(mask.sum())} placeholder tokens but {features.shape[0]} vision features")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features[:, :hidden])
        if image_embeds and self.spec is not None and "visual_indicators" in self.spec.extras:
            embeds = self._with_visual_indicators(ids, embeds)
        extras = self._deepstack_extras(ids, visual, hidden) if visual and self._has_deepstack else None
        positions, delta = self._prompt_positions(prompt, ids)
        return PromptEmbedding(inputs_embeds=embeds, positions=positions, rope_delta=delta, extras=extras)

    def _shared_token_video_mask(self, prompt: PreparedPrompt, ids: torch.Tensor) -> torch.Tensor:
        """Where a family that writes video frames with the image token has video tokens (mm_token_type_ids 2);
        all False elsewhere."""
        types = prompt.model_inputs.get("mm_token_type_ids")
        if self.video_token_id is None or self.video_token_id != self.image_token_id or types is None:
            return torch.zeros_like(ids, dtype=torch.bool)
        return types[0].to(ids.device).eq(2)

    @staticmethod
    def _deepstack_extras(ids: torch.Tensor, visual: list[tuple[torch.Tensor, torch.Tensor]],
                          hidden: int) -> dict[str, torch.Tensor]:
        """Qwen3-VL's deepstack inputs: one mask over image and video tokens, their features in token order."""
        rows = torch.zeros(len(ids), visual[0][1].shape[-1], dtype=visual[0][1].dtype, device=ids.device)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for modality_mask, features in visual:
            rows[modality_mask] = features
            mask |= modality_mask
        picked = rows[mask][:, hidden:]
        deepstack = picked.reshape(picked.shape[0], -1, hidden).transpose(0, 1)
        return {"visual_mask": mask, "deepstack": deepstack.contiguous()}

    def _with_visual_indicators(self, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Ovis2: in a prompt with images, its indicator tokens take rows of the visual vocabulary, not their text
        embeddings (as the model's forward does when given pixel values; generated tokens keep text embeddings)."""
        if self._indicators is None:
            self._indicators = hf_compat.visual_indicator_embeddings(self._base)
        for token_id, vector in self._indicators.items():
            embeds[ids == token_id] = vector.to(embeds.dtype)
        return embeds

    def _prompt_positions(self, prompt: PreparedPrompt, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.spec is None or self.spec.positions == "arange":
            offset = self.spec.position_offset if self.spec is not None else 0
            positions = torch.arange(offset, offset + len(ids), device=self.device)
            return positions.expand(self.num_position_rows, -1), offset
        inputs = dict(prompt.model_inputs)
        inputs["input_ids"] = ids.unsqueeze(0)
        inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
        if not prompt.image_spans:
            # a prompt built without the processor (token ids sent to /v1/completions) is all text: type 0
            inputs.setdefault("mm_token_type_ids", torch.zeros_like(inputs["input_ids"]))
        positions, delta = hf_compat.rope_index(
            self._base, {k: to_device(v, self.device, self.dtype) for k, v in inputs.items()})
        if positions.shape[0] != self.num_position_rows:
            raise RuntimeError(f"get_rope_index gave {positions.shape[0]} position rows; the {self.family} spec "
                               f"says {self.num_position_rows}")
        return positions, delta

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids)

    @property
    def text_model(self) -> torch.nn.Module:
        assert self._decoder is not None, self.paged_support()
        return self._decoder

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._head is None:
            assert self.spec is not None, self.paged_support()
            self._head = self.spec.head(self.model)
        return self._head(hidden)
