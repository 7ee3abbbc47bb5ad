"""Find a model's files (local, Hugging Face, ModelScope or the bundled demo) and load it into an adapter."""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from vlmserve.config import ModelConfig
from vlmserve.errors import ModelLoadError
from vlmserve.models.base import ModelAdapter

logger = logging.getLogger(__name__)

DEMO_WEIGHTS = Path(__file__).resolve().parent.parent / "demo" / "weights"

#: native ports, tried in order before the generic transformers path; each has matches(config) and load(...)
NATIVE_ADAPTERS = ("vlmserve.models.glm4v_9b.adapter", "vlmserve.models.qwen_vl_chat.adapter")


def resolve_model_path(model: str | None, *, revision: str | None = None) -> Path:
    """A local directory holding the model's files, downloading them first if needed."""
    if model is None:
        if not (DEMO_WEIGHTS / "config.json").is_file():
            raise ModelLoadError("the bundled demo model is missing from this installation "
                                 f"({DEMO_WEIGHTS}); pass a MODEL to serve instead")
        return DEMO_WEIGHTS
    if model.startswith("modelscope:"):
        return _download_modelscope(model.removeprefix("modelscope:"), revision)
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{local} has no config.json: not a model directory")
        return local.resolve()
    if local.is_absolute() or model.startswith("."):
        raise ModelLoadError(f"no such model directory: {model}")
    return _download_hf(model, revision)


def _download_hf(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logger.info("fetching %s from the Hugging Face hub (or its local cache)", repo_id)
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached "
                             "(HF_HUB_OFFLINE=1 or no network); run `vlmserve download` where there is "
                             "network, or pass a local directory") from exc
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"cannot download {repo_id} from the Hugging Face hub: {exc}") from exc


def _download_modelscope(model_id: str, revision: str | None) -> Path:
    try:
        modelscope = importlib.import_module("modelscope")
    except ImportError as exc:
        raise ModelLoadError("ModelScope models need the optional dependency: pip install 'vlmserve[modelscope]'"
                             ) from exc
    logger.info("fetching %s from ModelScope (or its local cache)", model_id)
    try:
        return Path(modelscope.snapshot_download(model_id, revision=revision))
    except Exception as exc:  # NOTE: modelscope raises many unrelated types; all mean "could not fetch"
        raise ModelLoadError(f"cannot download {model_id} from ModelScope: {type(exc).__name__}") from exc


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("--device cuda: no CUDA device is available")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(config: ModelConfig) -> ModelAdapter:
    """Resolve, load and wrap the configured model; logs progress and timing."""
    path = resolve_model_path(config.model, revision=config.revision)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    template = Path(config.chat_template).read_text(encoding="utf-8") if config.chat_template else None
    started = time.monotonic()
    logger.info("loading %s on %s (%s)", path, device, str(dtype).removeprefix("torch."))
    raw_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    for module_name in NATIVE_ADAPTERS:
        # NOTE: no ImportError is caught here: the ports are part of this package, and a broken one falling through
        # to the generic loader would serve its checkpoint wrongly (or fail later, far from the cause).
        native = importlib.import_module(module_name)
        if native.matches(raw_config):
            adapter = native.load(path, device=device, dtype=dtype, max_model_len=config.max_model_len)
            break
    else:
        from vlmserve.models.hf_loader import load_hf_model

        adapter = load_hf_model(path, device=device, dtype=dtype, max_model_len=config.max_model_len,
                                trust_remote_code=config.trust_remote_code, chat_template=template)
    if template is not None and config.chat_template:
        adapter.processor.chat_template = template
    logger.info("loaded %s (%s) in %.1fs", path.name, adapter.family, time.monotonic() - started)
    return adapter
