"""Load this rank's shard of a model: build it with parameters on the meta device, shard the decoder's modules,
then read only this rank's slices of each tensor from the safetensors files (`safe_open(...).get_slice`).

No rank ever holds the whole decoder, in host or device memory: a 72B checkpoint at 4 ranks costs each rank a
quarter of the decoder plus the replicated parts (embeddings, lm_head, the vision tower). Buffers computed in the
modules' constructors (rotary frequencies) are built for real on the host, as `from_pretrained` would.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from vlmserve.config import ModelConfig
from vlmserve.engine.parallel.group import TensorParallelGroup
from vlmserve.engine.parallel.sharding import FLAG, ShardPlan, shard_glm4v_9b, shard_standard_decoder
from vlmserve.errors import ModelLoadError, TensorParallelError
from vlmserve.models import hf_compat
from vlmserve.models.base import ModelAdapter

logger = logging.getLogger(__name__)

Renamer = Callable[[str], tuple[str, bool]]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init); buffers stay real."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        with hf_compat.no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def check_supported(path: Path, size: int, *, trust_remote_code: bool) -> str:
    """The family of the checkpoint at `path` if `--tensor-parallel-size size` can shard it; else raise
    `TensorParallelError` naming the family. Reads config.json only (cheap: runs before any worker starts)."""
    from vlmserve.models.families import family_spec, refusal
    from vlmserve.models.glm4v_9b import adapter as glm4v_9b
    from vlmserve.models.qwen_vl_chat import adapter as qwen_vl_chat

    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    family = str(raw.get("model_type", "unknown"))
    if glm4v_9b.matches(raw):
        return "glm4v_9b"
    if qwen_vl_chat.matches(raw):
        raise TensorParallelError(f"qwen_vl_chat (Qwen-VL-Chat, native port) cannot be sharded: {FLAG} > 1 "
                                  "supports transformers families with standard projection names and GLM-4V-9B")
    if trust_remote_code and raw.get("auto_map"):
        raise TensorParallelError(f"{family}: models that run their repository's own code cannot be sharded by "
                                  f"{FLAG}")
    spec = family_spec(family)
    if spec is None:
        why = refusal(family) or "the family is not on the paged engine's allow-list"
        raise TensorParallelError(f"{family} cannot be sharded by {FLAG}: it runs on the generate engine only "
                                  f"({why}), and tensor parallelism is a paged-engine feature")
    if spec.cross_attention:
        raise TensorParallelError(f"{family} cannot be sharded by {FLAG}: its cross-attention layers and their "
                                  "per-request K/V have no sharding plan; serve it on one device")
    return family


def load_shard(model_config: ModelConfig, group: TensorParallelGroup) -> ModelAdapter:
    """This rank's adapter: the model with its decoder sharded over `group`, loaded slice by slice."""
    from vlmserve.models.loader import resolve_dtype, resolve_model_path

    path = resolve_model_path(model_config.model, revision=model_config.revision)
    device = group.device
    dtype = resolve_dtype(model_config.dtype, device.type)
    family = check_supported(path, group.size, trust_remote_code=model_config.trust_remote_code)
    if family == "glm4v_9b":
        return _load_glm4v_9b(path, model_config, group, dtype)
    return _load_hf(path, model_config, group, dtype)


def _load_hf(path: Path, model_config: ModelConfig, group: TensorParallelGroup, dtype: torch.dtype) -> ModelAdapter:
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmserve.models.families import family_spec
    from vlmserve.models.hf_loader import build_hf_adapter

    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=model_config.trust_remote_code)
    family = str(hf_config.model_type)
    spec = family_spec(family)
    assert spec is not None  # check_supported refused the others
    with parameters_on_meta():
        model = AutoModelForImageTextToText.from_config(hf_config, dtype=dtype)
    decoder = getattr(getattr(model, "model", model), spec.decoder, None)
    if decoder is None:
        raise TensorParallelError(f"{family}: no decoder at .model.{spec.decoder}; {FLAG} cannot shard it")
    text_config = model.config.get_text_config()
    plan = shard_standard_decoder(model, decoder, text_config, family, group)
    decoder_config = getattr(decoder, "config", None)
    if decoder_config is not None and decoder_config is not text_config:
        _copy_head_counts(text_config, decoder_config)
    if model_config.load_format == "dummy":
        fill_random(model, group.device, dtype)
    else:
        read_shards(model, path, plan, group.device, dtype, hf_compat.checkpoint_key_renamer(model))
    return build_hf_adapter(model.eval(), path, max_model_len=model_config.max_model_len,
                            trust_remote_code=model_config.trust_remote_code, chat_template=_template(model_config))


