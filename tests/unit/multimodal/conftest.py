from __future__ import annotations

from collections.abc import Iterator

import pytest

from .canary import Canary


@pytest.fixture
def canary() -> Iterator[Canary]:
    """An HTTP server on 127.0.0.1 that counts hits (see canary.py for its routes)."""
    with Canary() as server:
        yield server


@pytest.fixture
def redirector() -> Iterator[Canary]:
    """A second server, used as the allowed host that redirects towards the canary."""
    with Canary() as server:
        yield server
