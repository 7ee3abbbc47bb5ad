"""Admission (issue 11, classes 7 and 9): per-client sequence and token quotas and the preparation byte budget."""

from __future__ import annotations

import pytest

from vlmserve.api.admission import Admission
from vlmserve.config import Config, EngineConfig, ServerConfig
from vlmserve.errors import QueueFullError, QuotaExceededError, ServerBusyError


class StubEngine:
    """What Admission asks of an engine: capacity, a client's load and the bytes its requests hold."""

    def __init__(self) -> None:
        self.load: dict[str | None, tuple[int, int]] = {}
        self.held = 0
        self.capacity_left = 100

    def check_can_accept(self, num_sequences: int, *, num_reserved: int = 0) -> None:
        if num_sequences + num_reserved > self.capacity_left:
            raise QueueFullError("full")

    def client_load(self, client_id: str | None) -> tuple[int, int]:
        return self.load.get(client_id, (0, 0))

    def held_prompt_bytes(self) -> int:
        return self.held


def admission(engine: StubEngine, **server: object) -> Admission:
    config = Config(engine=EngineConfig(max_num_seqs=4, max_waiting_requests=4),
                    server=ServerConfig(**server))  # type: ignore[arg-type]
    return Admission(engine, config)  # type: ignore[arg-type]


def test_with_several_keys_each_gets_its_share_of_the_capacity() -> None:
    engine = StubEngine()
    gate = admission(engine, api_key=("a", "b"), max_n=2)
    assert gate.max_sequences_per_client == 4
    engine.load["key-a"] = (3, 300)
    with pytest.raises(QuotaExceededError, match="--max-sequences-per-client"):
        gate.admit("key-a", 2, 10)
    ticket = gate.admit("key-b", 2, 10)  # the other key is untouched by the first one's load
    with pytest.raises(QuotaExceededError):
        gate.admit("key-b", 3, 10)  # preparing requests count too
    gate.release(ticket)
    gate.admit("key-b", 4, 10)


def test_one_key_or_none_means_no_share_by_default() -> None:
    assert admission(StubEngine(), api_key=("a",)).max_sequences_per_client is None
    assert admission(StubEngine()).max_sequences_per_client is None
    assert admission(StubEngine(), max_sequences_per_client=3).max_sequences_per_client == 3


def test_token_quota_counts_engine_and_preparing_tokens() -> None:
    engine = StubEngine()
    gate = admission(engine, max_tokens_per_client=1000)
    engine.load["c"] = (1, 600)
    gate.admit("c", 1, 300)
    with pytest.raises(QuotaExceededError, match="--max-tokens-per-client"):
        gate.admit("c", 1, 200)
    gate.admit("d", 1, 1000)


def test_byte_budget_counts_preparing_and_engine_bytes_and_refuses_with_retry_after() -> None:
    engine = StubEngine()
    gate = admission(engine, max_preparing_bytes=1000)
    first = gate.admit(None, 1, 1)
    gate.hold_bytes(first, 600)
    second = gate.admit(None, 1, 1)
    with pytest.raises(ServerBusyError, match="--max-preparing-bytes") as refused:
        gate.hold_bytes(second, 500)
    assert refused.value.retry_after_s >= 1
    assert second.num_bytes == 0  # nothing counted for a refused hold
    gate.release(first)
    gate.release(first)  # idempotent
    engine.held = 900
    with pytest.raises(ServerBusyError):
        gate.hold_bytes(second, 200)
    gate.hold_bytes(second, 100)
