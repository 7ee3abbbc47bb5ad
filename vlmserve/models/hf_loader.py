"""Load a transformers VLM checkpoint into `HFAdapter`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vlmserve.errors import ModelLoadError
from vlmserve.models.families import family_spec
from vlmserve.models.hf import HFAdapter
from vlmserve.models.hf_processor import load_processor
from vlmserve.models.moe_experts import install_grouped_experts
from vlmserve.models.vision_attention import install_vision_attention

logger = logging.getLogger(__name__)


def load_hf_model(path: Path, *, device: str, dtype: Any, max_model_len: int | None, trust_remote_code: bool,
                  chat_template: str | None) -> HFAdapter:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if trust_remote_code:
        logger.warning("--trust-remote-code: Python code shipped inside %s will run with this server's "
                       "permissions. Only do this for repositories whose code you have read or trust.", path)
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(f"{path} ships its own model code, which runs only with --trust-remote-code "
                                 "(read it first: it runs with this server's permissions)") from exc
        raise
    is_remote_code = trust_remote_code and bool(getattr(hf_config, "auto_map", None))
    model = None
    auto_classes: tuple[Any, ...] = (AutoModelForImageTextToText, AutoModelForCausalLM)
    for auto_cls in auto_classes:
        try:
            model = auto_cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
            break
        except ValueError:  # "Unrecognized configuration class" for this auto class: try the next one
            continue
    if model is None:
        raise ModelLoadError(f"{path}: transformers has no image-text-to-text model for model type "
                             f"{hf_config.model_type!r}; if the repository ships its own code, add "
                             "--trust-remote-code")
    model = model.to(device).eval()
    return build_hf_adapter(model, path, max_model_len=max_model_len, trust_remote_code=trust_remote_code,
                            chat_template=chat_template, is_remote_code=is_remote_code)


def build_hf_adapter(model: Any, path: Path, *, max_model_len: int | None, trust_remote_code: bool,
                     chat_template: str | None, is_remote_code: bool = False) -> HFAdapter:
    """Wrap a loaded (or shard-loaded) transformers model with its processor into the adapter both engines use."""
    spec = family_spec(str(model.config.model_type))
    if spec is not None and spec.vision_attention == "varlen" and install_vision_attention(model):
        logger.info("vision tower: one varlen attention call per layer")
    if spec is not None and spec.experts == "grouped" and (switched := install_grouped_experts(model)):
        logger.info("MoE: %d expert layers run as grouped GEMMs", switched)
    processor = load_processor(path, chat_template=chat_template, trust_remote_code=trust_remote_code)
    if getattr(processor, "chat_template", None) is None:
        raise ModelLoadError(f"{path} ships no chat template; pass one with --chat-template FILE")
    adapter = HFAdapter(model, processor, max_model_len=_context_length(model.config, max_model_len),
                        eos_token_ids=_eos_token_ids(model, processor),
                        image_token_id=_image_token_id(model, processor))
    adapter.is_remote_code = is_remote_code
    return adapter


def _context_length(config: Any, requested: int | None) -> int:
    text = config.get_text_config()
    native = getattr(text, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)
    if requested is None:
        if native is None:
            raise ModelLoadError("the model does not state its context length; pass --max-model-len")
        return int(native)
    if native is not None and requested > native:
        logger.warning("--max-model-len %d exceeds the model's %d positions; outputs past it may degrade",
                       requested, native)
    return requested


def _eos_token_ids(model: Any, processor: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config,
                   getattr(processor, "tokenizer", processor)):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ModelLoadError("the model defines no end-of-sequence token")
    return frozenset(ids)


def _image_token_id(model: Any, processor: Any) -> int | None:
    for source, name in ((model.config, "image_token_id"), (model.config, "image_token_index"),
                         (processor, "image_token_id")):
        value = getattr(source, name, None)
        if isinstance(value, int):
            return value
    return None
