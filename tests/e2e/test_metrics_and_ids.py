"""/metrics (parsed with prometheus_client's parser), request ids, the streamed request's log line, offline /docs."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess
from tests.e2e.conftest import DEMO_KEY
from tests.e2e.test_responses_api import image_input
from vlmserve.config import DEMO_MODEL_NAME as MODEL

AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}


def scrape(server: ServerProcess) -> dict[str, float]:
    """Every sample of /metrics by name (+ labels other than model_name)."""
    response = httpx.get(f"{server.base_url}/metrics", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def test_metrics_move_as_requests_run(demo_server: ServerProcess, demo_client: openai.OpenAI) -> None:
    before = scrape(demo_server)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vlmserve:image_embedding_cache_queries_total", "vlmserve:image_embedding_cache_hits_total",
                 "vlmserve:video_embedding_cache_queries_total", "vlmserve:video_embedding_cache_hits_total"):
        assert name in before, name
    completion = demo_client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_input()[0]["content"][0]
                                                                         ["image_url"]}},
                                     {"type": "text", "text": "Describe the image."}]}])
    assert completion.usage is not None
    after = scrape(demo_server)

    def moved(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert moved("vllm:prompt_tokens_total") >= completion.usage.prompt_tokens
    assert moved("vllm:generation_tokens_total") == completion.usage.completion_tokens
    assert moved("vllm:request_prompt_tokens_sum") == completion.usage.prompt_tokens
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vlmserve:request_images_count", "vlmserve:media_fetch_seconds_count",
                 "vlmserve:image_preprocess_seconds_count"):
        assert moved(name) == 1, name
    assert moved("vllm:inter_token_latency_seconds_count") == completion.usage.completion_tokens - 1
    assert moved("vlmserve:request_images_sum") == 1 and moved("vlmserve:request_image_tokens_sum") > 0
    assert moved("vllm:request_success_total{finished_reason=length}") == 1
    assert moved("vlmserve:image_embedding_cache_queries_total") >= 1


@pytest.fixture(scope="module")
def one_at_a_time(start_server: type[ServerProcess]) -> ServerProcess:
    """The demo model running one sequence at a time: a second request waits in the engine's queue."""
    return start_server(["--api-key", DEMO_KEY, "--max-num-seqs", "1"])


def test_queue_time_and_vision_encoder_metrics(one_at_a_time: ServerProcess) -> None:
    server, url = one_at_a_time, f"{one_at_a_time.base_url}/v1/chat/completions"
    long_body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 200,
                 "ignore_eos": True, "temperature": 0, "stream": True}
    image_body = {"model": MODEL, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_input()[0]["content"][0]["image_url"]}},
        {"type": "text", "text": "Describe the image."}]}]}
    before = scrape(server)
    streaming = threading.Event()
    ended_at: list[float] = []

    def long_request() -> None:
        with httpx.stream("POST", url, json=long_body, headers=AUTH, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    streaming.set()
        ended_at.append(time.monotonic())

    runner = threading.Thread(target=long_request)
    runner.start()
    assert streaming.wait(60)
    sent_at = time.monotonic()
    held = httpx.post(url, json=image_body, headers=AUTH, timeout=120)  # waits for the only running slot
    runner.join(120)
    assert held.status_code == 200, held.text
    middle = scrape(server)
    again = httpx.post(url, json=image_body, headers=AUTH, timeout=60)  # its image's embedding is cached now
    assert again.status_code == 200, again.text
    after = scrape(server)

    def moved(name: str, since: dict[str, float] = before, until: dict[str, float] = middle) -> float:
        return until[name] - since.get(name, 0.0)

    assert moved("vllm:request_queue_time_seconds_count") == 2
    # the held request could start only once the long one had ended (give or take the time its last chunk took)
    assert moved("vllm:request_queue_time_seconds_sum") >= 0.5 * (ended_at[0] - sent_at) > 0
    assert moved("vlmserve:vision_encoder_images_total") == 1  # the long request had no image
    assert moved("vlmserve:vision_encoder_seconds_count") == 1
    assert moved("vlmserve:vision_encoder_seconds_sum") > 0
    assert moved("vllm:request_queue_time_seconds_count", middle, after) == 1
    assert moved("vlmserve:vision_encoder_images_total", middle, after) == 0  # not encoded a second time


def test_grammar_compiles_are_counted(demo_server: ServerProcess, demo_client: openai.OpenAI) -> None:
    before = scrape(demo_server)
    schema = {"type": "object", "properties": {"metrics_test": {"type": "integer"}}, "required": ["metrics_test"]}
    demo_client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi"}],
                                        response_format={"type": "json_schema", "json_schema": {
                                            "name": "m", "schema": schema}})
    after = scrape(demo_server)
    assert after["vlmserve:grammar_compiles_total"] == before["vlmserve:grammar_compiles_total"] + 1
    assert after["vlmserve:grammar_compile_seconds_total"] > before["vlmserve:grammar_compile_seconds_total"]


def test_media_failures_are_counted_by_reason(demo_server: ServerProcess, demo_client: openai.OpenAI) -> None:
    before = scrape(demo_server).get("vlmserve:media_fetch_failures_total{reason=invalid_image}", 0.0)
    try:
        demo_client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}])
    except openai.BadRequestError as exc:
        assert exc.code == "invalid_image"
    else:
        raise AssertionError("an undecodable image was accepted")
    assert scrape(demo_server)["vlmserve:media_fetch_failures_total{reason=invalid_image}"] == before + 1


def test_metrics_need_the_key_and_docs_load_offline(demo_server: ServerProcess) -> None:
    assert httpx.get(f"{demo_server.base_url}/metrics").status_code == 401
    page = httpx.get(f"{demo_server.base_url}/docs", headers=AUTH)
    assert page.status_code == 200 and "https://" not in page.text.split("<body>")[0]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert httpx.get(f"{demo_server.base_url}/docs/assets/{asset}", headers=AUTH).status_code == 200
    paths = httpx.get(f"{demo_server.base_url}/openapi.json", headers=AUTH).json()["paths"]
    assert {"/v1/responses", "/v1/completions", "/v1/tokenize", "/v1/detokenize", "/metrics"} <= set(paths)


def log_line(server: ServerProcess, marker: str, timeout_s: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [line for line in server.log().splitlines() if "vlmserve.requests: request {" in line
                 and marker in line]
        if lines or time.monotonic() > deadline:
            assert lines, f"no log line with {marker}"
            return dict(json.loads(lines[-1].split("request ", 1)[1]))
        time.sleep(0.1)


def test_request_ids_are_honoured_and_streams_are_logged_when_they_end(demo_server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "stream": True,
            "temperature": 0}
    response = httpx.post(f"{demo_server.base_url}/v1/chat/completions", json=body,
                          headers={**AUTH, "X-Request-Id": "trace-42.abc:1"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42.abc:1"
    line = log_line(demo_server, "trace-42.abc:1")
    assert line["status"] == 200 and line["completion_tokens"] == 6
    assert line["response_id"].startswith("chatcmpl-")
    for insane in ("x" * 200, "bad id", "<script>"):
        echoed = httpx.get(f"{demo_server.base_url}/v1/models", headers={**AUTH, "X-Request-Id": insane})
        assert echoed.headers["x-request-id"].startswith("req-")
