"""The Ray ingress's engine client refuses, at the call, what needs no generation (so streams can still get a 4xx)."""

from __future__ import annotations

import pytest

from vlmserve.errors import ContextLengthError, QueueFullError
from vlmserve.ray.client import RayEngineClient
from vlmserve.types import EngineStats, GenerationRequest, PreparedPrompt, SamplingParams


def client() -> RayEngineClient:
    engine = RayEngineClient(handle=None, board=None, max_model_len=64, max_sequences_per_replica=2)
    engine._replicas = {"r0": EngineStats(num_running=1)}
    return engine


def request(max_tokens: int | None, n: int = 1) -> GenerationRequest:
    return GenerationRequest(request_id="r", prompt=PreparedPrompt(token_ids=list(range(10))),
                             sampling=SamplingParams(max_tokens=max_tokens, n=n))


def test_max_tokens_beyond_the_context_raises_at_the_call() -> None:
    with pytest.raises(ContextLengthError) as refused:
        client().generate(request(max_tokens=60))  # 10 + 60 > 64: nothing sent to a replica
    assert refused.value.param == "max_tokens" and "54 tokens are left" in refused.value.message


def test_a_full_cluster_raises_at_the_call() -> None:
    with pytest.raises(QueueFullError):
        client().generate(request(max_tokens=4, n=2))
