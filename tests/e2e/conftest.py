"""One tiny-Qwen2-VL server shared by the e2e modules (starting one costs seconds on a small CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import ImageHTTPServer, ServerProcess

API_KEY = "sk-test-key"
MODEL = "tiny-qwen"


@pytest.fixture(scope="session")
def server(tiny_qwen2_vl: Path, start_server: type[ServerProcess], image_server: ImageHTTPServer
           ) -> Iterator[ServerProcess]:
    yield start_server([str(tiny_qwen2_vl), "--served-model-name", MODEL, "tiny-alias", "--api-key", API_KEY,
                        "--allowed-media-hosts", "127.0.0.1", "--max-n", "4"])


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


DEMO_KEY = "sk-demo-key"


@pytest.fixture(scope="session")
def demo_server(start_server: type[ServerProcess]) -> Iterator[ServerProcess]:
    """The bundled demo model (it answers about pictures), behind a key, with a small response store."""
    yield start_server(["--api-key", DEMO_KEY, "--responses-store-max-entries", "64"])


@pytest.fixture(scope="session")
def demo_client(demo_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo_server.base_url}/v1", api_key=DEMO_KEY, max_retries=0)
