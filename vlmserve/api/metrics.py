"""Prometheus metrics: the one module that owns the registry.

Names follow vLLM's (`vllm:*`), so dashboards built for vLLM work unchanged; what vLLM has no name for (images,
media intake) is `vlmserve:*`. Three sources feed them, none inside the engine's hot loop:

- engine counters and gauges are read from `EngineClient.stats()` when /metrics is scraped (`_EngineCollector`);
- per-request histograms are observed by `MeteredEngine`, a wrapper of the engine client the API holds, from the
  timing of the deltas it passes on (TTFT, inter-token latency, end-to-end, tokens, images) and from the timings
  the engine core measured and put on a sequence's first delta (`TokenDelta.timings`: queue time, vision tower);
- media intake is timed by `MeteredMediaLoader` / `MeteredRenderer`, wrappers of what the chat service calls.

vLLM has no name for the vision tower's time: it is `vlmserve:vision_encoder_seconds`, per sequence whose images
ran through the tower (images found in the embedding cache cost none and are not counted). Queue time and tower
time are per sequence (n > 1 observes n queue times; the siblings' one shared encoding is reported on one of them).
Grammar compile time is a pair of counters (compiles, seconds), not a histogram: the grammar engine keeps totals.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vlmserve.engine.client import EngineClient
from vlmserve.errors import MediaError
from vlmserve.multimodal.loader import ImageRef, MediaLoader
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import (
    ChatMessage,
    GenerationRequest,
    ImagePart,
    PreparedPrompt,
    RequestTimings,
    TokenDelta,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_IMAGE_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
_MEDIA_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """The registry of one server and the metrics the API layer observes."""

    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Any:
            return Histogram(name, doc, labels, buckets=tuple(buckets), registry=self.registry).labels(model_name)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.",
                              _LATENCY_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", _LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End to end request latency in seconds.",
                             _LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per request (image "
                                               "tokens included).", _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens", "Generated tokens per "
                                                   "request (all n choices).", _TOKEN_BUCKETS)
        self.request_success = Counter("vllm:request_success", "Requests that finished, by finish reason.",
                                       [*labels, "finished_reason"], registry=self.registry)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING "
                                    "phase for request (engine queue to first schedule).", _LATENCY_BUCKETS)
        self.vision_encoder_seconds = histogram(
            "vlmserve:vision_encoder_seconds", "Seconds the vision tower spent encoding a sequence's images (its "
            "share of a batched tower call, by image count); sequences whose images were encoded only.",
            _MEDIA_BUCKETS)
        self.vision_encoder_images = Counter("vlmserve:vision_encoder_images", "Images encoded by the vision "
                                             "tower (embedding-cache hits excluded).", labels,
                                             registry=self.registry).labels(model_name)
        self.images_per_request = histogram("vlmserve:request_images", "Images per request.", _IMAGE_BUCKETS)
        self.image_tokens_per_request = histogram("vlmserve:request_image_tokens", "Image tokens per request.",
                                                  _TOKEN_BUCKETS)
        self.media_fetch_seconds = histogram("vlmserve:media_fetch_seconds", "Seconds to fetch and decode a "
                                             "request's images (requests with images only).", _MEDIA_BUCKETS)
        self.media_fetch_failures = Counter("vlmserve:media_fetch_failures", "Requests whose images could not be "
                                            "fetched or decoded, by reason (the error code sent).",
                                            [*labels, "reason"], registry=self.registry)
        self.image_preprocess_seconds = histogram(
            "vlmserve:image_preprocess_seconds", "Seconds to render a prompt with images through the model's "
            "template and processor (image resizing, patching, normalisation).", _MEDIA_BUCKETS)
        self.registry.register(_EngineCollector(engine, model_name))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Reads the engine's counters at scrape time (the engine keeps plain integers; no metric code inside it)."""

    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def collect(self) -> Iterable[Metric]:
        stats = self._engine.stats()
        name = self._model_name

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, doc, labels=["model_name"])
            family.add_metric([name], value)
            return family

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(metric, doc, labels=["model_name"])
            family.add_metric([name], value)
            return family

        total = stats.num_kv_blocks_total
        usage = (total - stats.num_kv_blocks_free) / total if total else 0.0
        yield gauge("vllm:num_requests_running", "Sequences in model execution batches.", stats.num_running)
        yield gauge("vllm:num_requests_waiting", "Sequences waiting to be scheduled.", stats.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage: fraction of blocks in use (1 = 100%).", usage)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        yield counter("vllm:prompt_tokens", "Prefill tokens processed.", stats.num_prompt_tokens)
        yield counter("vllm:generation_tokens", "Generation tokens processed.", stats.num_generated_tokens)
        yield counter("vllm:num_preemptions", "Preemptions by the scheduler.", stats.num_preemptions)
        yield counter("vlmserve:image_embedding_cache_queries", "Image embeddings looked up in the image cache.",
                      stats.image_cache_hits + stats.image_cache_misses)
        yield counter("vlmserve:image_embedding_cache_hits", "Image embeddings found in the image cache.",
                      stats.image_cache_hits)
        yield counter("vlmserve:video_embedding_cache_queries", "Video embeddings looked up in the embedding cache.",
                      stats.video_cache_hits + stats.video_cache_misses)
        yield counter("vlmserve:video_embedding_cache_hits", "Video embeddings found in the embedding cache.",
                      stats.video_cache_hits)
        yield counter("vlmserve:grammar_compiles", "Structured-output grammars compiled (cache misses).",
                      stats.num_grammars_compiled)
        yield counter("vlmserve:grammar_compile_seconds", "Seconds spent compiling structured-output grammars.",
                      stats.grammar_compile_seconds)


class MeteredEngine:
    """The engine client with per-request histograms observed on the way through; everything else delegates."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics) -> None:
        self._engine = engine
        self._metrics = metrics
        self.max_model_len = engine.max_model_len

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    @property
    def is_dead(self) -> bool:
        return self._engine.is_dead

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        started = time.monotonic()
        deltas = self._engine.generate(request)  # raises here for what needs no generation: not a request served
        return self._observe(request, deltas, started)

    async def _observe(self, request: GenerationRequest, deltas: AsyncIterator[TokenDelta],
                       started: float) -> AsyncIterator[TokenDelta]:
        m = self._metrics
        last_token_at: dict[int, float] = {}
        generated: dict[int, int] = {}
        try:
            async for delta in deltas:
                now = time.monotonic()
                if delta.token_ids:
                    previous = last_token_at.get(delta.index)
                    if previous is None:
                        m.ttft.observe(now - started)
                    else:
                        # NOTE: deltas may carry several tokens; each gets the mean gap, as vLLM's ITL does per step
                        gap = (now - previous) / len(delta.token_ids)
                        for _ in delta.token_ids:
                            m.itl.observe(gap)
                    last_token_at[delta.index] = now
                if delta.timings is not None:
                    self._observe_timings(delta.timings)
                generated[delta.index] = delta.num_generated_tokens
                if delta.finish_reason is not None:
                    m.request_success.labels(m.model_name, delta.finish_reason.value).inc()
                yield delta
        finally:
            # a consumer that stops early (a cancelled response) must free the generation now, not at GC
            await deltas.aclose()  # type: ignore[attr-defined]
        prompt = request.prompt
        m.e2e.observe(time.monotonic() - started)
        m.request_prompt_tokens.observe(prompt.num_tokens)
        m.request_generation_tokens.observe(sum(generated.values()))
        m.images_per_request.observe(len(prompt.image_hashes))
        m.image_tokens_per_request.observe(prompt.num_image_tokens)


    def _observe_timings(self, timings: RequestTimings) -> None:
        self._metrics.queue_time.observe(timings.queue_time_s)
        if timings.num_images_encoded:
            self._metrics.vision_encoder_seconds.observe(timings.vision_encoder_s)
            self._metrics.vision_encoder_images.inc(timings.num_images_encoded)


class MeteredMediaLoader:
    """The media loader, timed, with failures counted by the error code the client receives."""

    def __init__(self, loader: MediaLoader, metrics: ServerMetrics) -> None:
        self._loader = loader
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    async def load(self, refs: list[ImageRef]) -> list[ImagePart]:
        if not refs:
            return await self._loader.load(refs)
        started = time.monotonic()
        try:
            parts = await self._loader.load(refs)
        except MediaError as exc:
            self._metrics.media_fetch_failures.labels(self._metrics.model_name, exc.code or "media_error").inc()
            raise
        self._metrics.media_fetch_seconds.observe(time.monotonic() - started)
        return parts


class MeteredRenderer:
    """The prompt renderer, timed for prompts that carry images (their cost is mostly image preprocessing)."""

    def __init__(self, renderer: PromptRenderer, metrics: ServerMetrics) -> None:
        self._renderer = renderer
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._renderer, name)

    def render(self, messages: list[ChatMessage], **options: Any) -> PreparedPrompt:
        started = time.monotonic()
        prompt = self._renderer.render(messages, **options)  # chat_template, tools, template_kwargs: as given
        if prompt.image_hashes:
            self._metrics.image_preprocess_seconds.observe(time.monotonic() - started)
        return prompt
