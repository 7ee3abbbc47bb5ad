"""Faults in the generate engine (issue 14, item 6): a request whose inputs make the batched `generate` call raise
fails alone; its batch-mates are retried one at a time and finish as if nothing happened, without a token sent
twice. The faults are injected by patching the adapter or the model from the test; production code has no hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.integration.engine.conftest import Loaded, prompts_with_images, request, run_core
from vlmserve.config import EngineConfig
from vlmserve.engine.generate_core import GenerateEngineCore
from vlmserve.engine.protocol import CoreOutput
from vlmserve.types import FinishReason, GenerationRequest

MAX_TOKENS = 6


def drive(core: GenerateEngineCore, requests: list[GenerationRequest]) -> dict[str, tuple[list[int], CoreOutput]]:
    """Step until idle; each request's streamed tokens and its final output (finish_reason, error)."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    final: dict[str, CoreOutput] = {}

    def emit(outputs: list[CoreOutput]) -> None:
        for output in outputs:
            assert output.request_id not in final, "output after the request finished"
            tokens[output.request_id].extend(output.new_token_ids)
            if output.finish_reason is not None:
                final[output.request_id] = output

    for r in requests:
        core.add_request(r)
    while core.has_work():
        core.step(emit)
    assert set(final) == set(tokens), "a request never finished"
    return {request_id: (tokens[request_id], final[request_id]) for request_id in tokens}


def test_a_request_that_breaks_the_batch_fails_alone(loaded: Callable[[str], Loaded],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    family = loaded("qwen2_vl")
    prompts = prompts_with_images(family.renderer, 3)
    core = GenerateEngineCore(family.generate_adapter, EngineConfig(max_generate_batch=4))
    requests = [request("before", prompts[0], max_tokens=MAX_TOKENS),
                request("culprit", prompts[1], max_tokens=MAX_TOKENS),
                request("after", prompts[2], max_tokens=MAX_TOKENS)]
    reference = {r.request_id: run_core(core, [r])[r.request_id] for r in requests if r.request_id != "culprit"}
    original = family.generate_adapter.collate
    batch_sizes: list[int] = []

    def collate(batch: list[Any]) -> dict[str, torch.Tensor]:
        batch_sizes.append(len(batch))
        if any(prompt is prompts[1] for prompt in batch):
            raise ValueError("injected: image features and image tokens do not match")
        return original(batch)

    monkeypatch.setattr(family.generate_adapter, "collate", collate)
    results = drive(core, requests)
    assert batch_sizes == [3, 1, 1, 1]  # the batch failed, then each request ran alone
    culprit_tokens, culprit = results["culprit"]
    assert culprit.finish_reason is FinishReason.ERROR and culprit.error == "ValueError" and not culprit_tokens
    for request_id, expected in reference.items():
        tokens, final = results[request_id]
        assert final.finish_reason is FinishReason.LENGTH and final.error is None
        assert tokens == expected
    assert core.stats().num_running == core.stats().num_waiting == 0


@pytest.mark.parametrize("exc", [RuntimeError("injected decode failure"),
                                 torch.OutOfMemoryError("injected: out of memory")], ids=["runtime", "oom"])
def test_a_batch_failing_mid_decode_is_replayed_without_sending_a_token_twice(
        loaded: Callable[[str], Loaded], monkeypatch: pytest.MonkeyPatch, exc: RuntimeError) -> None:
    """The batch dies after every row streamed tokens: each row re-runs alone with its streamed tokens forced,
    then continues. Greedy and seeded rows end exactly as they would have alone (the seeded generator continues
    where it was, it is not restarted)."""
    family = loaded("qwen2_vl")
    prompts = prompts_with_images(family.renderer, 2)
    core = GenerateEngineCore(family.generate_adapter, EngineConfig(max_generate_batch=4))
    requests = [request("greedy", prompts[0], max_tokens=MAX_TOKENS),
                request("seeded", prompts[1], max_tokens=MAX_TOKENS, temperature=1.0, seed=7)]
    reference = {r.request_id: run_core(core, [r])[r.request_id] for r in requests}
    model = family.generate_adapter.model
    original = model.forward
    calls: list[int] = []

    @functools.wraps(original)  # generate checks its keyword arguments against forward's signature
    def forward(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls))
        batch = kwargs["input_ids"].shape[0] if kwargs.get("input_ids") is not None else 1
        if batch > 1 and len(calls) == 4:  # prefill and two decode steps went through: 3 tokens streamed
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    results = drive(core, requests)
    assert len(calls) > 4  # the fault fired and the rows ran again
    for request_id, expected in reference.items():
        tokens, final = results[request_id]
        assert final.finish_reason is FinishReason.LENGTH and final.error is None
        assert tokens == expected


def test_a_single_failing_request_is_not_retried(loaded: Callable[[str], Loaded],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    family = loaded("qwen2_vl")
    prompt = prompts_with_images(family.renderer, 1)[0]
    core = GenerateEngineCore(family.generate_adapter, EngineConfig())
    calls: list[int] = []

    def collate(batch: list[Any]) -> dict[str, torch.Tensor]:
        calls.append(len(batch))
        raise IndexError("injected")

    monkeypatch.setattr(family.generate_adapter, "collate", collate)
    tokens, final = drive(core, [request("only", prompt, max_tokens=MAX_TOKENS)])["only"]
    assert calls == [1] and not tokens
    assert final.finish_reason is FinishReason.ERROR and final.error == "IndexError"
