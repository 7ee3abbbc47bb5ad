"""A Ray replica with --tensor-parallel-size N is one TP group: Ray must give its actor N GPUs."""

from __future__ import annotations

import pytest

from vlmserve.config import Config, EngineConfig, ModelConfig, RayConfig
from vlmserve.ray import app


def test_a_replica_reserves_one_gpu_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vlmserve.models.loader.resolve_device", lambda device: "cuda")
    config = Config(model=ModelConfig(device="cuda"), engine=EngineConfig(tensor_parallel_size=4))
    assert app._gpus_per_replica(config) == 4.0
    assert app._gpus_per_replica(Config(model=ModelConfig(device="cuda"))) == 1.0
    explicit = Config(engine=EngineConfig(tensor_parallel_size=4), ray=RayConfig(num_gpus_per_replica=8))
    assert app._gpus_per_replica(explicit) == 8.0
