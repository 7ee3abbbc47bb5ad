"""Multi-turn chats on two Ray Serve replicas: the image-aware router vs Ray Serve's default, same requests.

Each of `--conversations` chats sends `--turns` turns that re-send its own image (every chat asks the same
questions, so only the image tells them apart); chats run concurrently, turns one after the other. Reported per
router: TTFT by turn (streamed, first content chunk), the prefix-cache hit rate (prompt tokens found / looked up)
and the image-embedding cache hit rate, summed over replicas from /stats. CPU, bundled demo model:

    python -m bench.ray_router --conversations 8 --turns 5 --out bench/results/ray_router_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import time
from typing import Any

import httpx

QUESTIONS = ["How many shapes are there?", "What color is the circle?", "Is there a red square?",
             "Describe the image.", "What shape is on the left?", "How many shapes are there?"]


def _image(seed: int) -> str:
    from vlmserve.demo.shapes import draw_sample_image

    buffer = io.BytesIO()
    draw_sample_image(seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def _turn(client: httpx.AsyncClient, messages: list[dict[str, Any]]) -> tuple[float, str]:
    body = {"model": "vlmserve-demo", "messages": messages, "max_tokens": 16, "temperature": 0, "stream": True}
    start, ttft, text = time.perf_counter(), None, ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text += piece
    return (ttft if ttft is not None else time.perf_counter() - start), text


async def _conversation(client: httpx.AsyncClient, seed: int, turns: int) -> list[float]:
    url, messages, ttfts = _image(seed), [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": QUESTIONS[turn % len(QUESTIONS)]}]})
        ttft, answer = await _turn(client, messages)
        messages.append({"role": "assistant", "content": answer})
        ttfts.append(ttft)
    return ttfts


def run_router(router: str, conversations: int, turns: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from tests.conftest import free_port
    from vlmserve.config import Config, RayConfig, ServerConfig
    from vlmserve.ray.app import APP_NAME, build_application, shutdown

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, namespace="vlmserve", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = Config(server=ServerConfig(port=port), ray=RayConfig(ray=True, replicas=2, router=router))
        serve.run(build_application(config), name=APP_NAME, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        while len(httpx.get(base + "/stats").json().get("replicas", {})) < 2:
            time.sleep(0.25)

        async def all_chats() -> list[list[float]]:
            async with httpx.AsyncClient(base_url=base, timeout=300) as client:
                return await asyncio.gather(*(_conversation(client, 1000 + i, turns) for i in range(conversations)))

        ttfts = asyncio.run(all_chats())
        time.sleep(1.5)  # let the replicas' last counters reach the stats board
        stats = httpx.get(base + "/stats").json()
        shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()
    images = stats["image_cache_hits"] + stats["image_cache_misses"]
    return {"router": router, "ttft_ms_by_turn": [round(1000 * statistics.median(t[i] for t in ttfts), 1)
                                                 for i in range(turns)],
            "prefix_cache_hit_rate": round(stats["prefix_cache_hit_rate"], 3),
            "image_cache_hit_rate": round(stats["image_cache_hits"] / images, 3) if images else 0.0,
            "finished_by_replica": {k: v["num_finished"] for k, v in stats["replicas"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = [run_router(router, args.conversations, args.turns) for router in ("image-aware", "power-of-two")]
    for result in results:
        print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": "CPU (2 cores, shared)", "conversations": args.conversations,
                       "turns": args.turns, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
