"""The configuration of Qwen-VL-Chat, read from the checkpoint's own config.json keys.

The published config.json (Qwen/Qwen-VL-Chat, model_type "qwen") carries the Qwen-7B language-model keys
(hidden_size, num_hidden_layers, num_attention_heads, kv_channels, intermediate_size, vocab_size,
layer_norm_epsilon, rotary_pct, rotary_emb_base, use_dynamic_ntk, use_logn_attn, seq_length, no_bias, ...) and a
`visual` dict (heads, image_size, image_start_id, layers, mlp_ratio, output_dim, patch_size, width). Keys that only
steer the remote code (bf16/fp16/fp32, use_flash_attn, onnx_safe, auto_map, tokenizer_type) are kept as read but
ignored: dtype and attention kernels are chosen by vlmserve.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

#: resampler queries per image when `visual` does not say (the remote code's VisionTransformer default)
DEFAULT_NUM_QUERIES = 256


class QwenVLChatConfig(PretrainedConfig):
    """Qwen-VL-Chat: a Qwen-7B decoder fed by a ViT-bigG tower and a 256-query cross-attention resampler."""

    model_type = "qwen"

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        kv_channels: int = 128,
        intermediate_size: int = 22016,
        layer_norm_epsilon: float = 1e-6,
        rotary_pct: float = 1.0,
        rotary_emb_base: float = 10000,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        seq_length: int = 2048,
        max_position_embeddings: int = 8192,
        no_bias: bool = True,
        emb_dropout_prob: float = 0.0,
        attn_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        scale_attn_weights: bool = True,
        use_cache: bool = True,
        visual: dict[str, Any] | None = None,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.kv_channels = kv_channels
        self.intermediate_size = intermediate_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.seq_length = seq_length
        self.max_position_embeddings = max_position_embeddings
        self.no_bias = no_bias
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.visual = dict(visual) if visual is not None else _default_visual()
        # The KV layout transformers' caches and attention functions read: Qwen-7B has no grouped-query attention.
        self.num_key_value_heads = num_attention_heads
        self.head_dim = kv_channels
        kwargs["tie_word_embeddings"] = tie_word_embeddings
        super().__init__(**kwargs)

    # --- derived facts, named once ----------------------------------------------------------------------------

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that get rotary embedding (all of them when rotary_pct is 1.0)."""
        return self.kv_channels if self.rotary_pct == 1.0 else int(self.kv_channels * self.rotary_pct)

    @property
    def mlp_hidden_size(self) -> int:
        """Width of each SwiGLU branch: the checkpoint's intermediate_size counts both branches."""
        return self.intermediate_size // 2

    @property
    def num_image_queries(self) -> int:
        return int(self.visual.get("n_queries", DEFAULT_NUM_QUERIES))

    @property
    def image_start_id(self) -> int:
        return int(self.visual["image_start_id"])

    @property
    def image_end_id(self) -> int:
        # The tokenizer assigns <img>, </img>, <imgpad> consecutive ids (its IMAGE_ST tuple ends with them).
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.image_start_id + 2


def _default_visual() -> dict[str, Any]:
    """The published Qwen-VL-Chat `visual` block."""
    return {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48, "mlp_ratio": 4.9231,
            "output_dim": 4096, "patch_size": 14, "width": 1664}
