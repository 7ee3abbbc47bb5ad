"""Load a Hugging Face processor, also where its video half cannot be built.

transformers' video processors need torchvision, which is often absent (and does not import beside some torch
builds). We serve images only, so when `AutoProcessor` fails for that reason we assemble the same processor class
from its image processor (falling back to the Pil variant), its tokenizer and a placeholder video processor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def load_processor(path: str | Path, *, chat_template: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's processor with its chat template; `chat_template` (template text) overrides the model's."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
        logger.info("video processor unavailable (no torchvision); loading an image-only processor")
        processor = _image_only_processor(Path(path), trust_remote_code)
    if chat_template is not None:
        processor.chat_template = chat_template
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.chat_template = chat_template
    elif getattr(processor, "chat_template", None) is None:
        tokenizer_template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
        if tokenizer_template is not None:
            processor.chat_template = tokenizer_template
    return processor


def _processor_class(path: Path) -> type:
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            declared = json.loads(file.read_text(encoding="utf-8")).get("processor_class")
            if declared and hasattr(transformers, declared):
                return getattr(transformers, declared)
    model_type = json.loads((path / "config.json").read_text(encoding="utf-8"))["model_type"]
    class_name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if not class_name or not hasattr(transformers, class_name):
        raise ImportError(f"no processor class known for model type {model_type!r}")
    return getattr(transformers, class_name)


def _image_only_processor(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer
    from transformers.models.auto.image_processing_auto import (
        AutoImageProcessor,  # the top-level name is a stub without torchvision
    )
    from transformers.video_processing_utils import BaseVideoProcessor

    cls = _processor_class(path)
    parts: dict[str, Any] = {}
    for attribute in cls.get_attributes():
        if "video" in attribute:
            # NOTE: a placeholder; prompts with videos are refused before they reach the processor.
            parts[attribute] = BaseVideoProcessor()
        elif "image" in attribute:
            parts[attribute] = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        elif "tokenizer" in attribute:
            parts[attribute] = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        else:
            raise ImportError(f"{cls.__name__} needs a {attribute}, which cannot be built here")
    template = _saved_chat_template(path)
    return _accepting_placeholder_video(cls)(**parts, chat_template=template)


def _accepting_placeholder_video(cls: type) -> type:
    """`cls` with its sub-processor type check relaxed for the video slot only.

    NOTE: without torchvision, transformers' own `BaseVideoProcessor` name resolves to an import stub, so the
    stock check rejects every video processor, even a real `BaseVideoProcessor` instance.
    """

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> type:
        if "video" in argument_name:
            return type(argument)
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class})


def _saved_chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    legacy = path / "chat_template.json"
    if legacy.is_file():
        return json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
    return None
