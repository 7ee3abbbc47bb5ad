"""vlmserve on Ray Serve: two demo-model replicas behind the ingress on a local Ray cluster (127.0.0.1 only).

The official openai client talks to the ingress unchanged; concurrent requests spread over both replicas; a
5-turn chat that re-sends its image stays on one replica and hits its prefix and image caches there; killing a
replica under load leaves every client with a final status and the application serving.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from tests.conftest import free_port  # noqa: E402
from vlmserve.config import Config, EngineConfig, RayConfig, ServerConfig  # noqa: E402
from vlmserve.demo.shapes import draw_sample_image  # noqa: E402

pytestmark = pytest.mark.slow


def image_url(seed: int) -> str:
    buffer = io.BytesIO()
    draw_sample_image(seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def ray_app() -> Iterator[str]:
    from vlmserve.ray.app import APP_NAME, build_application, shutdown

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, namespace="vlmserve", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = Config(engine=EngineConfig(max_num_seqs=8, max_waiting_requests=32),
                        server=ServerConfig(port=port), ray=RayConfig(ray=True, replicas=2, num_cpus_per_replica=1))
        serve.run(build_application(config), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: len(stats(url).get("replicas", {})) == 2, "both replicas report")
        yield url
        shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()


def stats(url: str) -> dict[str, Any]:
    return httpx.get(url + "/stats", timeout=10).json()


def wait_for(condition: Any, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting until {what}")


def finished_by_replica(url: str) -> dict[str, int]:
    return {name: s["num_finished"] for name, s in stats(url)["replicas"].items()}


def test_the_openai_client_works_against_the_ingress(ray_app: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=ray_app + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(1)}},
                                             {"type": "text", "text": "How many shapes are there?"}]}]
    answer = client.chat.completions.create(model="vlmserve-demo", messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content and answer.usage and answer.usage.prompt_tokens > 20
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="vlmserve-demo", messages=messages, max_tokens=8, temperature=0, stream=True) if chunk.choices)
    assert streamed == answer.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["vlmserve-demo"]
    assert httpx.get(ray_app + "/health").status_code == 200


def test_concurrent_requests_spread_over_both_replicas(ray_app: str) -> None:
    before = finished_by_replica(ray_app)

    async def one(client: httpx.AsyncClient, seed: int) -> int:
        body = {"model": "vlmserve-demo", "max_tokens": 24, "ignore_eos": True, "messages": [{"role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image_url(100 + seed)}},
                            {"type": "text", "text": "Describe the image."}]}]}
        return (await client.post("/v1/chat/completions", json=body)).status_code

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=ray_app, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(12)))

    assert asyncio.run(burst()) == [200] * 12
    wait_for(lambda: sum(finished_by_replica(ray_app).values()) >= sum(before.values()) + 12, "counters catch up")
    after = finished_by_replica(ray_app)
    assert all(after[name] > before.get(name, 0) for name in after), (before, after)


def settled_finished(url: str) -> dict[str, int]:
    """Per-replica finished counts once the board stops moving (reports lag the requests by up to ~0.5 s)."""
    previous = finished_by_replica(url)
    while True:
        time.sleep(1.2)
        current = finished_by_replica(url)
        if current == previous:
            return current
        previous = current


def test_a_multi_turn_chat_resending_its_image_stays_on_one_replica_and_hits_its_caches(ray_app: str) -> None:
    url = image_url(7)
    messages: list[dict[str, Any]] = []
    landed: list[str] = []
    start = stats(ray_app)["replicas"]
    seen = settled_finished(ray_app)
    for turn, question in enumerate(["How many shapes are there?", "What color is the circle?",
                                     "Is there a red square?", "Describe the image.", "How many shapes are there?"]):
        messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": question}]})
        answer = httpx.post(ray_app + "/v1/chat/completions", timeout=60, json={
            "model": "vlmserve-demo", "max_tokens": 16, "temperature": 0, "messages": messages}).json()
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        # NOTE: wait for this turn's own count (the board lags), then attribute the one new finish to its replica
        target = sum(seen.values()) + 1
        wait_for(lambda t=target: sum(finished_by_replica(ray_app).values()) >= t, f"turn {turn} is counted")
        now = finished_by_replica(ray_app)
        landed += [name for name in now if now[name] > seen.get(name, 0)]
        seen = now
    assert len(landed) == 5 and len(set(landed)) == 1, landed
    home = stats(ray_app)["replicas"][landed[0]]
    assert home["prefix_cache_hits"] > start[landed[0]]["prefix_cache_hits"]
    assert home["image_cache_hits"] >= start[landed[0]]["image_cache_hits"] + 4  # turns 2-5 re-send the image


def test_killing_a_replica_under_load_leaves_every_client_a_final_status(ray_app: str) -> None:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "EngineReplica" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    assert len(names) == 2
    victim = ray.get_actor(names[0], namespace="serve")

    async def one(client: httpx.AsyncClient, seed: int) -> str:
        body = {"model": "vlmserve-demo", "max_tokens": 200, "ignore_eos": True, "stream": True,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(seed)}},
                                                          {"type": "text", "text": "Describe the image."}]}]}
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    return f"status {response.status_code}"
                text = "".join([line async for line in response.aiter_lines()])
                if '"error"' in text:
                    return "error event"
                return "done" if "[DONE]" in text else "cut"
        except httpx.HTTPError as exc:
            return f"transport {type(exc).__name__}"

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(base_url=ray_app, timeout=120) as client:
            tasks = [asyncio.create_task(one(client, 200 + i)) for i in range(6)]
            await asyncio.sleep(1.5)
            ray.kill(victim, no_restart=False)
            return await asyncio.gather(*tasks)

    outcomes = asyncio.run(scenario())
    assert all(o in ("done", "error event") or o.startswith("status 5") for o in outcomes), outcomes
    assert "done" in outcomes  # the surviving replica's streams completed
    later = httpx.post(ray_app + "/v1/chat/completions", timeout=60, json={
        "model": "vlmserve-demo", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert later.status_code == 200
    wait_for(lambda: len(stats(ray_app).get("replicas", {})) == 2, "Ray replaces the killed replica", 120)
