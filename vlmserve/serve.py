"""`vlmserve serve`: load the model, start the engine, run the HTTP server, exit with a meaningful status.

Exit status: 0 after a clean shutdown (SIGINT/SIGTERM), 1 when the engine died (so a supervisor restarts us),
2 when start-up failed (bad configuration, model not loadable).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmserve.config import Config
from vlmserve.engine.client import AsyncEngine, EngineClient
from vlmserve.engine.protocol import EngineCore
from vlmserve.engine.text_policy import TextPolicy
from vlmserve.errors import VlmserveError
from vlmserve.models.base import ModelAdapter
from vlmserve.types import PreparedPrompt

logger = logging.getLogger("vlmserve")


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def make_engine_core(adapter: ModelAdapter, config: Config) -> EngineCore:
    """The paged core where the architecture supports it (or it was asked for), else the generate core."""
    from vlmserve.engine.generate_core import GenerateEngineCore

    choice = config.engine.engine
    reason = adapter.paged_support()
    if choice == "generate":
        logger.info("engine: generate (batched model.generate), as requested with --engine generate")
        return GenerateEngineCore(adapter, config.engine)
    if config.engine.tensor_parallel_size > 1:
        if reason is not None:
            from vlmserve.errors import TensorParallelError

            raise TensorParallelError(f"--tensor-parallel-size needs the paged engine, and {adapter.family} cannot "
                                      f"run on it: {reason}")
        # NOTE: the self-check runs the model's own generate on rank 0 alone, which a sharded decoder cannot
        # (its all-reduces need every rank); the TP tests compare TP=N with TP=1 through the engine instead.
        logger.info("paged self-check skipped under --tensor-parallel-size %d", config.engine.tensor_parallel_size)
    elif reason is None:
        reason = _paged_self_check(adapter, config)
    if reason is None:
        from vlmserve.engine.core import PagedEngineCore

        logger.info("engine: paged (continuous batching over a paged KV cache)")
        return PagedEngineCore(adapter, config.engine)
    if choice == "paged":
        raise SystemExit(f"--engine paged: {adapter.family} cannot run on the paged engine: {reason}")
    logger.warning("engine: generate fallback for %s: %s", adapter.family, reason)
    return GenerateEngineCore(adapter, config.engine)


def _paged_self_check(adapter: ModelAdapter, config: Config) -> str | None:
    """None when the paged engine reproduces the model's own generate on a short image prompt; else why not."""
    from vlmserve.engine.paged_check import NUM_CHECK_TOKENS, check_paged_engine

    if not config.engine.enable_paged_self_check:
        logger.warning("paged self-check skipped (--no-enable-paged-self-check)")
        return None
    prompt = self_check_prompt(adapter, max_tokens=adapter.max_model_len - NUM_CHECK_TOKENS)
    if prompt is None:
        return (f"no self-check prompt fits the {adapter.max_model_len}-token context (--max-model-len), so the "
                "paged engine could not be checked against this model")
    try:
        result = check_paged_engine(adapter, prompt, config.engine)
    except Exception as exc:  # the reference generate failed: fail closed for the paged engine, say why
        logger.debug("paged self-check failed", exc_info=exc)
        return f"the paged self-check could not run ({type(exc).__name__}: {exc})"
    logger.info("paged self-check: %d positions, %d prompt tokens, largest logprob difference %.3g, %.2fs%s",
                result.num_positions, prompt.num_tokens, result.max_error, result.seconds,
                "" if result.reason is None else " — FAILED")
    return result.reason


