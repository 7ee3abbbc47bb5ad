"""Pydantic models mirroring the OpenAI chat completions API (plus the vLLM sampling extensions), nothing else.

Request models validate shape and ranges; limits that depend on the server's configuration (n, stop strings,
messages, images) are checked in `serving_chat`.

Leniency policy (the one place it is written down; every route's schemas follow it):
- Be as lenient as OpenAI is. A field that changes nothing this server does is accepted and ignored, with one
  DEBUG log line per field name for the life of the process. That covers unknown top-level fields (clients such
  as LangChain and Dify send parameters this server has no use for, e.g. `user`, `metadata`, `service_tier`) and
  the known extras clients put inside nested objects: `cache_control` on content parts, `image_url.format`,
  `stream_options.include_obfuscation` / `continuous_usage_stats` (see `IGNORED_FIELDS`).
- Refuse (400, `param` naming the field, `code` "unsupported") only what would change the answer and cannot be
  honoured: built-in (non-function) Responses tools, `suffix`, streamed `best_of` above `n`, background responses,
  file ids.
- Unknown fields inside nested objects that are not in `IGNORED_FIELDS`, and unknown content-part types, are
  refused: there a typo usually means a lost instruction (an image that would silently not be sent).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

# --- requests ---------------------------------------------------------------------------------------------------


#: per nested object, the extra fields clients send that change nothing here: accepted, then dropped
IGNORED_FIELDS: dict[str, frozenset[str]] = {
    "ContentPart": frozenset({"cache_control"}),
    "ImageURL": frozenset({"format", "cache_control"}),
    "StreamOptions": frozenset({"include_obfuscation", "continuous_usage_stats"}),
}
_logged_ignored: set[str] = set()


def note_ignored(where: str, name: str) -> None:
    """Log an accepted-and-ignored field once per process (at DEBUG: it is expected, not a problem)."""
    key = f"{where}.{name}"
    if key not in _logged_ignored:
        _logged_ignored.add(key)
        logger.debug("ignoring %s: it changes nothing this server does (logged once)", key)


class _Strict(BaseModel):
    """Unknown fields refused, except the ones `IGNORED_FIELDS` lists for this class, which are dropped."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        ignored = IGNORED_FIELDS.get(cls.__name__)
        if not ignored or not isinstance(data, dict) or not ignored.intersection(data):
            return data
        for name in ignored.intersection(data):
            note_ignored(cls.__name__, name)
        return {k: v for k, v in data.items() if k not in ignored}


class ImageURL(_Strict):
    url: str = Field(min_length=1, description="http(s) URL, data:image/...;base64 URI, or an allowed local file")
    detail: Literal["auto", "low", "high"] = "auto"


class VideoURL(_Strict):
    url: str = Field(min_length=1, description="http(s) URL, data:video/...;base64 URI, or an allowed local file")


class ContentPart(_Strict):
    """One part of a message's content: `{"type": "text", "text"}`, `{"type": "image_url", "image_url"}` or
    (vLLM's extension) `{"type": "video_url", "video_url"}`."""

    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None

    @model_validator(mode="after")
    def _payload_matches_type(self) -> ContentPart:
        payloads = {"text": self.text, "image_url": self.image_url, "video_url": self.video_url}
        if payloads[self.type] is None or any(v is not None for k, v in payloads.items() if k != self.type):
            raise ValueError(f"a {self.type} part needs '{self.type}' and nothing else")
        return self


class MMProcessorKwargs(_Strict):
    """vLLM's per-request `mm_processor_kwargs`: how this request's videos are sampled (within the server's
    `--max-video-frames`)."""

    fps: Annotated[float, Field(gt=0.0, le=120.0)] | None = None
    max_frames: Annotated[int, Field(ge=1)] | None = None


class FunctionCallParam(BaseModel):
    """A function call an assistant made earlier: `arguments` is JSON text (an object is accepted too)."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class ToolCallParam(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessageParam(BaseModel):
    """A chat turn. `developer` is treated as `system`; `function` (legacy) as `tool`.

    Images are accepted in user turns and, beyond OpenAI's spec, in tool results (a tool that returns a
    screenshot)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallParam | None = None

    @model_validator(mode="after")
    def _content_fits_role(self) -> ChatMessageParam:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if (self.role not in ("user", "tool", "function") and isinstance(self.content, list)
                and any(p.type != "text" for p in self.content)):
            raise ValueError(f"a {self.role} message may only contain text parts")
        if (self.tool_calls or self.function_call) and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls or function_call")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        if self.role == "function" and not self.name:
            raise ValueError("a function message needs name (the function it answers)")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name": ...}}`: the model must call this function."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's named schema (`strict` is accepted; the grammar always enforces)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """`response_format`: plain text, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_matches_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a 'json_schema' object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"response_format of type {self.type} takes no 'json_schema'")
        return self


class StructuredOutputsParams(_Strict):
    """vLLM's `structured_outputs` extension: exactly one of json, regex, choice, grammar (Lark), json_object."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # NOTE: accepted for vLLM clients and ignored: output JSON is always compact and the grammar always enforced
    disable_fallback: bool | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stop: str | list[str] | None = None
    # int64, as in OpenAI's spec; wider seeds overflow torch's generator (and n > 1 adds the choice index)
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # legacy (deprecated by OpenAI): mapped onto tools / tool_choice, the answer comes back as function_call
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    response_format: ResponseFormat | None = None
    # vLLM-compatible extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    # vLLM's output-text options: None keeps the model's grounding markup and drops control tokens
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: MMProcessorKwargs | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's older guided decoding fields (one of them, or one of the above, per request)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.functions is not None and self.tools is not None:
            raise ValueError("send tools or the legacy functions, not both")
        if self.function_call is not None and self.tool_choice is not None:
            raise ValueError("send tool_choice or the legacy function_call, not both")
        return self


# --- responses --------------------------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None
    refusal: None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    reasoning_content: str | None = None


FinishReasonName = Literal["stop", "length", "abort", "tool_calls", "function_call"]


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    #: of the prompt tokens, those standing for images (an extension; OpenAI's image API reports the same name)
    image_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionCallDelta | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlmserve"
    # vlmserve's extension: how the model writes boxes (vlmserve.grounding), null when it has no grounding markup
    grounding_format: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
