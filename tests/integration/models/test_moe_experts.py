"""The MoE families' expert layers run as grouped GEMMs on the paged engine, and change nothing a user sees.

Per MoE family on the allow-list (tiny random weights, float32, CPU): the loaded model dispatches every expert layer
to vlmserve's grouped GEMM; the paged engine's per-token logprobs (chunked prefill mixed with decode, several
images per prompt) equal `model.generate` run with transformers' own loop over experts ("eager") within the same
1e-5 the other families are held to (tests/integration/models/test_paged_logprobs.py, which also runs these
families with the grouped path on both sides).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.tiny.registry import FAMILIES
from tests.integration.engine.conftest import engine_config
from tests.integration.models.test_paged_logprobs import (
    MAX_TOKENS,
    TOLERANCE,
    _conversations,
    _largest_difference,
    _raise_pixel_budget,
    _run,
)
from vlmserve.config import ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.paged_check import reference_logprobs
from vlmserve.models import hf_compat, moe_experts
from vlmserve.models.families import FAMILY_SPECS
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

#: the tiny checkpoints with expert layers (the glm46v and qwen3_5 specs also say "grouped"; their tiny checkpoints
#: are dense)
MOE_FAMILIES = ["glm4v_moe", "qwen3_vl_moe", "qwen3_5_moe"]


def test_the_moe_families_ask_for_grouped_experts() -> None:
    assert all(FAMILY_SPECS[name].experts == "grouped" for name in MOE_FAMILIES)


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_paged_grouped_experts_equal_generate_with_the_expert_loop(name: str, tmp_path: Path) -> None:
    adapter = load_model(ModelConfig(model=str(FAMILIES[name].build(tmp_path / name))))
    model = adapter.model  # type: ignore[attr-defined]
    experts = hf_compat.experts_modules(model)
    assert experts and {hf_compat.experts_name(m) for m in experts} == {moe_experts.EXPERTS_NAME}

    _raise_pixel_budget(adapter)
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len, max_images_per_prompt=adapter.max_images_per_prompt)
    prompts = [renderer.render(c) for c in _conversations(adapter.max_images_per_prompt)[:2]]
    hf_compat.use_experts(model, "eager")
    expected = [reference_logprobs(adapter, p, MAX_TOKENS) for p in prompts]
    moe_experts.install_grouped_experts(model)

    calls = 0
    grouped = moe_experts.grouped_experts_forward

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return grouped(*args, **kwargs)  # type: ignore[arg-type]

    hf_compat.register_experts(moe_experts.EXPERTS_NAME, counting)
    try:
        core = PagedEngineCore(adapter, engine_config(max_num_batched_tokens=48))
        got = _run(core, {"a": prompts[0], "b": prompts[1]})
    finally:
        hf_compat.register_experts(moe_experts.EXPERTS_NAME, grouped)
    assert calls > 0  # the engine's decoder steps did go through the grouped path
    errors = [_largest_difference(got[r], *expected[i]) for i, r in enumerate("ab")]
    assert max(errors) <= TOLERANCE, f"{name}: largest logprob difference {max(errors):.3g}"
