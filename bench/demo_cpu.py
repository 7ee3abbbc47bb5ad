"""Throughput of the bundled demo model on this machine's CPU: requests/s at concurrency 1 and 16.

Starts `vlmserve serve` (the demo model), asks fresh shapes questions (PNG data URIs) through the OpenAI API with
greedy decoding and the model's natural answer lengths, and prints one JSON line per concurrency.

    python -m bench.demo_cpu [--requests 64] [--concurrency 1 16]
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

import httpx

from vlmserve.demo.shapes import encode, sample_qa


def body(seed: int) -> dict[str, object]:
    image, question, _, _ = sample_qa(seed)
    url = "data:image/png;base64," + base64.b64encode(encode(image)).decode()
    return {"model": "vlmserve-demo", "temperature": 0, "max_tokens": 40, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}


async def measure(base: str, concurrency: int, num_requests: int, first_seed: int) -> dict[str, object]:
    bodies = [body(first_seed + i) for i in range(num_requests)]
    latencies: list[float] = []
    tokens = 0
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:

        async def one(payload: dict[str, object]) -> None:
            nonlocal tokens
            async with semaphore:
                started = time.perf_counter()
                response = await client.post("/v1/chat/completions", json=payload)
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
                tokens += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        elapsed = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": num_requests, "seconds": round(elapsed, 2),
            "requests_per_s": round(num_requests / elapsed, 2), "output_tokens_per_s": round(tokens / elapsed, 1),
            "latency_p50_s": round(statistics.median(latencies), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-m", "vlmserve", "serve", "--port", str(args.port),
                               "--log-level", "WARNING"], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        asyncio.run(measure(base, 4, 8, 0))  # warm-up
        print(json.dumps({"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}))
        for index, concurrency in enumerate(args.concurrency):
            print(json.dumps(asyncio.run(measure(base, concurrency, args.requests, 10_000 * (index + 1)))))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
