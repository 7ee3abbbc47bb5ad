"""Issue 19 item 5 inside both cores: stop strings end a sequence in the core, min_tokens holds stop_token_ids
back, logprobs stay raw under bias and penalties, and both engines finish a sequence for the same reasons."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.integration.engine.conftest import Loaded, engine_config, prompts_with_images, request
from vlmserve.config import EngineConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.generate_core import GenerateEngineCore
from vlmserve.engine.protocol import CoreOutput
from vlmserve.types import FinishReason, GenerationRequest


def run(core: object, req: GenerationRequest) -> list[CoreOutput]:
    """Every output of one request, stepping the core directly (no client, so no client-side abort)."""
    outputs: list[CoreOutput] = []
    core.add_request(req)  # type: ignore[attr-defined]
    steps = 0
    while core.has_work():  # type: ignore[attr-defined]
        core.step(outputs.extend)  # type: ignore[attr-defined]
        steps += 1
        assert steps < 500
    return outputs


def make_core(kind: str, family: Loaded) -> object:
    if kind == "paged":
        return PagedEngineCore(family.adapter, engine_config())
    return GenerateEngineCore(family.fresh_adapter(), EngineConfig())


def tokens_of(outputs: list[CoreOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


@pytest.mark.parametrize("kind", ["paged", "generate"])
def test_a_stop_string_ends_the_sequence_in_the_core(kind: str, loaded: Callable[[str], Loaded]) -> None:
    family = loaded("qwen2_vl")
    prompt = prompts_with_images(family.renderer, 1)[0]
    core = make_core(kind, family)
    free = tokens_of(run(core, request("free", prompt, max_tokens=12)))
    tokenizer = family.adapter.tokenizer
    # the first k whose text adds a stop string not already complete in the text before it
    for k in range(2, 11):
        before = tokenizer.decode(free[:k], skip_special_tokens=True)
        text = tokenizer.decode(free[:k + 1], skip_special_tokens=True)
        stop = text[-3:]
        if len(text) > len(before) and stop.strip() and stop not in before:
            break
    else:
        pytest.skip("the tiny model's first tokens make no usable stop string")
    outputs = run(core, request("stopped", prompt, max_tokens=40, stop=(stop,)))
    assert tokens_of(outputs) == free[:k + 1]  # stopped at the token completing the stop string, not at 40
    assert outputs[-1].finish_reason is FinishReason.STOP


@pytest.mark.parametrize("kind", ["paged", "generate"])
def test_min_tokens_holds_back_stop_token_ids(kind: str, loaded: Callable[[str], Loaded]) -> None:
    family = loaded("qwen2_vl")
    prompt = prompts_with_images(family.renderer, 1)[0]
    core = make_core(kind, family)
    first = tokens_of(run(core, request("free", prompt, max_tokens=1)))[0]
    ended = run(core, request("ends", prompt, max_tokens=10, stop_token_ids=(first,)))
    assert tokens_of(ended) == [first] and ended[-1].finish_reason is FinishReason.STOP
    held = run(core, request("held", prompt, max_tokens=10, stop_token_ids=(first,), min_tokens=3))
    assert tokens_of(held)[0] != first and len(tokens_of(held)) >= 3


def test_logprobs_are_raw_under_bias_and_penalties(loaded: Callable[[str], Loaded]) -> None:
    family = loaded("qwen2_vl")
    prompt = prompts_with_images(family.renderer, 1)[0]
    inputs = family.reference.collate([prompt])
    with torch.inference_mode():
        raw = family.reference.model(**inputs).logits[0, -1].float().log_softmax(-1)
    forced = int(raw.argsort()[len(raw) // 2])  # an unlikely token, made certain by the bias
    core = PagedEngineCore(family.adapter, engine_config())
    outputs = run(core, request("lp", prompt, max_tokens=1, logprobs=True, top_logprobs=2, temperature=0.7,
                                logit_bias={forced: 100.0}, presence_penalty=1.5, repetition_penalty=1.3))
    (position,) = outputs[0].new_logprobs or []
    assert position is not None and position.chosen.token_id == forced
    assert abs(position.chosen.logprob - float(raw[forced])) < 1e-4  # the model's, not the biased one (~0)
    assert [t.token_id for t in position.top] == raw.topk(2).indices.tolist()
