"""A small Ray actor where every engine replica posts its counters, so the ingress can see all of them.

A deployment handle reaches one replica per call, so the ingress cannot ask each replica itself; instead each
replica reports its `EngineStats` every `REPORT_INTERVAL_S`, and entries older than `STALE_AFTER_S` (a replica that
died or was removed) drop out.
"""

from __future__ import annotations

import time
from typing import Any

from vlmserve.types import EngineStats

REPORT_INTERVAL_S = 0.5
STALE_AFTER_S = 5.0


class StatsBoard:
    """Latest `EngineStats` per replica id (used as a Ray actor; plain class for tests)."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, EngineStats]] = {}

    def report(self, replica_id: str, stats: EngineStats) -> None:
        self._latest[replica_id] = (time.monotonic(), stats)

    def snapshot(self) -> dict[str, EngineStats]:
        now = time.monotonic()
        self._latest = {key: value for key, value in self._latest.items() if now - value[0] <= STALE_AFTER_S}
        return {key: stats for key, (_, stats) in self._latest.items()}


def board_name(app_name: str) -> str:
    return f"vlmserve-stats-{app_name}"


def get_or_create_board(app_name: str) -> Any:
    """The application's board actor (created by whichever replica or ingress asks first)."""
    import ray

    actor = ray.remote(num_cpus=0)(StatsBoard)
    # NOTE: detached, so the board outlives the replica that happened to create it; the application's deletion
    # (vlmserve.ray.app.shutdown) kills it.
    return actor.options(name=board_name(app_name), namespace="vlmserve", get_if_exists=True,
                         lifetime="detached").remote()
