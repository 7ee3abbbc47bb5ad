"""Hybrid decoders (Qwen3.5) and long Qwen-VL-Chat prompts on the GPU, in one call: CUDA correctness, then speed.

1. Correctness, float32 on CUDA (Triton paged attention beside the recurrent layers' torch reference):
   - tiny Qwen3.5 and Qwen3.5-MoE (tests/fixtures): the load-time self-check; five two-image prompts run
     concurrently with 13-token prefill chunks, then again under a KV budget small enough to force preemptions;
     tokens must equal greedy `generate` (end tokens neither stopping nor masked);
   - tiny Qwen-VL-Chat at max_model_len 4096: a 2,200-token two-image prompt (dynamic NTK factor 3) beside a short
     one; largest logprob difference to the port's `generate`.
2. Speed, bf16: a Qwen3.5 of transformers' default text config (hidden 4096, 32 layers, 24 of them gated delta-net;
   random weights, built in memory), one small image + 100 words (~500 tokens) per request, 64 output tokens
   (ignore_eos): output tokens/s of the paged engine (no CUDA graphs for hybrids) against the generate engine, at
   c = 1, 16 and 64.

Usage on the device (from the repository root):
    run(command="source bench/device_env.sh && timeout 540 python3 -m bench.hybrid_gpu --out $OUT", carry=[".whl"])
Writes $OUT/hybrid_gpu.json; every section also prints one line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vlmserve.config import EngineConfig, ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.generate_core import GenerateEngineCore
from vlmserve.engine.paged_check import check_paged_engine, reference_logprobs
from vlmserve.engine.protocol import CoreOutput
from vlmserve.models.hf_compat import attention_name, use_attention
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import GenerationRequest, PreparedPrompt, SamplingParams

#: "cpu" (BENCH_DEVICE=cpu) smokes the script on a laptop: same steps, a 2-layer model for the speed part
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_core(core: Any, prompts: dict[str, PreparedPrompt], max_tokens: int, *, logprobs: bool = False
             ) -> tuple[dict[str, list[int]], dict[str, list[Any]], float]:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs,
                              top_logprobs=3 if logprobs else None)
    tokens: dict[str, list[int]] = {r: [] for r in prompts}
    positions: dict[str, list[Any]] = {r: [] for r in prompts}

    def emit(outputs: list[CoreOutput]) -> None:
        for output in outputs:
            if output.error is not None:
                raise RuntimeError(f"{output.request_id}: {output.error}")
            tokens[output.request_id] += output.new_token_ids
            positions[output.request_id] += [p for p in output.new_logprobs or [] if p is not None]

    for request_id, prompt in prompts.items():
        core.add_request(GenerationRequest(request_id=request_id, prompt=prompt, sampling=sampling))
    _sync()
    started = time.perf_counter()
    while core.has_work():
        core.step(emit)
    _sync()
    return tokens, positions, time.perf_counter() - started


def hybrid_correctness(name: str, root: Path) -> dict[str, Any]:
    from tests.fixtures.tiny.registry import FAMILIES
    from tests.integration.engine.conftest import image, user_turn

    path = FAMILIES[name].build(root / name)
    adapter = load_model(ModelConfig(model=str(path), device=DEVICE, dtype="float32"))
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len)
    from vlmserve.serve import self_check_prompt

    check = check_paged_engine(adapter, self_check_prompt(adapter), EngineConfig())
    prompts = {f"r{i}": renderer.render([user_turn("Describe this picture" + " please" * i + ".", image(i),
                                                   image(i + 3))]) for i in range(5)}
    expected = {r: reference_logprobs(adapter, p, 8)[0] for r, p in prompts.items()}
    chunked, _, _ = run_core(PagedEngineCore(adapter, EngineConfig(max_num_batched_tokens=13)), prompts, 8)
    longest = max(p.num_tokens for p in prompts.values()) + 8
    tight = PagedEngineCore(adapter, EngineConfig(num_kv_blocks=-(-longest // 4) + 3, block_size=4))
    preempted, _, _ = run_core(tight, prompts, 8)
    return {"self_check": check.reason or f"ok (max error {check.max_error:.3g})",
            "chunked_matches_of_5": sum(chunked[r] == expected[r] for r in prompts),
            "preempted_matches_of_5": sum(preempted[r] == expected[r] for r in prompts),
            "num_preemptions": tight.stats().num_preemptions}


def qwen_vl_chat_long(root: Path) -> dict[str, Any]:
    from tests.fixtures.tiny.qwen_vl_chat import build_qwen_vl_chat
    from tests.unit.models.qwen_vl_chat.qwen_vl_chat_prompts import images, prepare
    from vlmserve.models.qwen_vl_chat.adapter import load

    adapter = load(build_qwen_vl_chat(root / "qwen_vl_chat"), device=DEVICE, dtype=torch.float32,
                   max_model_len=4096)
    def two_images(words: int) -> PreparedPrompt:
        # NOTE: prepare() names images h0, h1 in every prompt (the image-embedding cache's key), so both prompts
        # carry the same two pictures
        content = [{"type": "image"}, {"type": "text", "text": "Compare the pictures. " + "shapes and colors " * words},
                   {"type": "image"}]
        return prepare(adapter, content, images((255, 0, 0), (0, 0, 255)))

    long, short = two_images(700), two_images(20)
    expected = {"long": reference_logprobs(adapter, long, 6), "short": reference_logprobs(adapter, short, 6)}
    core = PagedEngineCore(adapter, EngineConfig(max_num_batched_tokens=512))
    tokens, positions, _ = run_core(core, {"long": long, "short": short}, 6, logprobs=True)
    error = max(abs(item.logprob - float(expected[r][1][i, item.token_id])) for r in positions
                for i, p in enumerate(positions[r]) for item in (p.chosen, *p.top))
    return {"long_prompt_tokens": long.num_tokens, "ntk_alpha": adapter.ntk_alpha(long),
            "tokens_match": all(tokens[r] == expected[r][0] for r in tokens), "max_logprob_error": error}


def build_qwen3_5_default(root: Path) -> Any:
    """transformers' default Qwen3.5 text config (random bf16, in memory) behind the tiny fixture's processor."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    from tests.fixtures.tiny.qwen3_vl import _token_config, save_qwen3_vl_processor
    from vlmserve.models.hf import HFAdapter
    from vlmserve.models.hf_processor import load_processor

    ids = save_qwen3_vl_processor(root / "big", tokenizer_cls=Qwen3_5Tokenizer)
    text: dict[str, Any] = {"eos_token_id": ids["<|im_end|>"]}
    if DEVICE != "cuda":
        text |= {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512}
    config = Qwen3_5Config(text_config=text, vision_config={"depth": 4, "out_hidden_size": text.get("hidden_size", 4096)},
                           **_token_config(ids))
    config.save_pretrained(root / "big")  # the processor's class is chosen by config.json's model_type
    torch.manual_seed(0)
    with torch.device(DEVICE):
        torch.set_default_dtype(torch.bfloat16)
        model = Qwen3_5ForConditionalGeneration(config).eval()
        torch.set_default_dtype(torch.float32)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    processor = load_processor(str(root / "big"))
    return HFAdapter(model, processor, max_model_len=4096, eos_token_ids=frozenset({ids["<|im_end|>"]}),
                     image_token_id=ids["<|image_pad|>"])


