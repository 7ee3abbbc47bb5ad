"""The prefix cache's guarantees, seen through the paged engine on tiny Qwen2-VL: what is shared is exactly what
may be, never before its KV is written, never across salts or after a failed step; siblings share by refcount."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.integration.engine.conftest import Loaded, engine_config, generate_alone, image, request, user_turn
from tests.integration.engine.test_paged_engine import EagerDecodeGraphs
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.protocol import CoreOutput
from vlmserve.types import FinishReason, GenerationRequest, PreparedPrompt

BLOCK = 8


@dataclasses.dataclass
class Result:
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    num_cached_tokens: int = 0
    finish_reason: FinishReason | None = None


class Recorder:
    """An `emit` that keeps every request's tokens, chosen-token logprobs and final state."""

    def __init__(self) -> None:
        self.results: dict[str, Result] = {}

    def __call__(self, outputs: list[CoreOutput]) -> None:
        for output in outputs:
            result = self.results.setdefault(output.request_id, Result())
            result.tokens += output.new_token_ids
            result.logprobs += [p.chosen.logprob for p in output.new_logprobs or [] if p is not None]
            result.num_cached_tokens = output.num_cached_tokens
            result.finish_reason = output.finish_reason or result.finish_reason


def run(core: PagedEngineCore, requests: list[GenerationRequest], recorder: Recorder | None = None) -> Recorder:
    recorder = recorder or Recorder()
    for r in requests:
        core.add_request(r)
    for _ in range(1000):
        if not core.has_work():
            break
        core.step(recorder)
    assert not core.has_work()
    return recorder


def traced(request_id: str, prompt: PreparedPrompt, **sampling: Any) -> GenerationRequest:
    return request(request_id, prompt, logprobs=True, **sampling)


def alone_without_cache(family: Loaded, prompt: PreparedPrompt, max_tokens: int = 8) -> Result:
    core = PagedEngineCore(family.adapter, engine_config(block_size=BLOCK, enable_prefix_caching=False))
    return run(core, [traced("ref", prompt, max_tokens=max_tokens)]).results["ref"]


def assert_same_output(got: Result, want: Result) -> None:
    assert got.tokens == want.tokens
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def family(loaded: Callable[[str], Loaded]) -> Loaded:
    shared = loaded("qwen2_vl")
    # A paged core takes over its adapter's attention: an adapter of our own leaves the shared one as it was.
    return dataclasses.replace(shared, adapter=shared.fresh_adapter())


def assert_all_blocks_free(core: PagedEngineCore) -> None:
    stats = core.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total and stats.num_running == stats.num_waiting == 0


def test_two_images_differing_in_the_second_share_exactly_the_blocks_before_it(family: Loaded) -> None:
    text = "Compare these two pictures, please."
    first, second = (family.renderer.render([user_turn(text, image(1, (70, 70)), image(n, (70, 70)))])
                     for n in (2, 3))
    assert first.token_ids == second.token_ids and first.image_hashes[1] != second.image_hashes[1]
    second_image = second.image_spans[1].start
    assert second_image % BLOCK and second.image_spans[0].start < second_image // BLOCK * BLOCK  # shared: image 1
    core = PagedEngineCore(family.adapter, engine_config(block_size=BLOCK))
    run(core, [traced("first", first)])
    got = run(core, [traced("second", second)]).results["second"]
    # The block holding the second image (and every later one) is recomputed; the ones before it, which hold
    # the first image too, are shared.
    assert got.num_cached_tokens == second_image // BLOCK * BLOCK
    assert_same_output(got, alone_without_cache(family, second))
    again = run(core, [traced("again", first)]).results["again"]
    assert again.num_cached_tokens == (first.num_tokens - 1) // BLOCK * BLOCK


