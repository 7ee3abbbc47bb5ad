"""Native GLM-4V-9B (THUDM/glm-4v-9b, ModelScope ZhipuAI/glm-4v-9b): loads the original checkpoint unchanged.

The registry uses `matches(config_dict)` and `load(path, device=..., dtype=..., max_model_len=...)`.
"""

from __future__ import annotations

from vlmserve.models.glm4v_9b.adapter import Glm4vAdapter, load, matches
from vlmserve.models.glm4v_9b.config import ChatGLMConfig
from vlmserve.models.glm4v_9b.modeling import ChatGLMForConditionalGeneration
from vlmserve.models.glm4v_9b.processor import Glm4vProcessor

__all__ = ["ChatGLMConfig", "ChatGLMForConditionalGeneration", "Glm4vAdapter", "Glm4vProcessor", "load", "matches"]
