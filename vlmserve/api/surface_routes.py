"""Routes beside chat: the Responses API, completions, tokenize/detokenize, /metrics and the offline /docs.

Each route parses its own JSON body (as the chat route does: our error shapes and the body cap), asks its service,
and for streams hands the service's events to `sse_response`, which records the outcome in the request's log line.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from vlmserve.api.metrics import CONTENT_TYPE, ServerMetrics
from vlmserve.api.middleware import client_id, log_fields
from vlmserve.api.openapi import body_schema_of
from vlmserve.api.schemas_completions import Completion, CompletionRequest
from vlmserve.api.schemas_responses import ResponseCreateRequest
from vlmserve.api.schemas_tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from vlmserve.api.serving_completions import CompletionsService
from vlmserve.api.serving_responses import ResponsesService
from vlmserve.api.serving_tokenize import TokenizeService
from vlmserve.api.transport import cancel_on_disconnect, json_body, sse_response


def install_responses_routes(app: FastAPI, responses: ResponsesService) -> None:
    @app.post("/v1/responses", openapi_extra=body_schema_of(ResponseCreateRequest),
              responses={200: {"description": "A Response object, or with stream: true its server-sent events"}})
    async def create_response(raw_request: Request) -> Response:
        request = ResponseCreateRequest.model_validate(await json_body(raw_request))
        prepared = await responses.prepare(request)
        fields = log_fields(raw_request.scope)
        fields.update(prepared.summary)
        if request.stream:
            events, writer = responses.stream(prepared)
            return sse_response(events, fields, writer.failure)
        body = await cancel_on_disconnect(raw_request, responses.create(prepared))
        fields["completion_tokens"] = prepared.state.output_tokens
        return JSONResponse(body)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> JSONResponse:
        return JSONResponse(responses.get(response_id))

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> JSONResponse:
        return JSONResponse(responses.delete(response_id))

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str) -> JSONResponse:
        return JSONResponse(responses.cancel(response_id))


def install_completions_routes(app: FastAPI, completions: CompletionsService) -> None:
    @app.post("/v1/completions", response_model=Completion, openapi_extra=body_schema_of(CompletionRequest))
    async def create_completion(raw_request: Request) -> Response:
        request = CompletionRequest.model_validate(await json_body(raw_request))
        prepared = await completions.prepare(request, client_id=client_id(raw_request.scope),
                                             api_key_id=raw_request.scope.get("state", {}).get("api_key_id"))
        fields = log_fields(raw_request.scope)
        fields.update(request_id=prepared.completion_id, n=request.n,
                      prompt_tokens=sum(g.prompt.num_tokens for g in prepared.generations))
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return sse_response(completions.stream(prepared, request.model, include_usage, fields), fields)
        completion = await cancel_on_disconnect(raw_request, completions.complete(prepared, request.model))
        fields["completion_tokens"] = completion.usage.completion_tokens if completion.usage else 0
        return JSONResponse(completion.model_dump(mode="json"))


def install_tokenize_routes(app: FastAPI, tokenize: TokenizeService) -> None:
    async def tokenize_route(raw_request: Request) -> TokenizeResponse:
        return await tokenize.tokenize(TokenizeRequest.model_validate(await json_body(raw_request)))

    async def detokenize_route(raw_request: Request) -> DetokenizeResponse:
        return tokenize.detokenize(DetokenizeRequest.model_validate(await json_body(raw_request)))

    for prefix, documented in (("/v1", True), ("", False)):  # vLLM serves them at the root
        app.add_api_route(f"{prefix}/tokenize", tokenize_route, methods=["POST"], response_model=TokenizeResponse,
                          openapi_extra=body_schema_of(TokenizeRequest), include_in_schema=documented)
        app.add_api_route(f"{prefix}/detokenize", detokenize_route, methods=["POST"],
                          response_model=DetokenizeResponse, openapi_extra=body_schema_of(DetokenizeRequest),
                          include_in_schema=documented)


def install_metrics_route(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition"}})
    async def metrics_route() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)


def install_docs(app: FastAPI) -> bool:
    """Swagger UI at /docs from the assets of the `swagger-ui-bundle` package; False (no /docs) without it."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return False
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    return True


__all__: list[Any] = ["install_completions_routes", "install_docs", "install_metrics_route",
                      "install_responses_routes", "install_tokenize_routes"]