def speed(root: Path, deadline: float) -> dict[str, Any]:
    from tests.integration.engine.conftest import image, user_turn

    adapter = build_qwen3_5_default(root)
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len)
    prompt = renderer.render([user_turn(" ".join(f"word{i % 97}" for i in range(100)), image(1))])
    results: dict[str, Any] = {"prompt_tokens": prompt.num_tokens, "output_tokens": 64}
    attention = attention_name(adapter.text_model.config)
    for concurrency in (1, 16, 64):
        for engine in ("paged", "generate"):
            if time.monotonic() > deadline or (DEVICE != "cuda" and concurrency > 16):
                results[f"{engine}_c{concurrency}"] = "skipped (time)"
                continue
            config = EngineConfig(max_num_seqs=64, max_generate_batch=64, num_kv_blocks=2048,
                                  enable_cuda_graphs=False)
            # the paged engine switches the decoder to paged attention; the generate engine needs it back
            use_attention(adapter.text_model.config, attention)
            core = PagedEngineCore(adapter, config) if engine == "paged" else GenerateEngineCore(adapter, config)
            prompts = {f"{engine}{concurrency}-{i}": prompt for i in range(concurrency)}
            tokens, _, seconds = run_core(core, prompts, 64)
            results[f"{engine}_c{concurrency}"] = {"output_tok_s": round(sum(map(len, tokens.values())) / seconds, 1),
                                                   "seconds": round(seconds, 2)}
            print(engine, concurrency, results[f"{engine}_c{concurrency}"], flush=True)
            del core
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=480)
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    report: dict[str, Any] = {"card": card, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("qwen3_5", "qwen3_5_moe"):
            report[name] = hybrid_correctness(name, root)
            print(name, report[name], flush=True)
        report["qwen_vl_chat_long"] = qwen_vl_chat_long(root)
        print("qwen_vl_chat_long", report["qwen_vl_chat_long"], flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hybrid_gpu.json").write_text(json.dumps(report, indent=2))
        report["speed_qwen3_5_default_bf16"] = speed(root, deadline)
    (args.out / "hybrid_gpu.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
