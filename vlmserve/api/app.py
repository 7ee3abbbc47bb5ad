"""build_app(): the FastAPI application over an `EngineClient`. Routes are thin; the work is in the services."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmserve import __version__
from vlmserve.api import schemas
from vlmserve.api.admission import Admission
from vlmserve.api.errors import classify, error_response
from vlmserve.api.guards import BodyTimeoutMiddleware, HostAllowListMiddleware, JSONContentTypeMiddleware
from vlmserve.api.metrics import MeteredEngine, MeteredMediaLoader, MeteredRenderer, ServerMetrics
from vlmserve.api.middleware import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    OpenAICORSMiddleware,
    RequestLogMiddleware,
    client_id,
    log_fields,
)
from vlmserve.api.openapi import body_schema, install_openapi
from vlmserve.api.reasoning import reasoning_parser_name_for
from vlmserve.api.responses_store import MemoryResponseStore
from vlmserve.api.serving_chat import ChatService
from vlmserve.api.serving_completions import CompletionsService
from vlmserve.api.serving_models import ModelsService
from vlmserve.api.serving_playground import install_playground, load_assets, public_paths
from vlmserve.api.serving_responses import ResponsesService
from vlmserve.api.serving_tokenize import TokenizeService
from vlmserve.api.surface_routes import (
    install_completions_routes,
    install_docs,
    install_metrics_route,
    install_responses_routes,
    install_tokenize_routes,
)
from vlmserve.api.tool_parsers import parser_name_for
from vlmserve.api.transport import cancel_on_disconnect, parse_json_object, sse_response
from vlmserve.config import Config
from vlmserve.engine.client import EngineClient
from vlmserve.errors import VlmserveError
from vlmserve.multimodal.loader import MediaLoader
from vlmserve.multimodal.prompt import PromptRenderer


def build_app(engine: EngineClient, renderer: PromptRenderer, media: MediaLoader, config: Config,
              served_model_names: tuple[str, ...], *, grounding_format: str | None = None,
              model_family: str = "unknown") -> FastAPI:
    """The HTTP application. `engine` must be started by the caller's lifespan owner (see `vlmserve.serve`).

    `model_family` (config.json's model_type) picks the tool-call and reasoning parsers unless flags override."""
    metrics = ServerMetrics(engine, served_model_names[0])
    metered = MeteredEngine(engine, metrics)
    admission = Admission(engine, config)
    chat = ChatService(metered, cast(PromptRenderer, MeteredRenderer(renderer, metrics)),
                       cast(MediaLoader, MeteredMediaLoader(media, metrics)), served_model_names=served_model_names,
                       server_config=config.server, model_family=model_family,
                       tool_parser=parser_name_for(model_family, config.model.tool_call_parser),
                       reasoning_parser=reasoning_parser_name_for(model_family, config.model.reasoning_parser),
                       admission=admission)
    models = ModelsService(served_model_names, created=int(time.time()), grounding_format=grounding_format)
    server_cfg = config.server
    store = MemoryResponseStore(max_entries=server_cfg.responses_store_max_entries,
                                max_bytes=server_cfg.responses_store_max_bytes, ttl_s=server_cfg.responses_store_ttl_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await media.aclose()

    # /docs is ours (bundled Swagger UI assets; FastAPI's default loads them from a CDN); ReDoc has no bundle
    app = FastAPI(title="vlmserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    _install_error_handlers(app)
    install_openapi(app, requires_api_key=bool(config.server.resolved_api_keys()))
    install_responses_routes(app, ResponsesService(chat, metered, store))
    install_completions_routes(app, CompletionsService(metered, renderer,
                                                       served_model_names=served_model_names,
                                                       server_config=config.server))
    install_tokenize_routes(app, TokenizeService(chat, renderer, max_model_len=engine.max_model_len,
                                                 served_model_names=served_model_names))
    install_metrics_route(app, metrics)
    if config.server.enable_docs:
        install_docs(app)

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletion, openapi_extra=body_schema())
    async def create_chat_completion(raw_request: Request) -> Response:
        request = await asyncio.to_thread(_parse_request, await raw_request.body())
        # Preparation (fetching, decoding, rendering) stops when the client goes away.
        generation, summary = await cancel_on_disconnect(raw_request, chat.prepare(
            request, client_id=client_id(raw_request.scope), api_key_id=raw_request.scope.get("state", {}).get("api_key_id")))
        plan = chat.output_plan(request, generation)
        if config.server.log_requests:
            summary["messages"] = _loggable_messages(request.messages)
        fields = log_fields(raw_request.scope)
        fields.update(summary)  # the line then carries the completion's id (chatcmpl-...)
        if request.stream:
            # chat.stream() starts the generation at the call: what needs no generation (context, a full queue, a
            # dead engine) raises here and gets its status, never a 200 followed by an error event
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return sse_response(chat.stream(generation, request.model, include_usage, plan, progress=fields), fields)
        completion = await cancel_on_disconnect(raw_request, chat.complete(generation, request.model, plan))
        fields["completion_tokens"] = completion.usage.completion_tokens
        return JSONResponse(completion.model_dump(mode="json"))

    @app.get("/v1/models", response_model=schemas.ModelList)
    async def list_models() -> schemas.ModelList:
        return models.list()

    @app.get("/v1/models/{model_id:path}", response_model=schemas.ModelCard)
    async def get_model(model_id: str) -> schemas.ModelCard:
        return models.get(model_id)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_dead:
            return JSONResponse({"status": "engine_dead"}, status_code=503)
        if getattr(engine, "is_accepting", True) is False:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    # HEAD too (some load balancers probe with it); kept out of the schema to avoid a duplicate operation id.
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        snapshot = engine.stats()
        body = {**asdict(snapshot), "prefix_cache_hit_rate": snapshot.prefix_cache_hit_rate}
        by_replica = getattr(engine, "stats_by_replica", None)  # engines spread over replicas (vlmserve.ray)
        if by_replica is not None:
            body["replicas"] = {name: asdict(stats) for name, stats in by_replica().items()}
        return body

    open_paths: frozenset[str] = frozenset()
    if config.server.enable_playground:
        assets = load_assets()
        install_playground(app, assets)
        open_paths = public_paths(assets)
    return _wrap_middleware(app, config, open_paths)


def _wrap_middleware(app: FastAPI, config: Config, open_paths: frozenset[str]) -> FastAPI:
    server = config.server
    # Added innermost first: the body deadline and cap run after authentication and the media-type check, CORS and
    # the Host check outside them so preflights succeed and rebound names learn nothing.
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=server.body_timeout_s)
    app.add_middleware(BodyLimitMiddleware, max_bytes=server.max_request_bytes)
    app.add_middleware(JSONContentTypeMiddleware)
    app.add_middleware(APIKeyMiddleware, keys=server.resolved_api_keys(), public_paths=open_paths)
    if server.allowed_origins:
        app.add_middleware(OpenAICORSMiddleware, allow_origins=list(server.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(HostAllowListMiddleware, allowed=server.resolved_allowed_hosts(), port=server.port)
    app.add_middleware(RequestLogMiddleware)  # outermost: every request gets its line, whoever answers it
    return app


def _install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> Response:
        response = error_response(exc)
        body = json.loads(bytes(response.body))["error"]
        log_fields(request.scope).update(code=body["code"], param=body["param"])
        return response

    for exc_type in (VlmserveError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle)
    from pydantic import ValidationError

    app.add_exception_handler(ValidationError, handle)


def _parse_request(body: bytes) -> schemas.ChatCompletionRequest:
    """Worker thread: the body parsed and validated (a large body must not hold the event loop)."""
    return schemas.ChatCompletionRequest.model_validate(parse_json_object(body))


def _loggable_messages(messages: list[schemas.ChatMessageParam]) -> list[dict[str, Any]]:
    """The conversation for --log-requests, with inline image and video data replaced by its length (never the
    media bytes)."""
    dumped = [m.model_dump(exclude_none=True) for m in messages]
    for message in dumped:
        for part in message["content"] if isinstance(message.get("content"), list) else ():
            for kind in ("image_url", "video_url"):
                url = part.get(kind, {}).get("url", "")
                if url.startswith("data:"):
                    header = url.split(",", 1)[0]
                    part[kind]["url"] = f"{header[:64]},<{len(url)} characters>"
    return dumped


__all__ = ["build_app", "classify"]
