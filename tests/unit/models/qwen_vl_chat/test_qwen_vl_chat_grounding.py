"""Qwen-VL-Chat's grounding answers reach clients as the original code returns them: tags kept, stripped.

The answer is scripted at the engine core (a random model does not ground anything); the tokenizer, the text
policy, the detokenizer, the AsyncEngine and the HTTP API on top of it are the product's.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.scripted_core import ScriptedCore
from vlmserve.config import Config, MediaConfig
from vlmserve.engine.client import AsyncEngine
from vlmserve.engine.text_policy import TextPolicy
from vlmserve.models.qwen_vl_chat.adapter import QwenVLChatAdapter
from vlmserve.models.qwen_vl_chat.processor import QwenVLChatProcessor

ANSWER = "<ref>the cat</ref><box>(517,508),(589,611)</box>"


@pytest.fixture(scope="module")
def processor(qwen_vl_chat_dir: Path) -> QwenVLChatProcessor:
    return QwenVLChatProcessor.from_pretrained(qwen_vl_chat_dir)


def run_chat(processor: QwenVLChatProcessor, answer_ids: list[int], **fields: Any) -> tuple[Any, str, Any]:
    """(non-streamed JSON, streamed content joined, /v1/models JSON) from an in-process server."""
    from vlmserve.api.app import build_app
    from vlmserve.multimodal.loader import MediaLoader
    from vlmserve.multimodal.prompt import PromptRenderer

    tokenizer = processor.tokenizer
    policy = TextPolicy.from_tokenizer(tokenizer, strip_whitespace=QwenVLChatAdapter.strip_answer_whitespace)
    engine = AsyncEngine(ScriptedCore(answer_ids), tokenizer, max_model_len=2048, max_sequences=8,
                         text_policy=policy)
    renderer = PromptRenderer(processor, image_token_id=None, max_model_len=2048)
    body = {"model": "tiny", "max_tokens": 64, "messages": [{"role": "user", "content": "where is the cat?"}],
            **fields}

    async def scenario() -> tuple[Any, str, Any]:
        media = MediaLoader(MediaConfig())
        app = build_app(engine, renderer, media, Config(), ("tiny",), grounding_format="qwen-vl")
        engine.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as client:
                whole = (await client.post("/v1/chat/completions", json=body)).json()
                streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
                models = (await client.get("/v1/models")).json()
        finally:
            await engine.shutdown(1)
            await media.aclose()
        chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        return whole, text, models

    return asyncio.run(scenario())


def test_tags_come_back_streamed_and_not_with_whitespace_trimmed_and_control_tokens_gone(
        processor: QwenVLChatProcessor) -> None:
    tokenizer = processor.tokenizer
    ids = tokenizer.encode("\n " + ANSWER + " \n", add_special_tokens=False)
    ids.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert len(ids) > 8  # streamed token by token
    whole, streamed, models = run_chat(processor, ids)
    assert whole["choices"][0]["message"]["content"] == ANSWER
    assert streamed == ANSWER
    assert models["data"][0]["grounding_format"] == "qwen-vl"


def test_skip_special_tokens_true_gives_the_old_bare_coordinates(processor: QwenVLChatProcessor) -> None:
    ids = processor.tokenizer.encode(ANSWER, add_special_tokens=False)
    whole, streamed, _ = run_chat(processor, ids, skip_special_tokens=True)
    assert whole["choices"][0]["message"]["content"] == streamed == "the cat(517,508),(589,611)"