def self_check_prompt(adapter: ModelAdapter, *, max_tokens: int | None = None) -> PreparedPrompt | None:
    """A short prompt for the paged self-check, through the model's own template and processor: a few words and
    two small generated images — fewer where the model takes fewer, or where the prompt would exceed
    `max_tokens`; None if not even a text-only prompt fits (or renders)."""
    from PIL import Image

    from vlmserve.multimodal.decode import image_hash
    from vlmserve.multimodal.prompt import PromptRenderer
    from vlmserve.types import ChatMessage, ImagePart, TextPart

    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=2**31, max_images_per_prompt=adapter.max_images_per_prompt)
    images = []
    for index in range(0 if adapter.image_token_id is None else min(2, adapter.max_images_per_prompt or 2)):
        gradient = Image.linear_gradient("L").resize((64 - 16 * index, 48 + 16 * index))
        flipped = gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = Image.merge("RGB", (gradient, gradient.rotate(90 * (index + 1)), flipped))
        images.append(ImagePart(image, image_hash(image)))
    while True:
        try:
            prompt = renderer.render([ChatMessage("user", (*images, TextPart("What is in these pictures?")))])
        except VlmserveError:  # e.g. a model that needs an image in every prompt, asked without one
            prompt = None
        if prompt is not None and (max_tokens is None or prompt.num_tokens <= max_tokens):
            return prompt
        if not images:
            return None
        images.pop()


def placeholder_token_ids(adapter: ModelAdapter) -> frozenset[int]:
    """Token ids that stand for image or video features: the image token and the config's video token."""
    config = getattr(adapter.model, "config", None)
    candidates = [adapter.image_token_id, *(getattr(config, name, None) for name in ("video_token_id",
                                                                                       "video_token_index"))]
    return frozenset(t for t in candidates if isinstance(t, int) and t >= 0)


def load_for_serving(config: Config) -> tuple[ModelAdapter, Callable[[], None]]:
    """The model, and what to call once the engine has stopped: with --tensor-parallel-size N > 1, rank 0's shard
    (the workers are started here and stopped by the returned call)."""
    if config.engine.tensor_parallel_size > 1:
        from vlmserve.engine.parallel.launch import start

        adapter, workers = start(config)
        return adapter, workers.stop
    from vlmserve.errors import ModelLoadError
    from vlmserve.models.loader import load_model

    if config.model.load_format == "dummy":
        raise ModelLoadError("--load-format dummy works with --tensor-parallel-size > 1 only (the shard loader)")
    return load_model(config.model), _nothing


def _nothing() -> None:
    return None


def run(config: Config) -> int:
    """Serve until stopped; returns the process exit status."""
    from vlmserve.errors import ModelLoadError

    try:
        adapter, release = load_for_serving(config)
    except ModelLoadError as exc:
        logger.error("cannot start: %s", exc.message)
        return 2
    try:
        return asyncio.run(_serve(adapter, config))
    except ModelLoadError as exc:  # e.g. a family the paged engine refuses, under --tensor-parallel-size
        logger.error("cannot start: %s", exc.message)
        return 2
    finally:
        release()


class _GracefulServer:
    """uvicorn with our SIGTERM/SIGINT: refuse new requests (503), let running ones finish for up to
    `--shutdown-timeout-s`, end the rest with finish_reason "abort", then exit. A second signal exits at once."""

    def __init__(self, server: Any, engine: AsyncEngine, timeout_s: float) -> None:
        self.server = server
        self._engine = engine
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._drain_task: asyncio.Task[None] | None = None
        server.handle_exit = self.handle_exit

    def handle_exit(self, sig: int, frame: object) -> None:
        # Runs in a signal handler: hand over to the event loop.
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        if self._drain_task is not None or self.server.should_exit:
            self.server.should_exit = True
            self.server.force_exit = True
            return
        logger.info("shutting down: refusing new requests, waiting up to %.0fs for running ones",
                    self._timeout_s)
        self._drain_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        await self._engine.shutdown(self._timeout_s)
        await asyncio.sleep(0.2)  # let the final chunks of aborted streams reach their clients
        self.server.should_exit = True


