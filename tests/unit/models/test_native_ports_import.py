"""A native port that fails to import stops the load; it never falls through to the generic transformers path."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from vlmserve.config import ModelConfig
from vlmserve.models import loader


def test_a_broken_native_port_fails_the_load_loudly(tiny_qwen2_vl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module
    generic: list[Any] = []

    def import_module(name: str, *args: Any) -> Any:
        if name == loader.NATIVE_ADAPTERS[0]:
            raise ImportError("injected: the port's module is broken")
        return real_import(name, *args)

    monkeypatch.setattr(loader.importlib, "import_module", import_module)
    monkeypatch.setattr("vlmserve.models.hf_loader.load_hf_model", lambda *a, **k: generic.append(a))
    with pytest.raises(ImportError, match="the port's module is broken"):
        loader.load_model(ModelConfig(model=str(tiny_qwen2_vl)))
    assert not generic
