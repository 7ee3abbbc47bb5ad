"""Failure isolation (issue 11, class 3): a request that fails inside the engine on its own is that request's error,
never the engine's health. The crafted request of the issue (a trusted request template putting two images in one
placeholder run) fails every step it runs in; sent again and again it used to count as "three failed steps in a row"
and the server shut down."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, data_uri, png_bytes
from tests.e2e.hardening_support import (
    MODEL,
    assert_openai_error,
    assert_serves,
    hardened_server,
    post_chat,
)

# Both images inside one <|vision_start|> … <|vision_end|> run: the processor expands each pad into the image's
# tokens, the prompt renders, and the model's position computation fails inside the engine step.
ONE_RUN_FOR_TWO = ("<|im_start|>user\n<|vision_start|>{% for m in messages %}{% for c in m.content %}"
                   "{% if c.type == 'image' %}<|image_pad|>{% endif %}{% endfor %}{% endfor %}<|vision_end|>"
                   "{{ messages[-1].content[-1].text }}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def trusting(start_server: type[ServerProcess], tiny_qwen2_vl: Path,
             tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    return hardened_server(start_server, tiny_qwen2_vl, tmp_path_factory.mktemp("keys"))


def crafted(seed: int) -> dict[str, object]:
    images = [{"type": "image_url", "image_url": {"url": data_uri(png_bytes((seed, 40 + i, 90), (48 + 8 * i, 40)))}}
              for i in range(2)]
    return {"model": MODEL, "max_tokens": 2, "temperature": 0, "chat_template": ONE_RUN_FOR_TWO,
            "messages": [{"role": "user", "content": [*images, {"type": "text", "text": "what?"}]}]}


def test_a_request_that_always_fails_in_the_engine_never_kills_it(trusting: ServerProcess) -> None:
    for attempt in range(5):  # more than the three failed steps that used to count as a dead engine
        response = post_chat(trusting, crafted(attempt))
        error = assert_openai_error(response, 500, code="internal_error")
        assert error["type"] == "internal_server_error"
        assert httpx.get(f"{trusting.base_url}/health").status_code == 200, f"engine died after {attempt + 1}"
    assert trusting.process.poll() is None
    assert_serves(trusting)
