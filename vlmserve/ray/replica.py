"""`EngineReplica`: one vlmserve engine inside a Ray Serve replica.

The replica loads the model, runs the same `AsyncEngine` as `vlmserve serve`, and streams `TokenDelta`s to the
ingress. Ray restarts a replica whose `check_health` raises (the engine died); its counters reach the ingress
through the stats board.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from vlmserve.config import Config
from vlmserve.engine.client import AsyncEngine
from vlmserve.serve import PromptKit, build_engine, load_for_serving
from vlmserve.types import GenerationRequest, StructuredOutputSpec, TokenDelta

logger = logging.getLogger("vlmserve.ray")


class EngineReplica:
    """Deployed with `serve.deployment(EngineReplica)`; see vlmserve.ray.app."""

    async def __init__(self, config: Config, app_name: str) -> None:  # type: ignore[misc]
        # NOTE: Ray Serve awaits async constructors; the engine thread must start on the replica's event loop.
        from ray import serve

        from vlmserve.ray.stats_board import get_or_create_board

        # with --tensor-parallel-size N the replica is a TP group: rank 0 here, its workers started by this call
        self._adapter, self._release = load_for_serving(config)
        self._engine: AsyncEngine = build_engine(self._adapter, config)
        self._engine.start()
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._board = get_or_create_board(app_name)
        self._reporter = asyncio.create_task(self._report_forever())
        logger.info("replica %s ready (%s)", self._replica_id, self._adapter.family)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        # NOTE: when the ingress cancels this stream (its client went away), the cancellation ends this generator
        # and AsyncEngine.generate's cleanup aborts the sequences, as for a local client.
        async for delta in self._engine.generate(request):
            yield delta

    async def compile_structured(self, spec: StructuredOutputSpec) -> None:
        await self._engine.compile_structured(spec)

    def prompt_kit(self) -> PromptKit:
        return PromptKit.of(self._adapter, self._engine.max_model_len)

    def max_sequences(self) -> int:
        return self._engine.max_sequences

    def check_health(self) -> None:
        if self._engine.is_dead:
            raise RuntimeError("the engine loop died")

    def record_routing_stats(self) -> dict[str, Any]:
        stats = self._engine.stats()
        return {"num_running": stats.num_running, "num_waiting": stats.num_waiting}

    async def _report_forever(self) -> None:
        from vlmserve.ray.stats_board import REPORT_INTERVAL_S

        while True:
            with contextlib.suppress(Exception):  # a board being recreated must not stop the reports
                await self._board.report.remote(self._replica_id, self._engine.stats())
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def __del__(self) -> None:
        self._reporter.cancel()
        await self._engine.shutdown(5.0)
        self._release()  # stops tensor-parallel workers, if any
