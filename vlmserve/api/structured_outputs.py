"""The request fields that constrain the output, mapped onto one engine `StructuredOutputSpec`.

Accepted, one per request: OpenAI's `response_format` (`json_object`, `json_schema`; `text` constrains nothing),
vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`) and vLLM's older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`. Grammars are Lark in llguidance's dialect. Two constraints in one
request are refused (400) rather than one silently winning. Whether the engine can enforce the spec (a JSON-schema
keyword llguidance does not implement, a bad regex) is checked by compiling it before the request is accepted
(`EngineClient.compile_structured`); `param` names the field to blame in that 400.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmserve.api import schemas
from vlmserve.errors import InvalidRequestError
from vlmserve.types import StructuredOutputSpec


@dataclass(frozen=True)
class RequestedStructure:
    """The spec a request asks for, and the request field it came from (for error messages)."""

    spec: StructuredOutputSpec
    param: str


def structured_output_spec(request: schemas.ChatCompletionRequest) -> StructuredOutputSpec | None:
    """The request's output constraint, or None when it asks for free text."""
    requested = resolve_structured_output(request)
    return requested.spec if requested is not None else None


def resolve_structured_output(request: schemas.ChatCompletionRequest) -> RequestedStructure | None:
    found = [*_from_response_format(request.response_format), *_from_structured_outputs(request.structured_outputs),
             *_from_guided(request)]
    if len(found) > 1:
        names = ", ".join(r.param for r in found)
        raise InvalidRequestError(f"the output may be constrained by one field only, but this request sets {names}; "
                                  "send one of them", param=found[1].param)
    return found[0] if found else None


def _from_response_format(fmt: schemas.ResponseFormat | None) -> list[RequestedStructure]:
    if fmt is None or fmt.type == "text":
        return []
    if fmt.type == "json_object":
        return [RequestedStructure(StructuredOutputSpec("json_object"), "response_format")]
    assert fmt.json_schema is not None  # the schema model's validator
    param = "response_format.json_schema.schema"
    if fmt.json_schema.schema_ is None:
        # OpenAI's schema is optional; without one the model may answer any JSON object
        return [RequestedStructure(StructuredOutputSpec("json_object"), param)]
    return [RequestedStructure(_json_spec(fmt.json_schema.schema_, param), param)]


def _from_structured_outputs(params: schemas.StructuredOutputsParams | None) -> list[RequestedStructure]:
    if params is None:
        return []
    found = _from_vllm_fields(params.json_, params.regex, params.choice, params.grammar,
                              lambda kind: f"structured_outputs.{kind}")
    if params.json_object:
        found.append(RequestedStructure(StructuredOutputSpec("json_object"), "structured_outputs.json_object"))
    if not found:
        raise InvalidRequestError("structured_outputs needs one of json, regex, choice, grammar or json_object",
                                  param="structured_outputs")
    return found


def _from_guided(request: schemas.ChatCompletionRequest) -> list[RequestedStructure]:
    return _from_vllm_fields(request.guided_json, request.guided_regex, request.guided_choice, request.guided_grammar,
                             lambda kind: f"guided_{kind}")


def _from_vllm_fields(json_: dict[str, Any] | str | None, regex: str | None, choice: list[str] | None,
                      grammar: str | None, param: Callable[[str], str]) -> list[RequestedStructure]:
    """vLLM's four constraint kinds, spelled as `structured_outputs.*` or as the older `guided_*` fields."""
    found: list[RequestedStructure] = []
    if json_ is not None:
        found.append(RequestedStructure(_json_spec(json_, param("json")), param("json")))
    if regex is not None:
        found.append(_text_spec("regex", regex, param("regex")))
    if choice is not None:
        found.append(_choice_spec(choice, param("choice")))
    if grammar is not None:
        found.append(_text_spec("grammar", grammar, param("grammar")))
    return found


def _json_spec(schema: dict[str, Any] | str, param: str) -> StructuredOutputSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON", param=param) from exc
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param=param)
    # canonical text, so equal schemas share one compiled grammar in the engine's cache
    return StructuredOutputSpec("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))


def _text_spec(kind: str, value: str, param: str) -> RequestedStructure:
    if not value:
        raise InvalidRequestError(f"{param} is empty", param=param)
    return RequestedStructure(StructuredOutputSpec(kind, value), param)  # type: ignore[arg-type]


def _choice_spec(choices: list[str], param: str) -> RequestedStructure:
    if not choices or not all(choices):
        raise InvalidRequestError(f"{param} needs at least one choice, and no empty choice", param=param)
    return RequestedStructure(StructuredOutputSpec("choice", tuple(choices)), param)
