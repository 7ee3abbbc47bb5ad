"""What the HTTP server adds over the engine alone, on the CPU with the bundled demo model (issue 12's CPU target:
≤ 5 ms p50 for a 1-token request).

Both sides answer the same kind of request: one fresh 96x96 shapes PNG + its question, greedy, max_tokens=1, one at a
time. "Engine alone" is this process driving `AsyncEngine.generate` with a prompt rendered beforehand (token ids and
pixel values ready: what the engine receives from the server). "Server" is `vlmserve serve` in a subprocess, asked
through HTTP with the image as a base64 data URI, so its time includes the HTTP exchange, JSON, the data-URI
decode, PNG decode, prompt rendering with the processor, and the response. The two sides alternate request by request so
load on the machine shifts both alike; the median of the paired differences is the server's cost.

    python -m bench.server_overhead [--requests 120]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid

import httpx

from vlmserve.cli import build_parser, config_from_args
from vlmserve.demo.shapes import encode, sample_qa
from vlmserve.models.loader import load_model
from vlmserve.multimodal.decode import image_hash
from vlmserve.serve import build_service
from vlmserve.types import ChatMessage, GenerationRequest, ImagePart, SamplingParams, TextPart


def http_body(seed: int) -> dict[str, object]:
    image, question, _, _ = sample_qa(seed)
    url = "data:image/png;base64," + base64.b64encode(encode(image)).decode()
    return {"model": "vlmserve-demo", "temperature": 0, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}


async def engine_alone(engine, renderer, seeds: list[int]) -> list[float]:  # type: ignore[no-untyped-def]
    prompts = []
    for seed in seeds:
        image, question, _, _ = sample_qa(seed)
        prompts.append(renderer.render([ChatMessage("user", (ImagePart(image, image_hash(image)),
                                                             TextPart(question)))]))
    latencies = []
    for prompt in prompts:
        request = GenerationRequest(uuid.uuid4().hex, prompt, SamplingParams(temperature=0.0, max_tokens=1))
        started = time.perf_counter()
        async for _ in engine.generate(request):
            pass
        latencies.append(time.perf_counter() - started)
    return latencies


def through_http(client: httpx.Client, seeds: list[int]) -> list[float]:
    latencies = []
    for seed in seeds:
        body = http_body(seed)  # built outside the timed region, like the engine side's rendered prompt
        started = time.perf_counter()
        response = client.post("/v1/chat/completions", json=body)
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()
    return latencies


def start_server(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen([sys.executable, "-m", "vlmserve", "serve", "--port", str(port), "--log-level",
                               "WARNING"], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise SystemExit("the server did not become healthy")


def ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": round(1000 * statistics.median(ordered), 2),
            "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 2), "n": len(ordered)}


async def measure(args: argparse.Namespace) -> dict[str, object]:
    config = config_from_args(build_parser().parse_args(["serve"]))
    adapter = load_model(config.model)
    _, engine = build_service(adapter, config)
    from vlmserve.multimodal.prompt import PromptRenderer

    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=engine.max_model_len,
                              max_images_per_prompt=adapter.max_images_per_prompt)
    engine.start()
    server = start_server(args.port)
    engine_times: list[float] = []
    http_times: list[float] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=60) as client:
            await engine_alone(engine, renderer, list(range(900_000, 900_008)))  # warm-up, both sides
            through_http(client, list(range(900_008, 900_016)))
            for index in range(args.requests):  # pairs, so drift in the machine's load hits both sides alike
                engine_times += await engine_alone(engine, renderer, [2 * index])
                http_times += await asyncio.to_thread(through_http, client, [2 * index + 1])
    finally:
        server.terminate()
        server.wait(30)
        await engine.shutdown(5)
    engine_stats, http_stats = ms(engine_times), ms(http_times)
    differences = [h - e for e, h in zip(engine_times, http_times, strict=True)]
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "engine_alone": engine_stats, "through_http": http_stats,
            "server_adds_p50_ms": round(http_stats["p50_ms"] - engine_stats["p50_ms"], 2),
            "paired_difference": ms(differences)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=120, help="pairs (one request on each side)")
    parser.add_argument("--port", type=int, default=8766)
    print(json.dumps(asyncio.run(measure(parser.parse_args()))))


if __name__ == "__main__":
    main()
