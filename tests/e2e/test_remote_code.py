"""Checkpoints shipping their own code: refused without --trust-remote-code, served by the generate engine with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.conftest import REPO, ServerProcess, data_uri, png_bytes
from tests.fixtures.tiny.remote_code import build_remote_code_vlm


@pytest.fixture(scope="module")
def remote_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_remote_code_vlm(tmp_path_factory.mktemp("remote") / "tiny-remote")


def test_remote_code_is_refused_without_the_flag(remote_checkpoint: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "vlmserve", "serve", str(remote_checkpoint), "--port", "0"],
                          capture_output=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    log = done.stderr.decode()
    assert "--trust-remote-code" in log and "Traceback" not in log


def test_remote_code_is_served_by_the_generate_engine(remote_checkpoint: Path,
                                                      start_server: type[ServerProcess]) -> None:
    server = start_server([str(remote_checkpoint), "--trust-remote-code", "--served-model-name", "remote"])
    log = server.log()
    assert "will run with this server's permissions" in log  # the trust decision is spelled out
    assert "engine: generate fallback" in log and "code shipped in its repository" in log
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as client:
        chunks = list(client.chat.completions.create(
            model="remote", max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri(png_bytes((9, 99, 199)))}},
                {"type": "text", "text": "What is this?"}]}]))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
