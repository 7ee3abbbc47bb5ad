"""`RayEngineClient`: the `EngineClient` of the Ray ingress, over a handle to the engine replicas.

The ingress runs the same FastAPI app as `vlmserve serve` (validation, media, prompt rendering, streaming); only
generation crosses to a replica. Errors a replica raises for a request (context too long, queue full) come back
as the same typed errors, so the HTTP layer maps them exactly as it does for a local engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from vlmserve.engine.client import model_input_bytes, resolve_max_tokens
from vlmserve.errors import QueueFullError, ServiceUnavailableError, VlmserveError
from vlmserve.types import EngineStats, GenerationRequest, StructuredOutputSpec, TokenDelta

logger = logging.getLogger("vlmserve.ray")

#: with no replica heard from for this long, /health answers 503
DEAD_AFTER_S = 10.0


def sum_stats(stats: list[EngineStats]) -> EngineStats:
    """The counters of several engines added up (gauges summed too: they count things across replicas)."""
    total: dict[str, Any] = {}
    for f in dataclasses.fields(EngineStats):
        values = [getattr(s, f.name) for s in stats]
        total[f.name] = ",".join(sorted(set(values))) if f.name == "engine" else sum(values)
    return EngineStats(**total)


class RayEngineClient:
    """An `EngineClient` whose engines are Ray Serve replicas of `EngineReplica`."""

    def __init__(self, handle: Any, board: Any, *, max_model_len: int, max_sequences_per_replica: int) -> None:
        self._handle = handle
        self._board = board
        self.max_model_len = max_model_len
        self._per_replica = max_sequences_per_replica
        self._replicas: dict[str, EngineStats] = {}
        self._last_seen = time.monotonic()
        self._poller: asyncio.Task[None] | None = None
        # request_id → (client, sequences, tokens, prompt bytes) of what this ingress has in flight (issue 11 quotas)
        self._in_flight: dict[str, tuple[str | None, int, int, int]] = {}

    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        # NOTE: checked here, at the call, as AsyncEngine does: a streaming route then still answers 4xx/429
        # instead of a 200 and an error event (the replica checks again; its engine has the last word)
        self.check_can_accept(request.sampling.n)
        resolve_max_tokens(request, self.max_model_len)
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        from ray.exceptions import RayActorError, RayTaskError

        n = request.sampling.n
        tokens = request.prompt.num_tokens + (request.sampling.max_tokens or self.max_model_len)
        self._in_flight[request.request_id] = (request.client_id, n, n * tokens,
                                               model_input_bytes(request.prompt.model_inputs))
        stream = self._handle.options(stream=True).generate.remote(request)
        try:
            async for delta in stream:
                yield delta
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, VlmserveError):
                raise cause from None  # the replica's typed error, mapped by the API as a local one would be
            raise
        except RayActorError as exc:
            raise ServiceUnavailableError("the replica serving this request stopped; retry it") from exc
        finally:
            self._in_flight.pop(request.request_id, None)
            with contextlib.suppress(Exception):
                stream.cancel()  # the client went away or failed: the replica aborts the sequences

    async def compile_structured(self, spec: StructuredOutputSpec) -> None:
        """Compiled on a replica (each replica caches what it compiled; the request's own replica may compile again).
        """
        from ray.exceptions import RayTaskError

        try:
            await self._handle.compile_structured.remote(spec)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, VlmserveError):
                raise cause from None
            raise

    def stats(self) -> EngineStats:
        return sum_stats(list(self._replicas.values())) if self._replicas else EngineStats(engine="ray")

    def stats_by_replica(self) -> dict[str, EngineStats]:
        return dict(self._replicas)

    def check_can_accept(self, num_sequences: int, *, num_reserved: int = 0) -> None:
        if not self._replicas:
            raise ServiceUnavailableError("no engine replica is ready yet; retry shortly")
        held = sum(s.num_running + s.num_waiting for s in self._replicas.values())
        capacity = self._per_replica * len(self._replicas)
        if held + num_reserved + num_sequences > capacity:
            raise QueueFullError(f"every replica is at capacity ({capacity} sequences over {len(self._replicas)} "
                                 "replicas); retry shortly", retry_after_s=1.0)

    def client_load(self, client_id: str | None) -> tuple[int, int]:
        """What this ingress has in flight for `client_id` (per ingress: with several ingresses, per ingress)."""
        mine = [entry for entry in self._in_flight.values() if entry[0] == client_id]
        return sum(entry[1] for entry in mine), sum(entry[2] for entry in mine)

    def held_prompt_bytes(self) -> int:
        return sum(entry[3] for entry in self._in_flight.values())

    @property
    def is_dead(self) -> bool:
        return not self._replicas and time.monotonic() - self._last_seen > DEAD_AFTER_S

    async def shutdown(self, timeout_s: float) -> None:
        if self._poller is not None:
            self._poller.cancel()

    async def _poll_forever(self) -> None:
        from vlmserve.ray.stats_board import REPORT_INTERVAL_S

        while True:
            try:
                self._replicas = await self._board.snapshot.remote()
            except Exception:  # a board being recreated: keep the last view, try again
                logger.debug("stats board unavailable", exc_info=True)
            if self._replicas:
                self._last_seen = time.monotonic()
            await asyncio.sleep(REPORT_INTERVAL_S)
