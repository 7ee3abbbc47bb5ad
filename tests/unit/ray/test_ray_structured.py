"""The Ray ingress compiles a request's grammar on a replica and surfaces its typed refusal, without a cluster."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("ray.exceptions")

from ray.exceptions import RayTaskError

from vlmserve.errors import InvalidRequestError
from vlmserve.ray.client import RayEngineClient
from vlmserve.types import StructuredOutputSpec


class _Method:
    def __init__(self, outcome: BaseException | None) -> None:
        self.outcome = outcome
        self.calls: list[Any] = []

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)

        async def answer() -> None:
            if self.outcome is not None:
                raise self.outcome

        return answer()


class _Handle:
    def __init__(self, outcome: BaseException | None) -> None:
        self.compile_structured = _Method(outcome)


def test_a_replica_refusal_comes_back_as_the_typed_error() -> None:
    refusal = InvalidRequestError("the regex cannot be enforced", param="response_format")
    handle = _Handle(RayTaskError("compile_structured", "traceback", refusal))
    client = RayEngineClient(handle, board=None, max_model_len=64, max_sequences_per_replica=4)
    spec = StructuredOutputSpec("regex", "a(b")
    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(client.compile_structured(spec))
    assert caught.value is refusal and handle.compile_structured.calls == [(spec,)]


def test_a_spec_a_replica_compiles_passes() -> None:
    handle = _Handle(None)
    client = RayEngineClient(handle, board=None, max_model_len=64, max_sequences_per_replica=4)
    asyncio.run(client.compile_structured(StructuredOutputSpec("choice", ("a",))))
    assert len(handle.compile_structured.calls) == 1
