"""The contract between the engines and a loaded model.

Both engines drive a model only through `ModelAdapter`:

- the generate engine (fallback) needs `model.generate` and `collate` (left-padded batches);
- the paged engine (continuous batching) needs the pieces of a forward pass it can run on packed ragged batches:
  `encode_images`, `embed_prompt`, `prompt_positions`, `embed_tokens`, `text_model`, `compute_logits`.

Prompts are rendered by `vlmserve.multimodal.prompt` through `processor`, an object with the Hugging Face processor
surface (`apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)` and
`__call__(text=[...], images=[...], return_tensors="pt")`); native ports (e.g. GLM-4V-9B) ship their own.

Attention: `text_model` must route every attention layer through
`transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`, called as
`fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)` with query/key/value shaped
(batch, heads, tokens, head_dim) after rotary embedding and `module.layer_idx` set. That is how the paged engine
swaps in its own paged attention without porting the architecture.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from vlmserve.types import PreparedPrompt


@dataclass(frozen=True)
class KVLayout:
    """Shape of the language model's KV cache, per layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    #: the layers that keep KV (indices into the decoder's layers); None: all of them. Hybrid decoders (Qwen3.5)
    #: keep a recurrent state in their other layers instead (`RecurrentLayout`)
    attention_layers: tuple[int, ...] | None = None

    def has_kv(self, layer: int) -> bool:
        return self.attention_layers is None or layer in self.attention_layers

    @property
    def num_kv_layers(self) -> int:
        return self.num_layers if self.attention_layers is None else len(self.attention_layers)


@dataclass(frozen=True)
class RecurrentLayout:
    """Per-sequence state of a hybrid decoder's recurrent (linear-attention) layers, kept beside the paged KV.

    Each such layer keeps, per sequence, the last inputs of its causal convolution and the recurrent (delta-rule)
    state. Unlike KV, the state after token n cannot be rebuilt from anything but tokens 0..n.
    """

    #: decoder layer indices with a recurrent state
    layers: tuple[int, ...]
    #: (channels, kernel - 1): the convolution's left context, in the model's dtype
    conv_shape: tuple[int, int]
    #: (value heads, key dim, value dim): the recurrent state, kept in float32 as the model's own cache does
    state_shape: tuple[int, int, int]

    def bytes_per_sequence(self, dtype: torch.dtype) -> int:
        import torch

        conv = self.conv_shape[0] * self.conv_shape[1] * torch.tensor([], dtype=dtype).element_size()
        state = self.state_shape[0] * self.state_shape[1] * self.state_shape[2] * 4
        return len(self.layers) * (conv + state)


@dataclass
class PromptEmbedding:
    """A prompt ready for the language model: embeddings and positions for every prompt token.

    `positions` is (rows, tokens): 1 row for ordinary RoPE, 3 for M-RoPE (Qwen2-VL family), 4 for Qwen3-VL's
    (text + 3). `rope_delta` shifts generated positions: token at sequence index i > prompt gets
    position i + rope_delta on every row.
    """

    inputs_embeds: torch.Tensor  # (tokens, hidden)
    positions: torch.Tensor  # (rows, tokens), int64
    rope_delta: int = 0
    #: dynamic-NTK factor of the sequence's rotary base, chosen by its prompt and kept for all its tokens
    #: (Qwen-VL-Chat past seq_length); 1.0: the model's own base
    ntk_alpha: float = 1.0
    #: per-token tensors some families inject into decoder layers; None for most. Qwen3-VL deepstack (and Granite 4
    #: Vision's layer features, in the same layout): "visual_mask" (tokens,) bool, the image tokens; "deepstack"
    #: (layers, image tokens, hidden)
    extras: dict[str, Any] | None = None


