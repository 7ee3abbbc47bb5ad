"""Every family with a tiny checkpoint, served over HTTP and driven by the official openai client.

Each family: its checkpoint is built, loaded by the same code path as `vlmserve serve` (native ports included),
served by uvicorn on 127.0.0.1 in a background thread (one process for the whole matrix keeps this affordable),
and asked a streamed question about an image. Streamed text must equal the non-streamed answer (greedy), usage
must count the image tokens, and where the family takes several images per message, two images must cost more
prompt tokens than one.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from PIL import Image

from tests.conftest import free_port
from tests.fixtures.tiny.registry import FAMILIES
from vlmserve.config import Config, EngineConfig, ModelConfig, ServerConfig
from vlmserve.models.loader import load_model
from vlmserve.serve import build_service

pytestmark = [
    # transformers' processors call numpy on torch tensors (torch's __array__ predates numpy 2's keywords)
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`hidden_state` is deprecated:FutureWarning"),
]


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    is_multi_image: bool = True


def _native(module: str, function: str, multi: bool) -> Case:
    def build(out: Path) -> Path:
        import importlib

        return Path(getattr(importlib.import_module(f"tests.fixtures.tiny.{module}"), function)(out))

    return Case(module, build, multi)


def _cases() -> list[Any]:
    cases: list[Any] = []
    for family in FAMILIES.values():
        missing = family.missing()
        marks = [pytest.mark.skip(reason=missing)] if missing else []
        case = Case(family.name, lambda out, f=family: f.build(out), family.is_multi_image)
        cases.append(pytest.param(case, id=family.name, marks=marks))
    cases.append(pytest.param(_native("glm4v_9b", "build_glm4v_9b", multi=False), id="glm4v_9b(native)"))
    cases.append(pytest.param(_native("qwen_vl_chat", "build_qwen_vl_chat", multi=True), id="qwen_vl_chat(native)"))
    return cases


class InThreadServer:
    """`vlmserve serve`'s application and engine, on uvicorn in a background thread."""

    def __init__(self, path: Path) -> None:
        import uvicorn

        self.port = free_port()  # the app's Host allow-list (loopback names on this port) needs it first
        config = Config(model=ModelConfig(model=str(path), served_model_name=("m",)),
                        engine=EngineConfig(max_num_batched_tokens=256, num_kv_blocks=512),
                        server=ServerConfig(port=self.port))
        self.adapter = load_model(config.model)
        app, self.engine = build_service(self.adapter, config)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    async def _main(self) -> None:
        self.engine.start()
        try:
            await self.server.serve()
        finally:
            await self.engine.shutdown(0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Case, InThreadServer]]:
    case: Case = request.param
    server = InThreadServer(case.build(tmp_path / case.name))
    yield case, server
    server.stop()


def image_url(seed: int, size: tuple[int, int]) -> str:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text: str, *urls: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


#: families whose processor refuses a prompt without an image (answered 400, cleanly)
IMAGE_REQUIRED = frozenset({"paligemma", "got_ocr2"})


@pytest.mark.parametrize("served", _cases(), indirect=True)
def test_family_served_end_to_end(served: tuple[Case, InThreadServer]) -> None:
    case, server = served
    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0) as client:
        check_family(client, case)


def check_family(client: openai.OpenAI, case: Case) -> None:
    first = image_url(1, (64, 48))
    messages = [user("What is in this picture?", first)]
    options: dict[str, Any] = {"model": "m", "temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(messages=messages, **options)
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **options))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6
    if case.name in IMAGE_REQUIRED:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(messages=[user("What is in this picture?")], **options)
        assert refused.value.body["param"] == "messages"  # type: ignore[index]
    else:
        text_only = client.chat.completions.create(messages=[user("What is in this picture?")], **options)
        assert whole.usage.prompt_tokens > text_only.usage.prompt_tokens  # image tokens are counted
    if case.is_multi_image:
        two = client.chat.completions.create(messages=[user("Compare.", first, image_url(2, (48, 64)))],
                                             **options)
        one = client.chat.completions.create(messages=[user("Compare.", first)], **options)
        assert two.usage.prompt_tokens > one.usage.prompt_tokens
        assert two.choices[0].finish_reason == "length"