def _copy_head_counts(source: Any, target: Any) -> None:
    for name in ("head_dim", "num_attention_heads", "num_key_value_heads"):
        setattr(target, name, getattr(source, name))


def _template(model_config: ModelConfig) -> str | None:
    return Path(model_config.chat_template).read_text(encoding="utf-8") if model_config.chat_template else None


def _load_glm4v_9b(path: Path, model_config: ModelConfig, group: TensorParallelGroup,
                   dtype: torch.dtype) -> ModelAdapter:
    from vlmserve.models.glm4v_9b.adapter import build_adapter
    from vlmserve.models.glm4v_9b.config import ChatGLMConfig
    from vlmserve.models.glm4v_9b.modeling import ChatGLMForConditionalGeneration
    from vlmserve.models.glm4v_9b.processor import Glm4vProcessor

    config = ChatGLMConfig.from_pretrained(path)
    with parameters_on_meta():
        model = ChatGLMForConditionalGeneration(config)
    plan = shard_glm4v_9b(model, group)
    if model_config.load_format == "dummy":
        fill_random(model, group.device, dtype)
    else:
        read_shards(model, path, plan, group.device, dtype, _identity)
    return build_adapter(model, Glm4vProcessor.from_pretrained(path), model_config.max_model_len)


def _identity(key: str) -> tuple[str, bool]:
    return key, False


def read_shards(model: Any, path: Path, plan: ShardPlan, device: torch.device, dtype: torch.dtype,
                rename: Renamer) -> None:
    """Fill every meta parameter of `model` from the checkpoint: sharded ones from their slices, the rest whole.
    Floating-point tensors take `dtype`; buffers move to `device`."""
    params = dict(model.named_parameters())
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 (a safetensors reader is not a dict)
                name, needs_conversion = rename(key)
                if name not in params:
                    continue  # e.g. rotary buffers some checkpoints carry
                if needs_conversion:
                    raise TensorParallelError(f"checkpoint key {key} needs a weight conversion that {FLAG} does not "
                                              "apply; load this checkpoint without tensor parallelism")
                tensor = _read(reader.get_slice(key), plan.slices.get(name))
                target = params[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise TensorParallelError(f"{key}: this rank's slice is {tuple(tensor.shape)}, the sharded "
                                              f"module wants {tuple(target.shape)}")
                _set_parameter(model, name, tensor.to(device=device, dtype=dtype if tensor.is_floating_point()
                                                      else tensor.dtype))
    if any(p.is_meta for p in model.parameters()) and hasattr(model, "tie_weights"):
        model.tie_weights()  # lm_head tied to the embeddings: absent from the checkpoint
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"{path}: the checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
    _move_buffers(model, device)


def fill_random(model: Any, device: torch.device, dtype: torch.dtype) -> None:
    """--load-format dummy: every parameter random (std 0.02, as transformers initialises linears), norms' 1-D
    weights one, on `device` — a benchmark's stand-in for a checkpoint (speed does not depend on the values)."""
    for name, param in list(model.named_parameters()):
        if param.dim() == 1:
            value = torch.ones(param.shape, dtype=dtype, device=device) if name.endswith("weight") else \
                torch.zeros(param.shape, dtype=dtype, device=device)
        else:
            value = torch.empty(param.shape, dtype=dtype, device=device).normal_(0.0, 0.02)
        _set_parameter(model, name, value)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _move_buffers(model, device)


def _move_buffers(model: Any, device: torch.device) -> None:
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def _read(view: Any, spec: tuple[int, tuple[tuple[int, int], ...]] | None) -> torch.Tensor:
    if spec is None:
        return view[:]
    dim, pieces = spec
    parts = [view[start:end] if dim == 0 else view[:, start:end] for start, end in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TensorParallelError(f"{path} has no .safetensors files; {FLAG} reads shards from safetensors only")
    return files
