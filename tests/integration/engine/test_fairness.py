"""Fair slots between clients (issue 11, class 9): one client's long streams holding every running slot give one
up when another client waits, and the queue is served round-robin by client instead of first-come first-served."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.integration.engine.conftest import engine_config, request, user_turn
from vlmserve.config import ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.protocol import CoreOutput
from vlmserve.models.base import ModelAdapter
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import GenerationRequest, PreparedPrompt


@pytest.fixture(scope="module")
def adapter(tiny_qwen2_vl: Path) -> ModelAdapter:
    return load_model(ModelConfig(model=str(tiny_qwen2_vl)))


@pytest.fixture(scope="module")
def prompt(adapter: ModelAdapter) -> PreparedPrompt:
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len)
    return renderer.render([user_turn("Tell me a story.")])


def of(client: str, request_id: str, prompt: PreparedPrompt, max_tokens: int) -> GenerationRequest:
    generation = request(request_id, prompt, max_tokens=max_tokens, ignore_eos=True)
    return dataclasses.replace(generation, client_id=client)


def running_clients(core: PagedEngineCore) -> list[str | None]:
    return sorted(s.request.client_id or "" for s in core.scheduler.running)


def test_a_waiting_client_gets_a_slot_from_the_client_holding_them_all(adapter: ModelAdapter,
                                                                      prompt: PreparedPrompt) -> None:
    core = PagedEngineCore(adapter, engine_config(max_num_seqs=4))
    finished: dict[str, int] = {}

    def emit(outputs: list[CoreOutput]) -> None:
        for output in outputs:
            if output.finish_reason is not None:
                finished[output.request_id] = len(finished)

    for i in range(6):  # the hog: more long streams than there are slots
        core.add_request(of("hog", f"hog-{i}", prompt, max_tokens=400))
    for _ in range(3):
        core.step(emit)
    assert running_clients(core) == ["hog"] * 4
    core.add_request(of("polite", "polite-0", prompt, max_tokens=4))
    core.add_request(of("polite", "polite-1", prompt, max_tokens=4))
    for _ in range(4):
        core.step(emit)
    assert running_clients(core).count("polite") >= 1  # admitted although the hog's queue came first
    for _ in range(40):
        core.step(emit)
    assert {"polite-0", "polite-1"} <= set(finished)  # served long before any hog stream could end
    assert not any(key.startswith("hog") for key in finished)
    assert core.scheduler.num_preemptions >= 1
