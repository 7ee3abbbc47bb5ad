"""The OpenAPI document: what FastAPI derives, corrected to say what the server really accepts and answers.

The chat route parses its body itself (to control errors and the body cap), so its request schema is declared
here. Pydantic's JSON schema cannot express the cross-field rules of message content (a text part needs `text`,
only user turns may carry images, only assistant turns may omit content), so those two components are written
out by hand; every error the server sends is declared as an OpenAI `ErrorResponse` instead of FastAPI's 422.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from vlmserve.api import schemas

REF_TEMPLATE = "#/components/schemas/{model}"

#: statuses every authenticated operation may answer, with the reason shown in the document
_ERRORS = {
    "400": "Invalid request (the error's param names the field)",
    "401": "Missing or wrong API key",
    "404": "Unknown model or route",
    "413": "Request body larger than --max-request-bytes",
    "429": "Queue full; retry after the Retry-After header's seconds",
    "500": "Server failure (details only in the server log)",
    "503": "Shutting down, or the engine died",
}
_OPEN_PATHS = ("/health",)
#: request models of routes that parse their own bodies; their nested definitions join the components
_BODY_MODELS: list[type[BaseModel]] = []
_SSE_EVENT = {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "A ChatCompletionChunk as JSON (or an ErrorResponse "
                                                             "if the request failed mid-stream), then [DONE]"}}}


def body_schema() -> dict[str, Any]:
    """`openapi_extra` for the chat route: its JSON body."""
    return body_schema_of(schemas.ChatCompletionRequest)


def body_schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that parses its own JSON body as `model` (its definitions are added to the
    document's components by `build_document`)."""
    _BODY_MODELS.append(model)
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def install_openapi(app: FastAPI, *, requires_api_key: bool) -> None:
    """Replace `app.openapi` with a builder of the corrected document (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app, requires_api_key=requires_api_key)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_document(app: FastAPI, *, requires_api_key: bool) -> dict[str, Any]:
    from fastapi.openapi.utils import get_openapi

    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = document.setdefault("components", {}).setdefault("schemas", {})
    body_models: list[type[BaseModel]] = [schemas.ChatCompletionRequest, *_BODY_MODELS]
    for model in body_models:
        components.update(model.model_json_schema(ref_template=REF_TEMPLATE).get("$defs", {}))
    error_schema = schemas.ErrorResponse.model_json_schema(ref_template=REF_TEMPLATE)
    components.update(error_schema.pop("$defs", {}))
    components["ErrorResponse"] = error_schema
    components["ContentPart"] = _content_part_schema()
    for name, ignored in schemas.IGNORED_FIELDS.items():  # accepted and ignored: say so in the document
        for field in sorted(ignored):
            components.get(name, {}).get("properties", {}).setdefault(field, {"description": "accepted, ignored"})
    components["ChatMessageParam"] = _message_schema()
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)  # FastAPI's 422 shapes: this server answers 400 with ErrorResponse
    if requires_api_key:
        document["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearerAuth": []}]
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            _declare_errors(operation, is_open=path in _OPEN_PATHS)
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]
    chat["description"] = "A chat completion, or with stream: true a server-sent event stream of chunks"
    chat["content"]["text/event-stream"] = {"schema": _SSE_EVENT}  # before OpenAPI 3.2: the schema of one event
    for path, what in (("/v1/completions", "Completion chunk"), ("/v1/responses", "Responses stream event")):
        ok = document["paths"].get(path, {}).get("post", {}).get("responses", {}).get("200")
        if ok is not None:
            event = {"type": "object", "required": ["data"], "properties": {"data": {
                "type": "string", "description": f"A {what} as JSON (an error event if the request failed mid-stream)"}}}
            ok.setdefault("content", {})["text/event-stream"] = {"schema": event}
    return document


def _declare_errors(operation: dict[str, Any], *, is_open: bool) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    error = {"content": {"application/json": {"schema": {"$ref": REF_TEMPLATE.format(model="ErrorResponse")}}}}
    for status, description in _ERRORS.items():
        if is_open and status != "503":
            continue
        responses.setdefault(status, {"description": description, **error})
    if is_open:
        operation["security"] = []  # /health answers without a key


_CACHE_CONTROL = {"description": "accepted, ignored"}


def _text_part() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}, "cache_control": _CACHE_CONTROL}}


def _content_part_schema() -> dict[str, Any]:
    image_part = {"type": "object", "additionalProperties": False, "required": ["type", "image_url"],
                  "properties": {"type": {"const": "image_url"}, "cache_control": _CACHE_CONTROL,
                                 "image_url": {"$ref": REF_TEMPLATE.format(model="ImageURL")}}}
    video_part = {"type": "object", "additionalProperties": False, "required": ["type", "video_url"],
                  "properties": {"type": {"const": "video_url"}, "cache_control": _CACHE_CONTROL,
                                 "video_url": {"$ref": REF_TEMPLATE.format(model="VideoURL")}}}
    return {"title": "ContentPart", "oneOf": [_text_part(), image_part, video_part],
            "description": schemas.ContentPart.__doc__}


def _message_schema() -> dict[str, Any]:
    def turn(roles: list[str], content: dict[str, Any], *, required: bool) -> dict[str, Any]:
        return {"type": "object", "required": ["role", "content"] if required else ["role"],
                "properties": {"role": {"enum": roles}, "content": content, "name": {"type": "string"}}}

    text_only = {"anyOf": [{"type": "string"}, {"type": "array", "items": _text_part()}]}
    any_parts = {"anyOf": [{"type": "string"},
                           {"type": "array", "items": {"$ref": REF_TEMPLATE.format(model="ContentPart")}}]}
    return {"title": "ChatMessageParam", "description": schemas.ChatMessageParam.__doc__, "oneOf": [
        turn(["user"], any_parts, required=True),
        turn(["system", "developer"], text_only, required=True),
        turn(["assistant"], {"anyOf": [*text_only["anyOf"], {"type": "null"}]}, required=False)]}
