"""A tiny Qwen-VL-Chat checkpoint, built once per session, and what tests load from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.tiny.qwen_vl_chat import build_qwen_vl_chat


@pytest.fixture(scope="session")
def qwen_vl_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen_vl_chat(tmp_path_factory.mktemp("qwen_vl_chat"))


@pytest.fixture(scope="session")
def qwen_vl_chat_adapter(qwen_vl_chat_dir: Path) -> Any:
    from vlmserve.models.qwen_vl_chat.adapter import load

    return load(qwen_vl_chat_dir, device="cpu", dtype=torch.float32, max_model_len=None)


@pytest.fixture(scope="session")
def qwen_vl_chat_state(qwen_vl_chat_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors read straight from the shards, for reference computations."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(qwen_vl_chat_dir.glob("model-*.safetensors")):
        state.update(load_file(file))
    return state
