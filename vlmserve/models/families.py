"""What each transformers VLM family needs to run on the paged engine, in one place per family: an allow-list.

The paged engine runs a model's decoder on packed ragged batches with our own embeddings and positions (see
`vlmserve.models.hf`). That reproduces the model's own forward only where the family's decoder needs nothing else:
a family is paged only if it has a `FamilySpec` here, and its spec says everything the generic recipe must do for
it. Every other family — known and refused (`REFUSED`, with the reason) or simply unknown — takes the generate
engine with a logged reason. A spec is still only a claim: at load the engine runs a self-check
(`vlmserve.engine.paged_check`) that compares the paged path's logprobs with the model's own `generate` and
refuses paged on a mismatch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlmserve.errors import InvalidRequestError

#: (model) → head: (tokens, hidden) → (tokens, vocab) float32 logits
HeadFactory = Callable[[Any], Callable[[torch.Tensor], torch.Tensor]]

PositionRule = Literal["arange", "rope_index"]
ImageLayout = Literal["one_run", "tiles", "touching"]
BidirectionalRule = Literal["none", "image_runs", "prefix"]


class _DecoderOutput:
    """What the pass-through decoder hands the model's head code: the hidden states, and None for anything else
    the model's forward reads off its decoder's output (rope deltas, router logits, image hidden states…)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def __getitem__(self, index: int) -> torch.Tensor:
        if index != 0:
            raise IndexError(index)
        return self.last_hidden_state

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class _PassThroughDecoder(torch.nn.Module):
    def forward(self, *args: Any, inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> _DecoderOutput:
        assert inputs_embeds is not None, "the model's forward passed no inputs_embeds to its inner model"
        return _DecoderOutput(inputs_embeds)


def own_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's own output head: its `forward`, run on a shallow copy whose inner model hands back the
    hidden states it is given. Whatever the family's forward does after its decoder — `lm_head`, Granite's
    `logits_scaling`, Gemma's final-logit softcapping — runs as the model wrote it; nothing is re-implemented."""
    view = copy.copy(model)
    view.__dict__["_modules"] = {**model._modules, "model": _PassThroughDecoder()}

    def head(hidden: torch.Tensor) -> torch.Tensor:
        output = view(inputs_embeds=hidden.unsqueeze(0), return_dict=True, use_cache=False)
        return output.logits[0].float()

    return head


@dataclass(frozen=True)
class FamilySpec:
    """Everything the generic paged recipe needs to know about one family (see the module docstring)."""

    #: config.json model_type values this spec covers
    model_types: tuple[str, ...]
    #: "arange": 1 row 0..n-1, generated token i at position i; "rope_index": the model's `get_rope_index` rows
    #: for the prompt and, per request, delta = max(prompt positions) + 1 - prompt length added to every row of
    #: each generated token's index (M-RoPE)
    positions: PositionRule = "arange"
    #: rows of `position_ids`: 1, or 3 for M-RoPE (Qwen3-VL's would be 4: text + 3)
    num_position_rows: int = 1
    #: attribute of the inner model holding the decoder
    decoder: str = "language_model"
    #: the output head; `own_head` runs the model's own forward after its decoder
    head: HeadFactory = own_head
    #: processor outputs whose first axis runs image after image (or patch after patch with a grid per image), so
    #: the vision tower may take several prompts' images in one call; empty: one tower call per prompt
    packable_image_keys: frozenset[str] = frozenset()
    #: how an image's placeholder tokens lie: one run each, several runs per image (tiles with text between), or
    #: runs of consecutive images that may touch; only "one_run" lets features be split (and cached) per image
    image_layout: ImageLayout = "one_run"
    #: "varlen": the vision tower packs images as cu_seqlens segments (one varlen attention call per layer)
    vision_attention: Literal["default", "varlen"] = "default"
    #: per-token decoder inputs beyond embeddings and positions; entries outside IMPLEMENTED_EXTRAS refuse paged.
    #: "deepstack": Qwen3-VL's vision features of early tower layers, added to the image rows' hidden states after
    #: the first decoder layers (`visual_pos_masks`, `deepstack_visual_embeds`), packed per step by the runner
    #: "visual_indicators": Ovis2's indicator tokens (<IMG_START> …) take rows of the visual vocabulary as their
    #: embeddings in prompts with images (a per-prompt embedding rule, applied by the adapter's embed_prompt)
    #: "layer_features": Granite 4 Vision's projected features of several tower layers, each added to the image
    #: rows' hidden states *before* the decoder layer its config maps it to (`vision_mask`, `deepstack_features`;
    #: the image rows' own embeddings are zeros). Packed per step exactly as "deepstack" (one feature tensor per
    #: target layer, in layer order); the adapter hands them to the decoder under its own argument names
    extras: tuple[str, ...] = ()
    #: "gated_delta_net": a hybrid decoder whose "linear_attention" layers (Qwen3.5's gated delta-net) keep a
    #: per-sequence recurrent state instead of KV; `vlmserve.models.gated_delta_net` runs them on the packed step,
    #: the engine keeps their state in a slot pool (no prefix caching: a cached block has no state to resume from)
    recurrent: Literal["gated_delta_net"] | None = None
    #: "grouped": the decoder's MoE expert layers run as grouped GEMMs (vlmserve.models.moe_experts) instead of
    #: whatever transformers picked (its "eager" is a Python loop over experts)
    experts: Literal["default", "grouped"] = "default"
    #: added to every "arange" position (PaliGemma counts positions from 1); generated tokens get it too
    position_offset: int = 0
    #: where the prompt attends bidirectionally inside the causal mask, read off the processor's token_type_ids
    #: as transformers' own masks do: "image_runs", each run of image tokens (type 1; Gemma 3, whose sliding
    #: layers still cut the run by their window); "prefix", all type-0 tokens as one block (PaliGemma's prefix-LM:
    #: image and prompt, whose sliding layers OR the block onto their windowed causal mask, so the window spares it)
    bidirectional: BidirectionalRule = "none"
    #: Mllama: image features are not merged into the embeddings; the decoder's cross-attention layers read each
    #: request's vision states, whose K/V the engine keeps per sequence (`vlmserve.models.cross_attention`,
    #: `vlmserve.engine.cross_state`); every block of a prompt with images is keyed by all its images
    cross_attention: bool = False

    @property
    def blocks_spare_window(self) -> bool:
        return self.bidirectional == "prefix"


#: extras the model runner packs per step
IMPLEMENTED_EXTRAS = frozenset({"deepstack", "layer_features", "visual_indicators"})

_GRID = frozenset({"pixel_values", "image_grid_thw"})
_PIXELS = frozenset({"pixel_values"})

#: the allow-list: every family here has a tiny checkpoint under tests/fixtures/tiny and a logprob-equivalence
#: test (tests/integration/models/test_paged_logprobs.py), except where noted
_SPECS: tuple[FamilySpec, ...] = (
    FamilySpec(("qwen2_vl", "qwen2_5_vl"), positions="rope_index", num_position_rows=3, packable_image_keys=_GRID,
               vision_attention="varlen"),
    FamilySpec(("glm4v",), positions="rope_index", num_position_rows=3, packable_image_keys=_GRID,
               vision_attention="varlen"),
    FamilySpec(("glm4v_moe", "glm46v"), positions="rope_index", num_position_rows=3, packable_image_keys=_GRID,
               experts="grouped"),
    # get_rope_index gives the 3 M-RoPE rows; the decoder derives its text row itself when given 3
    FamilySpec(("qwen3_vl",), positions="rope_index", num_position_rows=3, packable_image_keys=_GRID,
               extras=("deepstack",)),
    FamilySpec(("qwen3_vl_moe",), positions="rope_index", num_position_rows=3, packable_image_keys=_GRID,
               extras=("deepstack",), experts="grouped"),
    FamilySpec(("llava", "vipllava", "internvl", "janus", "got_ocr2"), packable_image_keys=_PIXELS),
    # DeepSeek-VL's template puts consecutive images' placeholder runs side by side
    FamilySpec(("deepseek_vl",), packable_image_keys=_PIXELS, image_layout="touching"),
    FamilySpec(("aya_vision",), packable_image_keys=_PIXELS, image_layout="tiles"),
    FamilySpec(("llava_next", "llava_next_video", "video_llava")),
    # LLaVA-NeXT tiling; its vision features reach the decoder only through layer_features (before chosen layers)
    FamilySpec(("granite4_vision",), extras=("layer_features",)),
    FamilySpec(("deepseek_vl_hybrid",), image_layout="touching"),
    FamilySpec(("llava_onevision",), image_layout="touching"),
    FamilySpec(("idefics2",), decoder="text_model"),
    FamilySpec(("idefics3", "smolvlm"), decoder="text_model", image_layout="tiles"),
    # Qwen3-VL's vision side without deepstack, a hybrid decoder: 3 of 4 layers gated delta-net (linear attention)
    FamilySpec(("qwen3_5", "qwen3_5_moe"), positions="rope_index", num_position_rows=3, packable_image_keys=_GRID,
               recurrent="gated_delta_net", experts="grouped"),
    # indicator tokens (<IMG_START> …) between each image's tiles take visual-vocabulary embeddings
    FamilySpec(("ovis2",), packable_image_keys=_PIXELS, image_layout="tiles", extras=("visual_indicators",)),
    # Pixtral's layout: each image's rows of [IMG] tokens closed by [IMG_BREAK], the last by [IMG_END]
    FamilySpec(("mistral3",), image_layout="tiles"),
    FamilySpec(("gemma3",), packable_image_keys=_PIXELS, bidirectional="image_runs"),
    # one <|image|> per image; the vision states reach the decoder through its cross-attention layers only
    FamilySpec(("mllama",), image_layout="touching", cross_attention=True),
    # the processor writes every image's tokens first, side by side, then <bos> and the prompt
    FamilySpec(("paligemma",), packable_image_keys=_PIXELS, image_layout="touching", position_offset=1,
               bidirectional="prefix"),
)

FAMILY_SPECS: dict[str, FamilySpec] = {t: spec for spec in _SPECS for t in spec.model_types}

#: families known not to run on the paged engine, and why (logged when they fall back)
REFUSED: dict[str, str] = {}


#: families whose vision tower runs vlmserve.models.vision_attention's segmented varlen attention
VARLEN_VISION_FAMILIES = frozenset(t for spec in _SPECS if spec.vision_attention == "varlen" for t in spec.model_types)


def bidirectional_blocks(rule: BidirectionalRule, token_type_ids: torch.Tensor | None) -> tuple[tuple[int, int], ...]:
    """The prompt's bidirectional blocks [start, end) under `rule`, from the processor's (1, tokens) or (tokens,)
    token_type_ids; none without them (the model's own forward then masks causally too)."""
    if rule == "none" or token_type_ids is None:
        return ()
    types = token_type_ids.reshape(-1).tolist()
    if rule == "prefix":
        # transformers: block id 0 for every type-0 token; at inference (no suffix) they are the whole prompt
        members = [i for i, t in enumerate(types) if t == 0]
        if members and members[-1] - members[0] + 1 != len(members):
            raise InvalidRequestError("the prompt's prefix (token_type_ids 0) is not one run of tokens",
                                      param="token_type_ids")
        return ((members[0], members[-1] + 1),) if members else ()
    blocks: list[tuple[int, int]] = []
    for index, kind in enumerate(types):
        if kind == 1 and (index == 0 or types[index - 1] != 1):
            blocks.append((index, index + 1))
        elif kind == 1:
            blocks[-1] = (blocks[-1][0], index + 1)
    return tuple(blocks)


def family_spec(model_type: str) -> FamilySpec | None:
    return FAMILY_SPECS.get(model_type)


def refusal(model_type: str) -> str | None:
    """None when `model_type` is on the allow-list with nothing unimplemented; else why it is not paged."""
    spec = FAMILY_SPECS.get(model_type)
    if spec is None:
        return REFUSED.get(model_type) or (f"model type {model_type!r} is not on the paged engine's allow-list "
                                           "(vlmserve/models/families.py)")
    missing = [extra for extra in spec.extras if extra not in IMPLEMENTED_EXTRAS]
    if missing:
        return f"per-token decoder inputs the paged engine does not pack yet: {', '.join(missing)}"
    return None
