"""`vlmserve chat` against a running server: streamed answers equal the API's, images from files and stdin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai

from tests.conftest import REPO, ServerProcess, data_uri, png_bytes
from tests.e2e.conftest import API_KEY, MODEL


def chat_cli(server: ServerProcess, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "vlmserve", "chat", "--url", server.base_url, "--api-key", API_KEY,
                           "--max-tokens", "6", *args], input=stdin, capture_output=True, cwd=REPO, timeout=120)


def api_answer(client: openai.OpenAI, url: str, question: str) -> str:
    response = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=6, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}])
    return response.choices[0].message.content or ""


def test_chat_streams_the_same_answer_as_the_api(server: ServerProcess, client: openai.OpenAI,
                                                 tmp_path: Path) -> None:
    image = tmp_path / "green.png"
    image.write_bytes(png_bytes((0, 200, 0)))
    done = chat_cli(server, "--image", str(image), "What colour is this?")
    assert done.returncode == 0, done.stderr
    expected = api_answer(client, data_uri(image.read_bytes()), "What colour is this?")
    assert done.stdout.decode().rstrip("\n") == expected


def test_chat_reads_the_image_from_stdin(server: ServerProcess, client: openai.OpenAI) -> None:
    picture = png_bytes((200, 0, 200))
    done = chat_cli(server, "--image", "-", "Describe it.", stdin=picture)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().rstrip("\n") == api_answer(client, data_uri(picture), "Describe it.")


def test_chat_interactive_keeps_the_conversation(server: ServerProcess) -> None:
    done = chat_cli(server, "--interactive", stdin=b"Hello there\nAnd again\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().count("> ") == 3  # two turns answered, then the prompt that met end of input


def test_chat_reports_server_errors_cleanly(server: ServerProcess) -> None:
    done = subprocess.run([sys.executable, "-m", "vlmserve", "chat", "--url", server.base_url, "--api-key", "wrong",
                           "Hi"], capture_output=True, cwd=REPO, timeout=60)
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr and b"401" in done.stderr
    assert b"missing or wrong API key" in done.stderr  # the server's message, not httpx's