class ModelAdapter(ABC):
    """One loaded vision-language model, as both engines see it."""

    #: short family name for logs and the support table, e.g. "qwen2_vl"
    family: str = "unknown"
    #: None when any number of images per prompt is fine
    max_images_per_prompt: int | None = None
    #: trim whitespace around answers, as the family's original chat() does
    strip_answer_whitespace: bool = False
    #: the placeholder token of video features; None when the model takes no video here
    video_token_id: int | None = None

    def __init__(self, model: Any, processor: Any, *, max_model_len: int, eos_token_ids: frozenset[int],
                 image_token_id: int | None) -> None:
        self.model = model
        self.processor = processor
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.image_token_id = image_token_id

    # --- shared ----------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def paged_support(self) -> str | None:
        """None when the paged engine can run this model; otherwise the reason it cannot (logged)."""
        return None

    # --- generate engine -------------------------------------------------------------------------------------

    @abstractmethod
    def collate(self, prompts: list[PreparedPrompt]) -> dict[str, Any]:
        """Inputs for `model.generate` over several prompts, left-padded, on the model's device."""

    # --- paged engine ----------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def kv_layout(self) -> KVLayout: ...

    @property
    def num_position_rows(self) -> int:
        return 1

    def attention_blocks(self, prompt: PreparedPrompt) -> tuple[tuple[int, int], ...]:
        """Token ranges [start, end) of `prompt` that attend bidirectionally inside the causal mask (Gemma 3's
        image blocks, PaliGemma's prefix); empty for a causal decoder."""
        return ()

    @property
    def blocks_spare_window(self) -> bool:
        """Whether sliding-window layers leave the bidirectional blocks whole (else the window cuts them too)."""
        return False

    @abstractmethod
    def encode_images(self, prompt: PreparedPrompt) -> list[torch.Tensor]:
        """Run the vision tower: one (tokens_i, hidden) tensor per image of the prompt, in prompt order."""

    def encode_image_batch(self, prompts: list[PreparedPrompt]) -> list[list[torch.Tensor]]:
        """`encode_images` of several prompts. Adapters whose vision tower can take all their images in one call
        override this: a tower over one image is launch-bound on a GPU, so batching is most of its speed."""
        return [self.encode_images(prompt) for prompt in prompts]

    def encode_videos(self, prompt: PreparedPrompt) -> list[torch.Tensor]:
        """One (tokens_i, hidden) tensor per video of the prompt; only adapters with a `video_token_id` have videos."""
        raise NotImplementedError(f"{type(self).__name__} takes no video")

    def enable_vision_graphs(self) -> bool:
        """Replay the vision tower from CUDA graphs where it can be captured; False where it cannot."""
        return False

    def run_vision_at_budget(self) -> bool:
        """Run the vision tower once on the largest input one engine call may hand it (random pixels), so that
        the memory profile can measure its peak; False where the adapter has no such bound."""
        return False

    @abstractmethod
    def embed_prompt(self, prompt: PreparedPrompt, image_embeds: list[torch.Tensor],
                     video_embeds: list[torch.Tensor] | None = None) -> PromptEmbedding:
        """Text embeddings with `image_embeds` merged at the image-token positions (and `video_embeds` at the
        video-token positions, for adapters with a `video_token_id`), and positions."""

    @abstractmethod
    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of generated tokens: (tokens,) → (tokens, hidden)."""

    @property
    @abstractmethod
    def text_model(self) -> torch.nn.Module:
        """The decoder: `text_model(inputs_embeds=(1, T, H), position_ids=(rows, 1, T) or (1, T))` returns an
        object whose `last_hidden_state` is (1, T, H)."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(tokens, hidden) → (tokens, vocab) in float32."""

    def prefix_cache_scope(self, prompt: PreparedPrompt) -> str | None:
        """What besides tokens and images makes this prompt's KV differ from another's with the same prefix (a
        dynamic-NTK rotary base chosen by the prompt's length); prompts of different scopes share no block."""
        return None

    # --- cross-attention decoders (Mllama) --------------------------------------------------------------------

    @property
    def has_cross_attention(self) -> bool:
        """Whether the decoder's cross-attention layers read per-request vision K/V (`models.cross_attention`)."""
        return False

    def cross_attention_kv(self, prompt: PreparedPrompt, image_embeds: list[torch.Tensor]) -> Any:
        """The prompt's `CrossKV` from its images' `encode_images` output; None for a prompt without images."""
        return None

    # --- hybrid decoders (recurrent layers beside attention) ------------------------------------------------

    @property
    def recurrent_layout(self) -> RecurrentLayout | None:
        """The per-sequence recurrent state of the decoder's linear-attention layers; None for plain decoders."""
        return None

    def recurrent_modules(self) -> dict[int, torch.nn.Module]:
        """The decoder's recurrent token mixers by layer index (those `recurrent_layout.layers` names)."""
        return {}

    def run_recurrent(self, module: torch.nn.Module, hidden: torch.Tensor, segments: list[tuple[int, int]],
                      conv: torch.Tensor, state: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One recurrent layer over a packed step: `hidden` (rows, hidden) holds the step's sequences one after
        another, sequence i at rows `segments[i]`, starting from its `conv[i]` and `state[i]`; returns the output
        rows and every sequence's conv and state after its rows."""
        raise NotImplementedError(f"{self.family} has no recurrent layers")
