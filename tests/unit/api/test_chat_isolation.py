"""ChatService (issue 11, class 5): the prefix cache is salted with the API key's id when keys are configured (and
the flag is on), the client id reaches the engine for fair scheduling, and cached_tokens reporting can be off."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.unit.api.test_admission import StubEngine
from vlmserve.api import schemas
from vlmserve.api.serving_chat import ChatService
from vlmserve.config import MediaConfig, ServerConfig
from vlmserve.models.hf_processor import load_processor
from vlmserve.multimodal.loader import MediaLoader
from vlmserve.multimodal.prompt import PromptRenderer


@pytest.fixture(scope="module")
def renderer(tiny_qwen2_vl: Path) -> PromptRenderer:
    processor = load_processor(tiny_qwen2_vl)
    return PromptRenderer(processor, image_token_id=processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                          max_model_len=4096)


def prepare(renderer: PromptRenderer, config: ServerConfig, key_id: str | None) -> tuple[ChatService, object]:
    async def run() -> tuple[ChatService, object]:
        media = MediaLoader(MediaConfig())
        service = ChatService(StubEngine(), renderer, media, served_model_names=("m",),  # type: ignore[arg-type]
                              server_config=config)
        request = schemas.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
        generation, _ = await service.prepare(request, client_id="client-1", api_key_id=key_id)
        await media.aclose()
        return service, generation

    return asyncio.run(run())


def test_keys_salt_the_cache_and_name_the_client(renderer: PromptRenderer) -> None:
    _, generation = prepare(renderer, ServerConfig(api_key=("a", "b")), "key-1")
    assert generation.cache_salt == "key-1" and generation.client_id == "client-1"  # type: ignore[attr-defined]


@pytest.mark.parametrize("config", [ServerConfig(), ServerConfig(api_key=("a",), enable_cache_salt=False)])
def test_no_salt_without_keys_or_with_the_flag_off(renderer: PromptRenderer, config: ServerConfig) -> None:
    _, generation = prepare(renderer, config, "key-1")
    assert generation.cache_salt is None  # type: ignore[attr-defined]


def test_cached_tokens_reporting_can_be_turned_off(renderer: PromptRenderer) -> None:
    service, _ = prepare(renderer, ServerConfig(report_cached_tokens=False), None)
    assert service.reported_cached_tokens(48) == 0
    service, _ = prepare(renderer, ServerConfig(), None)
    assert service.reported_cached_tokens(48) == 48
