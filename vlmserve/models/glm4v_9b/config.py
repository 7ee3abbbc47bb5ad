"""The configuration of the original GLM-4V-9B checkpoint (THUDM/glm-4v-9b, ModelScope ZhipuAI/glm-4v-9b).

The checkpoint's `config.json` declares `"model_type": "chatglm"` and the ChatGLM key names (`num_layers`,
`padded_vocab_size`, `kv_channels`, `multi_query_group_num`, ...) plus a `vision_config` dict for its EVA2-CLIP
tower. This class reads those keys unchanged; defaults follow the published `configuration_chatglm.py`, and the
values of the released checkpoint are listed in `GLM4V_9B_CONFIG` (used by tests and the GPU benchmark).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

#: config.json of the released checkpoint (THUDM/glm-4v-9b, the transformers>=4.44 revision), minus auto_map.
GLM4V_9B_CONFIG: dict[str, Any] = {
    "_name_or_path": "THUDM/glm-4v-9b",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "vision_config": {
        "dropout_prob": 0.0,
        "hidden_act": "gelu",
        "in_channels": 3,
        "num_hidden_layers": 63,
        "hidden_size": 1792,
        "patch_size": 14,
        "num_heads": 16,
        "intermediate_size": 15360,
        "layer_norm_eps": 1e-06,
        "num_positions": 6401,
        "image_size": 1120,
        "scaling_factor": 8,
    },
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "attn_implementation": "sdpa",
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1.5625e-07,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 40,
    "original_rope": True,
    "padded_vocab_size": 151552,
    "post_layer_norm": True,
    "rmsnorm": True,
    # NOTE: the model card says 8K context; one redistributed copy (sophgo/LLM-TPU) lowers this to 2048.
    "seq_length": 8192,
    "use_cache": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.0",
    "tie_word_embeddings": False,
    "eos_token_id": [151329, 151336, 151338],
    "pad_token_id": 151329,
    "boi_token_id": 151339,
    "eoi_token_id": 151340,
}


class ChatGLMConfig(PretrainedConfig):
    """GLM-4V-9B's `config.json`, with the original key names.

    `attribute_map` exposes the names transformers' generic code looks for (`num_hidden_layers`, `vocab_size`) as
    aliases, so saving writes the original keys back.
    """

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers", "vocab_size": "padded_vocab_size"}
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        num_layers: int = 28,
        padded_vocab_size: int = 65024,
        hidden_size: int = 4096,
        ffn_hidden_size: int = 13696,
        kv_channels: int = 128,
        num_attention_heads: int = 32,
        seq_length: int = 2048,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        layernorm_epsilon: float = 1e-5,
        rmsnorm: bool = True,
        apply_residual_connection_post_layernorm: bool = False,
        post_layer_norm: bool = True,
        add_bias_linear: bool = False,
        add_qkv_bias: bool = False,
        multi_query_attention: bool = False,
        multi_query_group_num: int = 1,
        rope_ratio: float = 1,
        original_rope: bool = True,
        vision_config: dict[str, Any] | None = None,
        boi_token_id: int | None = None,
        eoi_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.rope_ratio = rope_ratio
        self.original_rope = original_rope
        self.vision_config = dict(vision_config or {})
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        super().__init__(**kwargs)

    # --- derived sizes (names as transformers' generic code expects) -----------------------------------------

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def num_key_value_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image after the 2x2 stride-2 convolution (1600 at 1120 px with 14 px patches)."""
        grid = self.vision_config["image_size"] // self.vision_config["patch_size"] // 2
        return grid * grid
