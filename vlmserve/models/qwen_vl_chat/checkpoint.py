"""Load the published Qwen-VL-Chat checkpoint directory, unchanged, into `QwenVLChatForCausalLM`.

The weights are read under their own names (no renaming) from sharded safetensors with
`model.safetensors.index.json`, a single `model.safetensors`, or the PyTorch equivalents
(`pytorch_model.bin.index.json` / `pytorch_model.bin`, loaded with `weights_only=True`). Every parameter of the
model must be present and every tensor of the checkpoint must be used, with the shape the config implies;
anything else is a load error naming the tensors, so a checkpoint of another layout never loads half-right.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from vlmserve.errors import ModelLoadError
from vlmserve.models import hf_compat
from vlmserve.models.qwen_vl_chat.config import QwenVLChatConfig
from vlmserve.models.qwen_vl_chat.modeling import QwenVLChatForCausalLM

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files, in index order."""
    for name in _INDEXES:
        index = path / name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [path / file for file in dict.fromkeys(weight_map.values())]
    for name in _SINGLE_FILES:
        if (path / name).is_file():
            return [path / name]
    raise ModelLoadError(f"{path} has no weights (looked for {', '.join(_INDEXES + _SINGLE_FILES)})")


def iter_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, on the CPU."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as shard:
            for name in shard.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, shard.get_tensor(name)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()


def load_checkpoint(path: str | Path, *, device: str | torch.device, dtype: torch.dtype,
                    attn_implementation: str = "sdpa") -> QwenVLChatForCausalLM:
    """Build the model from config.json and fill it with the checkpoint's tensors, cast to `dtype`."""
    path = Path(path)
    config = QwenVLChatConfig.from_pretrained(path)
    hf_compat.use_attention(config, attn_implementation)
    with torch.device("meta"):
        model = QwenVLChatForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        for name, tensor in iter_tensors(file):
            if name in expected and tuple(tensor.shape) != expected[name]:
                raise ModelLoadError(f"{file.name}: {name} has shape {tuple(tensor.shape)}, the config implies "
                                     f"{expected[name]}")
            target = dtype if tensor.is_floating_point() else tensor.dtype
            state[name] = tensor.to(device=device, dtype=target)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ModelLoadError(f"{path} is not a Qwen-VL-Chat checkpoint of this layout: "
                             f"missing {_some(missing)}, unexpected {_some(unexpected)}")
    model.load_state_dict(state, strict=True, assign=True)
    # Parameters that never require gradients in the original (the resampler's fixed sin-cos table).
    model.transformer.visual.attn_pool.pos_embed.requires_grad_(False)
    return model.eval()


def _some(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
