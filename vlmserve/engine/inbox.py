"""New requests and aborts handed to an engine core from other threads; the core drains them on its thread."""

from __future__ import annotations

import threading
import time

from vlmserve.types import GenerationRequest


class Inbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[GenerationRequest] = []
        self._aborts: list[str] = []

    def add(self, request: GenerationRequest) -> None:
        # NOTE: the engine's queue starts here (the request object is the core's own: the client made it per
        # sequence); queue time is measured from this stamp to the sequence's first schedule
        request.arrival_time = time.monotonic()
        with self._lock:
            self._requests.append(request)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)

    def is_empty(self) -> bool:
        with self._lock:
            return not (self._requests or self._aborts)

    def take(self) -> tuple[list[GenerationRequest], list[str]]:
        """Everything received since the last call, in arrival order."""
        with self._lock:
            requests, self._requests = self._requests, []
            aborts, self._aborts = self._aborts, []
        return requests, aborts
