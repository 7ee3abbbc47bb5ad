"""Both engine cores put each sequence's queue time and vision-tower time on its first output (what /metrics
observes as `vllm:request_queue_time_seconds` and `vlmserve:vision_encoder_seconds`), exactly once."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.integration.engine.conftest import Loaded, image, prompts_with_images, request, user_turn
from vlmserve.config import EngineConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.generate_core import GenerateEngineCore
from vlmserve.engine.protocol import CoreOutput
from vlmserve.types import RequestTimings

CORES = {
    "paged": lambda family: PagedEngineCore(family.adapter, EngineConfig(max_num_seqs=1, num_kv_blocks=64)),
    # a fresh copy: a paged core that ran on the shared adapter leaves its attention switched to paged
    "generate": lambda family: GenerateEngineCore(family.fresh_adapter(), EngineConfig(max_generate_batch=1)),
}


@pytest.mark.parametrize("kind", sorted(CORES))
def test_a_request_held_behind_another_has_queue_time_and_its_images_are_timed(
        loaded: Callable[[str], Loaded], kind: str) -> None:
    family = loaded("qwen2_vl")
    core = CORES[kind](family)
    two_images = family.renderer.render([user_turn("Compare them.", image(7), image(8))])
    first, second = prompts_with_images(family.renderer, 1)[0], two_images
    timings: dict[str, list[RequestTimings]] = {"first": [], "second": []}
    first_done_at: list[float] = []

    def emit(outputs: list[CoreOutput]) -> None:
        for output in outputs:
            assert output.error is None, output.error
            if output.timings is not None:
                timings[output.request_id].append(output.timings)
            if output.request_id == "first" and output.finish_reason is not None:
                first_done_at.append(time.monotonic())

    core.add_request(request("first", first, max_tokens=6))
    core.add_request(request("second", second, max_tokens=3))
    added_at = time.monotonic()
    while core.has_work():
        core.step(emit)
    assert [len(t) for t in timings.values()] == [1, 1]  # once per sequence, however many tokens it had
    (one,), (two,) = timings["first"], timings["second"]
    # one sequence at a time: the second was first scheduled after the first had finished
    assert two.queue_time_s >= first_done_at[0] - added_at > 0
    assert 0 <= one.queue_time_s < two.queue_time_s
    assert (one.num_images_encoded, two.num_images_encoded) == (1, 2)
    assert one.vision_encoder_s > 0 and two.vision_encoder_s > 0


def test_images_already_cached_are_not_encoded_again(loaded: Callable[[str], Loaded]) -> None:
    family = loaded("qwen2_vl")
    core = CORES["paged"](family)
    prompt = prompts_with_images(family.renderer, 1)[0]
    got: list[RequestTimings] = []

    def emit(outputs: list[CoreOutput]) -> None:
        got.extend(o.timings for o in outputs if o.timings is not None)

    for request_id in ("cold", "warm"):
        core.add_request(request(request_id, prompt, max_tokens=2))
        while core.has_work():
            core.step(emit)
    assert [(t.num_images_encoded, t.vision_encoder_s > 0) for t in got] == [(1, True), (0, False)]
