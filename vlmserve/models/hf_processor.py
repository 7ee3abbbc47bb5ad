"""Load a Hugging Face processor, also where its video half cannot be built.

transformers' video processors need torchvision, which is often absent (and does not import beside some torch
builds). We serve images only, so when `AutoProcessor` fails for that reason we assemble the same processor class
from its image processor (falling back to the Pil variant), its tokenizer and a placeholder video processor.

Checkpoints come in every layout transformers 5 reads, and the fallback must read them all as transformers does:
the Hub's flat `preprocessor_config.json` (+ `video_preprocessor_config.json`), or one `processor_config.json`
with each sub-processor's settings nested under its attribute name (what `ProcessorMixin.save_pretrained` writes
since transformers 5); the chat template in `chat_template.jinja`, `chat_template.json` or only in
`tokenizer_config.json`.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

from vlmserve.models import hf_compat

logger = logging.getLogger(__name__)


def load_processor(path: str | Path, *, chat_template: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's processor with its chat template; `chat_template` (template text) overrides the model's."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError) as exc:  # transformers raises either when torchvision is missing
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
    _install_video(processor, Path(path))
    return processor


def _install_video(processor: Any, path: Path) -> None:
    """Our torchvision-free video preprocessing for the families that take videos (see video_processing)."""
    from vlmserve.models.video_processing import install_video_processor

    model_type = str(read_json(path / "config.json").get("model_type", ""))
    if install_video_processor(processor, path, model_type):
        logger.info("video input enabled for %s (frames preprocessed without torchvision)", model_type)


def _processor_class(path: Path) -> Any:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        declared = read_json(path / name).get("processor_class")
        if declared:
            return hf_compat.transformers_class(str(declared))
    model_type = read_json(path / "config.json")["model_type"]
    class_name = hf_compat.processor_class_name(model_type)
    if not class_name:
        raise ImportError(f"no processor class known for model type {model_type!r}")
    return hf_compat.transformers_class(class_name)


def _image_only_processor(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    cls = _processor_class(path)
    parts: dict[str, Any] = {}
    for attribute in cls.get_attributes():
        if "video" in attribute:
            # NOTE: a placeholder; prompts with videos are refused before they reach the processor.
            parts[attribute] = hf_compat.placeholder_video_processor()
        elif "image" in attribute:
            parts[attribute] = _image_processor(path, trust_remote_code)
        elif "tokenizer" in attribute:
            parts[attribute] = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        else:
            raise ImportError(f"{cls.__name__} needs a {attribute}, which cannot be built here")
    accepted = inspect.signature(cls.__init__).parameters
    # Sub-processor settings nested under their attribute names were consumed building the parts above.
    settings = {k: v for k, v in read_json(path / "processor_config.json").items()
                if k in accepted and k not in parts}
    settings["chat_template"] = _saved_chat_template(path)
    return _accepting_placeholder_video(cls)(**parts, **settings)


def _image_processor(path: Path, trust_remote_code: bool) -> Any:
    """The image processor, or its Pil variant imported directly where transformers' lazy names refuse it."""
    from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level name is a stub

    try:
        return AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError) as exc:
        if "torchvision" not in str(exc).lower():
            raise
        declared = _declared_image_processor_type(path)
        model_type = str(read_json(path / "config.json").get("model_type", ""))
        pil_cls = hf_compat.pil_image_processor_class(model_type, declared)
        if pil_cls is None:
            raise
        return pil_cls.from_pretrained(path)


def _declared_image_processor_type(path: Path) -> str:
    """The image processor class the checkpoint names: nested in processor_config.json (transformers 5's own
    save) or flat in preprocessor_config.json (the Hub's layout); transformers prefers the nested one."""
    nested = read_json(path / "processor_config.json").get("image_processor")
    if isinstance(nested, dict) and nested.get("image_processor_type"):
        return str(nested["image_processor_type"])
    return str(read_json(path / "preprocessor_config.json").get("image_processor_type", ""))


def read_json(file: Path) -> dict[str, Any]:
    return dict(json.loads(file.read_text(encoding="utf-8"))) if file.is_file() else {}


def _accepting_placeholder_video(cls: Any) -> Any:
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