def test_a_failed_step_leaves_nothing_in_the_prefix_cache(family: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step fails in the last layer: the first layer had written its KV, the last had not."""
    prompt = family.renderer.render([user_turn("What shape is this?", image(4, (70, 70)))])
    reference = alone_without_cache(family, prompt)
    core = PagedEngineCore(family.adapter, engine_config(block_size=BLOCK))
    last_layer = family.adapter.text_model.layers[-1]
    original = last_layer.forward
    failures: list[int] = []

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(1)
            raise RuntimeError("injected: the last layer failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(last_layer, "forward", fail_once)
    failed = run(core, [traced("victim", prompt)]).results["victim"]
    assert failures and failed.finish_reason is FinishReason.ERROR and not failed.tokens
    assert core.stats().num_kv_blocks_cached == 0
    after = run(core, [traced("after", prompt)]).results["after"]
    assert after.num_cached_tokens == 0
    assert_same_output(after, reference)
    # Blocks of completed steps are kept: a third run of the prompt finds them.
    third = run(core, [traced("third", prompt)]).results["third"]
    assert third.num_cached_tokens == (prompt.num_tokens - 1) // BLOCK * BLOCK
    assert_same_output(third, reference)
    assert_all_blocks_free(core)


def test_an_abort_arriving_with_its_request_means_it_never_runs(family: Loaded) -> None:
    prompts = [family.renderer.render([user_turn(f"Picture {i}?", image(i, (70, 70)))]) for i in range(2)]
    core = PagedEngineCore(family.adapter, engine_config(block_size=BLOCK))
    recorder = Recorder()
    core.add_request(request("kept", prompts[0], max_tokens=3))
    core.add_request(request("gone", prompts[1], max_tokens=3))
    core.abort_request("gone")
    core.step(recorder)
    assert "gone" not in core._sequences and core.stats().num_aborted == 1
    assert core.stats().num_running == 1 and core.stats().num_waiting == 0
    run(core, [], recorder)
    assert set(recorder.results) == {"kept"} and len(recorder.results["kept"].tokens) == 3
    assert_all_blocks_free(core)


def test_an_abort_frees_its_blocks_for_a_request_added_in_the_same_step(family: Loaded) -> None:
    prompts = [family.renderer.render([user_turn(f"Tell me about picture {i}.", image(i, (70, 70)))])
               for i in range(2)]
    assert prompts[0].num_tokens == prompts[1].num_tokens
    blocks = -(-prompts[0].num_tokens // BLOCK) + 2  # one of them at a time
    core = PagedEngineCore(family.adapter, engine_config(block_size=BLOCK, num_kv_blocks=blocks,
                                                         enable_prefix_caching=False))
    recorder = Recorder()
    core.add_request(request("old", prompts[0], max_tokens=40))
    core.step(recorder)
    core.step(recorder)
    core.abort_request("old")
    core.add_request(request("new", prompts[1], max_tokens=2))
    core.step(recorder)  # the pool fits one of them: the abort must be applied before the new one is admitted
    assert core.stats().num_running == 1 and core._sequences["new"].num_computed_tokens == prompts[1].num_tokens
    assert recorder.results["new"].tokens and len(recorder.results["old"].tokens) == 2
    run(core, [], recorder)
    assert recorder.results["new"].finish_reason is FinishReason.LENGTH
    assert_all_blocks_free(core)


def test_n_siblings_share_their_prompt_blocks_until_both_finish(family: Loaded) -> None:
    prompt = family.renderer.render([user_turn("Describe the picture in detail.", image(5, (70, 70)))])
    parent = request("n", prompt, max_tokens=8)
    # As the engine client fans out n = 2: one prompt object, two sequences.
    siblings = [dataclasses.replace(parent, request_id="n-0", sampling=dataclasses.replace(parent.sampling,
                                                                                           max_tokens=3)),
                dataclasses.replace(parent, request_id="n-1")]
    core = PagedEngineCore(family.adapter, engine_config(block_size=BLOCK))
    recorder = Recorder()
    for sibling in siblings:
        core.add_request(sibling)
    shared = (prompt.num_tokens - 1) // BLOCK
    seen_shared = False
    while core.has_work():
        leader, follower = (core._sequences.get(s.request_id) for s in siblings)
        if leader is not None and follower is not None and follower.block_ids:
            assert follower.block_ids[:shared] == leader.block_ids[:shared]
            assert {core.kv.pool.ref_count(b) for b in leader.block_ids[:shared]} == {2}
            assert set(follower.block_ids[shared:]).isdisjoint(leader.block_ids)
            seen_shared = True
        core.step(recorder)
        if leader is not None and "n-0" not in core._sequences:  # the leader just finished: the sibling holds on
            assert follower is not None
            assert {core.kv.pool.ref_count(b) for b in follower.block_ids[:shared]} == {1}
    assert seen_shared
    assert recorder.results["n-1"].num_cached_tokens == shared * BLOCK
    expected = generate_alone(family.reference, prompt, 8)
    assert recorder.results["n-0"].tokens == expected[:3] and recorder.results["n-1"].tokens == expected
    assert_all_blocks_free(core)
    assert core.stats().prefix_cache_hits == shared * BLOCK


def test_different_cache_salts_never_share_blocks(family: Loaded) -> None:
    prompt = family.renderer.render([user_turn("Which colour?", image(6, (70, 70)))])
    core = PagedEngineCore(family.adapter, engine_config(block_size=BLOCK))
    cacheable = (prompt.num_tokens - 1) // BLOCK * BLOCK

    def cached(request_id: str, salt: str | None) -> int:
        salted = dataclasses.replace(request(request_id, prompt, max_tokens=2), cache_salt=salt)
        return run(core, [salted]).results[request_id].num_cached_tokens

    assert cached("a1", "key-a") == 0
    assert cached("b1", "key-b") == 0
    assert cached("none", None) == 0
    assert cached("a2", "key-a") == cacheable
    assert cached("b2", "key-b") == cacheable


def test_a_block_completed_by_a_graphed_decode_row_is_not_shared_within_its_step(family: Loaded) -> None:
    """A decode row (graph part) writes the last slot of a block while another request's prefill (eager part,
    run first) holds the same tokens: the prefill must compute that block itself, not read it half written."""
    prompt = family.renderer.render([user_turn("Count the shapes.", image(7, (70, 70)))])
    core = PagedEngineCore(family.adapter, engine_config(block_size=BLOCK))
    core.runner._graphs = EagerDecodeGraphs(family.adapter)  # type: ignore[assignment]
    recorder = Recorder()
    core.add_request(request("writer", prompt, max_tokens=40))
    core.step(recorder)
    writer = core._sequences["writer"]
    while writer.num_computed_tokens < prompt.num_tokens or (writer.num_computed_tokens + 1) % BLOCK:
        core.step(recorder)
    # The writer's next step writes the last slot of its block ending at num_tokens. A prompt holding the
    # writer's tokens and a few more would match that block if it were findable in the same step.
    follower_prompt = extended(prompt, writer.tokens(0, writer.num_tokens) + writer.output_token_ids[:3])
    partition = core.runner._partition
    splits: list[tuple[list[str], list[str]]] = []

    def recording(chunks: list[Any]) -> tuple[list[Any], list[Any]]:
        graphed, eager = partition(chunks)
        splits.append(([c.sequence.request_id for c in graphed], [c.sequence.request_id for c in eager]))
        return graphed, eager

    core.runner._partition = recording  # type: ignore[method-assign]
    core.add_request(traced("follower", follower_prompt, max_tokens=4))
    block_end = writer.num_tokens
    core.step(recorder)
    assert splits == [(["writer"], ["follower"])]
    assert core._sequences["follower"].num_cached_tokens == block_end - BLOCK  # not the block being completed
    run(core, [], recorder)
    assert_same_output(recorder.results["follower"], alone_without_cache(family, follower_prompt, 4))


def extended(prompt: PreparedPrompt, token_ids: list[int]) -> PreparedPrompt:
    """`prompt` with more text tokens after it (same images): what a follow-up turn's prompt looks like."""
    extra = len(token_ids) - prompt.num_tokens
    inputs = dict(prompt.model_inputs)
    if "mm_token_type_ids" in inputs:  # text tokens are type 0
        types = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(types.shape[0], extra)], dim=1)
    return PreparedPrompt(token_ids=token_ids, model_inputs=inputs, image_hashes=prompt.image_hashes,
                          image_spans=prompt.image_spans)
