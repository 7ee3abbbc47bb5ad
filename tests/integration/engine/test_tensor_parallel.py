"""`--tensor-parallel-size 2` on the CPU (gloo, a second process spawned by the engine): the sharded engine gives
the same greedy tokens as the unsharded one, and logprobs within float32 noise, for five families — Qwen2-VL
(M-RoPE), LLaVA (Llama decoder), GLM-4.1V (one KV head for two ranks: replicated; fused gate_up_proj) and the
native GLM-4V-9B port (fused query_key_value and dense_h_to_4h) — and Granite 4 Vision (its layer features reach
the workers' decoders through the forward plan) through the paged engine, prompts with images, chunked prefill
mixed with decode."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.engine.conftest import image, request, user_turn
from vlmserve.config import Config, EngineConfig, ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.parallel.launch import start
from vlmserve.engine.protocol import CoreOutput
from vlmserve.errors import TensorParallelError
from vlmserve.models.base import ModelAdapter
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import GenerationRequest

FAMILIES = ("qwen2_vl", "llava", "glm4v", "glm4v_9b", "granite4_vision")
#: float32 logprobs of the same model, summed in another order by the all-reduce
TOLERANCE = 1e-4

Result = dict[str, list[tuple[int, float, list[float]]]]  # request → (token, its logprob, top-3 logprobs) each


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.fixtures.tiny.registry import FAMILIES as TINY

    root = tmp_path_factory.mktemp("tp-families")
    built = {name: TINY[name].build(root / name) for name in FAMILIES if name != "glm4v_9b"}
    from tests.fixtures.tiny.glm4v_9b import build_glm4v_9b

    built["glm4v_9b"] = build_glm4v_9b(root / "glm4v_9b")
    return built


def _engine_config(size: int) -> EngineConfig:
    # a 24-token budget splits the image prompt's prefill into chunks that run beside the text prompt's decode
    return EngineConfig(tensor_parallel_size=size, num_kv_blocks=64, max_num_batched_tokens=24, max_num_seqs=4)


def _requests(adapter: ModelAdapter) -> list[GenerationRequest]:
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len)
    with_image = renderer.render([user_turn("What is in this picture?", image(1))])
    text = renderer.render([user_turn("Say something about the weather today.")])
    return [request(f"r{i}", prompt, max_tokens=6, logprobs=True, top_logprobs=3)
            for i, prompt in enumerate((with_image, text))]


def _run(adapter: ModelAdapter, engine: EngineConfig) -> Result:
    core = PagedEngineCore(adapter, engine)
    requests = _requests(adapter)
    results: Result = {r.request_id: [] for r in requests}

    def emit(outputs: list[CoreOutput]) -> None:
        for output in outputs:
            assert output.error is None, output.error
            for token, logprobs in zip(output.new_token_ids, output.new_logprobs or [], strict=True):
                assert logprobs.chosen.token_id == token
                results[output.request_id].append((token, logprobs.chosen.logprob, [t.logprob for t in logprobs.top]))

    for r in requests:
        core.add_request(r)
    while core.has_work():
        core.step(emit)
    assert all(len(tokens) == 6 for tokens in results.values())
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_match_one(family: str, checkpoints: dict[str, Path]) -> None:
    path = str(checkpoints[family])
    alone = _run(load_model(ModelConfig(model=path, device="cpu")), _engine_config(1))
    config = Config(model=ModelConfig(model=path, device="cpu"), engine=_engine_config(2))
    adapter, workers = start(config)
    try:
        layout = adapter.kv_layout
        sharded = _run(adapter, config.engine)
    finally:
        workers.stop()
    full = load_model(ModelConfig(model=path, device="cpu")).kv_layout
    assert layout.num_kv_heads == max(1, full.num_kv_heads // 2)  # rank 0's cache holds its heads only
    for request_id, tokens in alone.items():
        assert [t for t, _, _ in sharded[request_id]] == [t for t, _, _ in tokens], request_id
        for (_, logprob, top), (_, logprob_tp, top_tp) in zip(tokens, sharded[request_id], strict=True):
            assert logprob_tp == pytest.approx(logprob, abs=TOLERANCE)
            assert top_tp == pytest.approx(top, abs=TOLERANCE)


def test_unsupported_family_is_refused_before_any_worker(tmp_path: Path) -> None:
    from tests.fixtures.tiny.qwen_vl_chat import build_qwen_vl_chat

    path = build_qwen_vl_chat(tmp_path / "qwen_vl_chat", num_shards=1)
    config = Config(model=ModelConfig(model=str(path), device="cpu"), engine=_engine_config(2))
    with pytest.raises(TensorParallelError, match=r"qwen_vl_chat.*--tensor-parallel-size"):
        start(config)
