"""build_app(): the FastAPI application over an `EngineClient`. Routes are thin; the work is in the services."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmserve import __version__
from vlmserve.api import schemas
from vlmserve.api.admission import Admission
from vlmserve.api.errors import classify, error_response
from vlmserve.api.guards import BodyTimeoutMiddleware, HostAllowListMiddleware, JSONContentTypeMiddleware
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
from vlmserve.api.serving_chat import ChatService
from vlmserve.api.serving_models import ModelsService
from vlmserve.api.serving_playground import install_playground, load_assets, public_paths
from vlmserve.api.streaming import guarded
from vlmserve.api.tool_parsers import parser_name_for
from vlmserve.config import Config
from vlmserve.engine.client import EngineClient
from vlmserve.errors import InvalidRequestError, ServiceUnavailableError, VlmserveError
from vlmserve.multimodal.loader import MediaLoader
from vlmserve.multimodal.prompt import PromptRenderer

T = TypeVar("T")


def build_app(engine: EngineClient, renderer: PromptRenderer, media: MediaLoader, config: Config,
              served_model_names: tuple[str, ...], *, grounding_format: str | None = None,
              model_family: str = "unknown") -> FastAPI:
    """The HTTP application. `engine` must be started by the caller's lifespan owner (see `vlmserve.serve`).

    `model_family` (config.json's model_type) picks the tool-call and reasoning parsers unless flags override."""
    admission = Admission(engine, config)
    chat = ChatService(engine, renderer, media, served_model_names=served_model_names, server_config=config.server,
                       model_family=model_family,
                       tool_parser=parser_name_for(model_family, config.model.tool_call_parser),
                       reasoning_parser=reasoning_parser_name_for(model_family, config.model.reasoning_parser),
                       admission=admission)
    models = ModelsService(served_model_names, created=int(time.time()), grounding_format=grounding_format)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await media.aclose()

    app = FastAPI(title="vlmserve", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    _install_error_handlers(app)
    install_openapi(app, requires_api_key=bool(config.server.resolved_api_keys()))

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletion, openapi_extra=body_schema())
    async def create_chat_completion(raw_request: Request) -> Response:
        request = await asyncio.to_thread(_parse_request, await raw_request.body())
        # Preparation (fetching, decoding, rendering) stops when the client goes away.
        generation, summary = await _cancel_on_disconnect(raw_request, chat.prepare(
            request, client_id=client_id(raw_request.scope), api_key_id=raw_request.scope.get("state", {}).get("api_key_id")))
        plan = chat.output_plan(request, generation)
        if config.server.log_requests:
            summary["messages"] = _loggable_messages(request.messages)
        fields = log_fields(raw_request.scope)
        fields.update(summary)  # the line then carries the completion's id (chatcmpl-...)
        if request.stream:
            # Refuse with a status (429/503) while we still can: once streaming starts, only an error event is left.
            # NOTE: a request admitted here can still lose the race for the last slot before its generator runs;
            # it then gets 200 and an SSE error event carrying the same OpenAI error (queue_full).
            engine.check_can_accept(generation.sampling.n)
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            events = _logged(guarded(chat.stream(generation, request.model, include_usage, plan)), fields)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completion = await _cancel_on_disconnect(raw_request, chat.complete(generation, request.model, plan))
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


#: JSON nested deeper than this is refused; OpenAI requests nest a few levels (tool schemas a few dozen)
MAX_JSON_DEPTH = 64


def _parse_request(body: bytes) -> schemas.ChatCompletionRequest:
    """Worker thread: the body parsed and validated (a large body must not hold the event loop)."""
    return schemas.ChatCompletionRequest.model_validate(_parse_json_object(body))


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError("the request body is not valid JSON", param=None) from exc
    except RecursionError:
        raise InvalidRequestError(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels",
                                  param=None) from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise InvalidRequestError("the request body holds a number with too many digits", param=None) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object", param=None)
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise InvalidRequestError(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", param=None)
    return data


def _depth_exceeds(data: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` deep (iterative: deep input cannot overflow the stack here)."""
    level: list[Any] = [data]
    for _ in range(limit):
        level = [child for container in level
                 for child in (container.values() if isinstance(container, dict) else container)
                 if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


async def _cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts the generation) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def client_gone() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(client_gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise ServiceUnavailableError("the client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def _loggable_messages(messages: list[schemas.ChatMessageParam]) -> list[dict[str, Any]]:
    """The conversation for --log-requests, with inline image data replaced by its length (never image bytes)."""
    dumped = [m.model_dump(exclude_none=True) for m in messages]
    for message in dumped:
        for part in message["content"] if isinstance(message.get("content"), list) else ():
            url = part.get("image_url", {}).get("url", "")
            if url.startswith("data:"):
                header = url.split(",", 1)[0]
                part["image_url"]["url"] = f"{header[:64]},<{len(url)} characters>"
    return dumped


async def _logged(events: AsyncIterator[str], fields: dict[str, Any]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    except BaseException:
        fields["status"] = 499  # the client closed the stream (the response itself started as 200)
        raise


__all__ = ["build_app", "classify"]
