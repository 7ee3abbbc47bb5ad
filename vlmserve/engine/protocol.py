"""The seam between the asyncio front (`engine.client`) and an engine core running in its own thread."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vlmserve.types import EngineStats, FinishReason, GenerationRequest, PositionLogprobs, RequestTimings


@dataclass
class CoreOutput:
    """New tokens of one sequence from one engine step (token ids only: text is made by the client)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    new_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    #: set with finish_reason ERROR: what failed, for the server log (never shown to clients)
    error: str | None = None
    #: on a sequence's first output with a token: its queue and vision-tower timings (for /metrics)
    timings: RequestTimings | None = None


Emit = Callable[[list[CoreOutput]], None]


class EngineCore(Protocol):
    """Runs sequences. `add_request` and `abort_request` may be called from any thread; the rest only from the
    engine thread. `step` may call `emit` several times (the generate core emits every token as it comes)."""

    name: str
    #: the context window sequences may use (the paged core may cap the model's to what its KV cache holds)
    max_model_len: int

    def add_request(self, request: GenerationRequest) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def has_work(self) -> bool: ...

    def step(self, emit: Emit) -> None: ...

    def stats(self) -> EngineStats: ...
