"""The generate fallback engine: batched `generate` equals each request alone; aborts stop rows mid-batch."""

from __future__ import annotations

from collections.abc import Callable

from tests.integration.engine.conftest import Loaded, generate_alone, prompts_with_images, request, run_core
from vlmserve.config import EngineConfig
from vlmserve.engine.generate_core import GenerateEngineCore
from vlmserve.engine.protocol import CoreOutput
from vlmserve.types import FinishReason


def test_batched_generate_equals_each_alone(loaded: Callable[[str], Loaded]) -> None:
    family = loaded("llava")
    prompts = prompts_with_images(family.renderer, 5)
    core = GenerateEngineCore(family.generate_adapter, EngineConfig(max_generate_batch=4))
    got = run_core(core, [request(f"g{i}", p, max_tokens=4 + i) for i, p in enumerate(prompts)])
    assert [got[f"g{i}"] for i in range(5)] == [generate_alone(family.reference, p, 4 + i)
                                                for i, p in enumerate(prompts)]
    assert core.stats().num_finished == 5


def test_abort_stops_a_row_while_its_batch_runs(loaded: Callable[[str], Loaded]) -> None:
    family = loaded("qwen2_vl")
    prompts = prompts_with_images(family.renderer, 2)
    core = GenerateEngineCore(family.generate_adapter, EngineConfig())
    outputs: list[CoreOutput] = []

    def emit(batch: list[CoreOutput]) -> None:
        outputs.extend(batch)
        if sum(o.request_id == "victim" for o in outputs) == 3:
            core.abort_request("victim")  # as the client thread would, while generate is running

    core.add_request(request("victim", prompts[0], max_tokens=40))
    core.add_request(request("keeper", prompts[1], max_tokens=12))
    while core.has_work():
        core.step(emit)
    victim = [o for o in outputs if o.request_id == "victim"]
    keeper = [o for o in outputs if o.request_id == "keeper"]
    assert len(victim) <= 4 and victim[-1].finish_reason is None  # stopped within one token, never finished
    assert len(keeper) == 12 and keeper[-1].finish_reason is FinishReason.LENGTH
    assert core.stats().num_aborted == 1


def test_seeded_sampling_matches_between_batches(loaded: Callable[[str], Loaded]) -> None:
    family = loaded("qwen2_vl")
    prompts = prompts_with_images(family.renderer, 3)
    seeded = request("s", prompts[0], temperature=1.0, seed=77, max_tokens=8)
    alone = run_core(GenerateEngineCore(family.generate_adapter, EngineConfig()), [seeded])["s"]
    crowd = [request(f"o{i}", p, temperature=0.8, max_tokens=8) for i, p in enumerate(prompts[1:])]
    together = run_core(GenerateEngineCore(family.generate_adapter, EngineConfig()), [crowd[0], seeded, crowd[1]])["s"]
    assert together == alone
