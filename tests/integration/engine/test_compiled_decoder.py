"""The decoder as `torch.compile` sees it before decode-graph capture: traced by dynamo with our paged attention
left outside the compiled graphs. On the CPU the traced graphs run eagerly (backend "eager"; inductor's fused
kernels are checked by the CUDA check in bench/final_call.sh): the tokens equal plain `generate`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tests.integration.engine.conftest import (
    Loaded,
    engine_config,
    generate_alone,
    prompts_with_images,
    request,
    run_core,
)
from vlmserve.engine.attention import AttentionBatch
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.cuda_graphs import compiled_decoder

MAX_TOKENS = 6


class CompiledDecodeStandIn:
    """`DecodeGraphs.run` without the capture: the compiled decoder called directly for the decode rows."""

    max_batch = 64

    def __init__(self, adapter: Any, decoder: Any) -> None:
        self.adapter, self.decoder = adapter, decoder
        self.batches: list[int] = []

    def run(self, embeds: torch.Tensor, positions: torch.Tensor, attention: AttentionBatch) -> torch.Tensor:
        self.batches.append(embeds.shape[0])
        with attention.active():
            output = self.decoder(inputs_embeds=embeds.unsqueeze(0), position_ids=positions.unsqueeze(1),
                                  use_cache=False)
        return self.adapter.compute_logits(output.last_hidden_state[0])


def test_compiled_decoder_gives_the_tokens_of_generate(loaded: Callable[[str], Loaded]) -> None:
    torch._dynamo.reset()
    family = loaded("qwen2_vl")
    prompts = prompts_with_images(family.renderer, 3)
    reference = [generate_alone(family.reference, p, MAX_TOKENS) for p in prompts]
    adapter = family.fresh_adapter()  # a paged core switches its decoder's attention; the shared one stays as is
    core = PagedEngineCore(adapter, engine_config(max_num_batched_tokens=24))
    graphs = CompiledDecodeStandIn(adapter, compiled_decoder(adapter.text_model, backend="eager"))
    core.runner._graphs = graphs  # type: ignore[assignment]
    got = run_core(core, [request(f"r{i}", p, max_tokens=MAX_TOKENS) for i, p in enumerate(prompts)])
    assert [got[f"r{i}"] for i in range(3)] == reference
    assert max(graphs.batches) > 1 and min(graphs.batches) == 1  # a dynamic batch through one compilation
