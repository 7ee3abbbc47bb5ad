"""`DecodeGraphs` on the CPU: its static buffers, batch-size buckets and padding rows, with capture stood in for.

A CUDA graph replays the kernels it captured on whatever its static input buffers hold, writing into the same
output tensor. `CpuCapturedGraphs` keeps every line of `DecodeGraphs` but the capture, and its replay re-runs the
captured forward on the static buffers into that same output tensor: what `run` feeds the graph, and how padding
rows behave, is then checked against the eager engine (tokens and logprobs) on the CPU. (The real capture runs in the GPU check of
bench/engine_direct.py.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.integration.engine.conftest import (
    Loaded,
    engine_config,
    generate_alone,
    prompts_with_images,
    request,
)
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.cuda_graphs import DecodeGraphs
from vlmserve.engine.protocol import CoreOutput
from vlmserve.types import GenerationRequest


class CpuReplay:
    def __init__(self, replay: Callable[[], Any]) -> None:
        self._replay = replay
        self.count = 0

    def replay(self) -> None:
        self.count += 1
        self._replay()


class CpuCapturedGraphs(DecodeGraphs):
    """`DecodeGraphs` with a CPU stand-in for capture; records (sequences, padded size) of every replay."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.replays: list[tuple[int, int]] = []
        super().__init__(*args, **kwargs)

    @torch.inference_mode()
    def _capture(self, size: int, pool: Any) -> None:
        self._logits[size] = self._forward(size)

        def replay() -> None:
            self._logits[size].copy_(self._forward(size))

        self._graphs[size] = CpuReplay(replay)  # type: ignore[assignment]

    def run(self, embeds: torch.Tensor, positions: torch.Tensor, attention: Any) -> torch.Tensor:
        size = next(s for s in self.sizes if s >= embeds.shape[0])
        self.replays.append((embeds.shape[0], size))
        return super().run(embeds, positions, attention)


def run_traced(core: PagedEngineCore, requests: list[GenerationRequest]) -> dict[str, tuple[list[int], list[float]]]:
    """Each request's tokens and chosen-token logprobs (tokens alone hide small errors on tiny random models)."""
    out: dict[str, tuple[list[int], list[float]]] = {r.request_id: ([], []) for r in requests}

    def emit(outputs: list[CoreOutput]) -> None:
        for output in outputs:
            assert output.error is None
            out[output.request_id][0].extend(output.new_token_ids)
            out[output.request_id][1].extend(p.chosen.logprob for p in output.new_logprobs or [] if p is not None)

    for r in requests:
        core.add_request(r)
    while core.has_work():
        core.step(emit)
    return out


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])  # M-RoPE position rows, and plain RoPE
def test_decode_graphs_replay_padded_batches_to_the_same_outputs(name: str, loaded: Callable[[str], Loaded],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    family = loaded(name)
    # A paged core takes over its adapter's attention: an adapter of our own leaves the shared one as it was.
    family = dataclasses.replace(family, adapter=family.fresh_adapter())
    prompts = prompts_with_images(family.renderer, 6)
    # Different lengths: the decode batch shrinks step by step through padded sizes (5 of 6, 3 of 4, ...).
    requests = [request(f"g{i}", p, max_tokens=3 + 2 * i, logprobs=True) for i, p in enumerate(prompts)]
    eager = run_traced(PagedEngineCore(family.adapter, engine_config(max_num_seqs=6)), requests)
    core = PagedEngineCore(family.adapter, engine_config(max_num_seqs=6))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)  # the one CUDA call outside the capture
    graphs = CpuCapturedGraphs(family.adapter, core.runner.cache, max_batch=6, max_model_len=core.max_model_len)
    assert graphs.sizes == [1, 2, 4, 6]
    core.runner._graphs = graphs
    got = run_traced(core, requests)
    for r in requests:
        assert got[r.request_id][0] == eager[r.request_id][0]
        torch.testing.assert_close(torch.tensor(got[r.request_id][1]), torch.tensor(eager[r.request_id][1]),
                                   rtol=0, atol=1e-5)
    assert eager["g0"][0] == generate_alone(family.reference, prompts[0], 3)
    padded = {(n, size) for n, size in graphs.replays if n < size}
    assert {(5, 6), (3, 4)} <= padded, graphs.replays
    assert sum(g.count for g in graphs._graphs.values()) == len(graphs.replays)  # type: ignore[attr-defined]
