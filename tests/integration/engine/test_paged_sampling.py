"""Sampling, logprobs and aborts inside the paged engine (tiny Qwen2-VL)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tests.integration.engine.conftest import Loaded, engine_config, prompts_with_images, request, run_core
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.protocol import CoreOutput


def test_seeded_sampling_is_independent_of_the_batch(loaded: Callable[[str], Loaded]) -> None:
    family = loaded("qwen2_vl")
    prompts = prompts_with_images(family.renderer, 6)
    seeded = request("seeded", prompts[0], temperature=1.0, top_p=0.9, seed=1234, max_tokens=10)
    alone = run_core(PagedEngineCore(family.adapter, engine_config()), [seeded])["seeded"]
    others = [request(f"o{i}", p, temperature=1.3, seed=None if i % 2 else i, max_tokens=4 + i)
              for i, p in enumerate(prompts[1:])]
    crowded = run_core(PagedEngineCore(family.adapter, engine_config(max_num_batched_tokens=40)),
                       [*others[:2], seeded, *others[2:]])["seeded"]
    assert crowded == alone
    other_seed = request("other", prompts[0], temperature=1.0, top_p=0.9, seed=99, max_tokens=10)
    assert run_core(PagedEngineCore(family.adapter, engine_config()), [other_seed])["other"] != alone


def test_logprobs_are_the_models_raw_distribution(loaded: Callable[[str], Loaded]) -> None:
    family = loaded("qwen2_vl")
    prompt = prompts_with_images(family.renderer, 1)[0]
    core = PagedEngineCore(family.adapter, engine_config())
    outputs: list[CoreOutput] = []
    core.add_request(request("lp", prompt, max_tokens=1, logprobs=True, top_logprobs=3))
    while core.has_work():
        core.step(outputs.extend)
    (position,) = outputs[0].new_logprobs or []
    assert position is not None
    inputs = family.reference.collate([prompt])
    with torch.inference_mode():
        logits = family.reference.model(**inputs).logits[0, -1].float()
    expected = logits.log_softmax(-1)
    assert position.chosen.token_id == int(expected.argmax())
    assert abs(position.chosen.logprob - float(expected.max())) < 1e-4
    assert [t.token_id for t in position.top] == expected.topk(3).indices.tolist()


def test_abort_frees_blocks_within_one_step(loaded: Callable[[str], Loaded]) -> None:
    family = loaded("qwen2_vl")
    prompts = prompts_with_images(family.renderer, 3)
    core = PagedEngineCore(family.adapter, engine_config(enable_prefix_caching=False))
    for i, prompt in enumerate(prompts):
        core.add_request(request(f"a{i}", prompt, max_tokens=200))
    outputs: list[CoreOutput] = []
    for _ in range(4):
        core.step(outputs.extend)
    victim = core._sequences["a1"]
    held = len(victim.block_ids)
    free_before = core.stats().num_kv_blocks_free
    assert held > 0 and core.stats().num_running == 3
    core.abort_request("a1")
    core.step(outputs.extend)
    stats = core.stats()
    assert stats.num_running == 2 and stats.num_aborted == 1
    # one step later the victim's blocks are back, minus at most one new block each survivor may have taken
    assert stats.num_kv_blocks_free >= free_before + held - 2
    assert not any(o.request_id == "a1" for o in outputs[-2:])
