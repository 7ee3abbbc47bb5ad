"""`vlmserve serve --tensor-parallel-size 2` on the CPU: a real server whose decoder runs on two processes answers
the official client like the unsharded shared server does (same greedy tokens, logprobs within float32 noise),
streams, and shuts down cleanly with its worker."""

from __future__ import annotations

import base64
from pathlib import Path

import openai
import pytest

from tests.conftest import ServerProcess, png_bytes
from tests.e2e.conftest import API_KEY, MODEL

IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes((200, 40, 90), (56, 56))).decode()
MESSAGES = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                         {"type": "text", "text": "What is in the picture?"}]}]


def _ask(client: openai.OpenAI) -> tuple[list[str], list[float]]:
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                              logprobs=True, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    return [t.token for t in content], [t.logprob for t in content]


def test_sharded_server_answers_like_the_unsharded_one(tiny_qwen2_vl: Path, client: openai.OpenAI,
                                                       start_server: type[ServerProcess]) -> None:
    sharded = start_server([str(tiny_qwen2_vl), "--served-model-name", MODEL, "--api-key", API_KEY,
                            "--tensor-parallel-size", "2", "--device", "cpu", "--num-kv-blocks", "128"])
    tp_client = openai.OpenAI(base_url=f"{sharded.base_url}/v1", api_key=API_KEY, max_retries=0)
    tokens, logprobs = _ask(client)
    tp_tokens, tp_logprobs = _ask(tp_client)
    assert tp_tokens == tokens
    assert tp_logprobs == pytest.approx(logprobs, abs=1e-4)
    stream = tp_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "".join(tokens)
    assert "tensor parallel: 2 ranks on cpu" in sharded.log()
    assert sharded.stop() == 0  # the worker took the stop and left; the server exits cleanly