def build_engine(adapter: ModelAdapter, config: Config) -> AsyncEngine:
    """The engine for a loaded model, not started yet (it starts on the event loop that will serve it)."""
    engine_cfg = config.engine
    core = make_engine_core(adapter, config)
    return AsyncEngine(core, adapter.tokenizer, max_model_len=core.max_model_len,
                       max_sequences=engine_cfg.max_num_seqs + engine_cfg.max_waiting_requests,
                       placeholder_token_ids=placeholder_token_ids(adapter),
                       text_policy=TextPolicy.from_tokenizer(adapter.tokenizer,
                                                             strip_whitespace=adapter.strip_answer_whitespace))


@dataclass
class PromptKit:
    """What the HTTP front needs of a loaded model to render prompts, and nothing of its weights.

    Picklable: a Ray ingress (vlmserve.ray) gets it from an engine replica instead of loading the model itself.
    """

    processor: Any
    image_token_id: int | None
    max_images_per_prompt: int | None
    family: str
    max_model_len: int
    video_token_id: int | None = None

    @classmethod
    def of(cls, adapter: ModelAdapter, max_model_len: int) -> PromptKit:
        return cls(adapter.processor, adapter.image_token_id, adapter.max_images_per_prompt, adapter.family,
                   max_model_len, adapter.video_token_id)


def build_frontend(engine: EngineClient, kit: PromptKit, config: Config) -> Any:
    """The HTTP application over any `EngineClient`: one code path for `vlmserve serve` and the Ray ingress."""
    from vlmserve.api.app import build_app
    from vlmserve.grounding import format_for_family
    from vlmserve.multimodal.loader import MediaLoader
    from vlmserve.multimodal.prompt import PromptRenderer

    renderer = PromptRenderer(kit.processor, image_token_id=kit.image_token_id, max_model_len=kit.max_model_len,
                              max_images_per_prompt=kit.max_images_per_prompt, video_token_id=kit.video_token_id,
                              model_family=kit.family)
    return build_app(engine, renderer, MediaLoader(config.media), config, config.model.default_served_names(),
                     grounding_format=format_for_family(kit.family), model_family=kit.family)


def build_service(adapter: ModelAdapter, config: Config) -> tuple[Any, AsyncEngine]:
    """The HTTP application and its engine for a loaded model (the engine still has to be started)."""
    engine = build_engine(adapter, config)
    return build_frontend(engine, PromptKit.of(adapter, engine.max_model_len), config), engine


def log_playground_link(config: Config) -> None:
    """The start-up line with the playground's address (a browser can open it), unless --no-playground."""
    if not config.server.enable_playground:
        return
    host = config.server.host
    # listening on every interface means this machine is reachable at 127.0.0.1
    browsable = "127.0.0.1" if host in ("0.0.0.0", "", "::") else f"[{host}]" if ":" in host else host
    logger.info("playground: http://%s:%d/playground (turn it off with --no-playground)", browsable,
                config.server.port)


async def _serve(adapter: ModelAdapter, config: Config) -> int:
    import uvicorn

    from vlmserve.http_server import uvicorn_config

    app, engine = build_service(adapter, config)
    names = config.model.default_served_names()
    server = uvicorn.Server(uvicorn_config(app, config.server))
    _GracefulServer(server, engine, config.server.shutdown_timeout_s)
    engine.start()
    exit_code = 0

    async def watch_engine() -> None:
        nonlocal exit_code
        await engine.dead.wait()
        logger.error("the engine died; shutting down so a supervisor can restart the server")
        exit_code = 1
        server.should_exit = True

    watcher = asyncio.create_task(watch_engine())
    logger.info("serving %s at http://%s:%d/v1 (model name%s: %s)", adapter.family, config.server.host,
                config.server.port, "s" if len(names) > 1 else "", ", ".join(names))
    log_playground_link(config)
    try:
        await server.serve()
    finally:
        watcher.cancel()
        await engine.shutdown(0)
    if exit_code == 0 and not server.started:
        return 2  # could not bind the port, for example
    return exit_code


__all__ = ["build_service", "configure_logging", "load_for_serving", "log_playground_link", "make_engine_core",
           "run"]
