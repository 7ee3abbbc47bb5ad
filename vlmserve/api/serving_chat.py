"""POST /v1/chat/completions: OpenAI request → engine request → OpenAI response or SSE stream."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from vlmserve.api import schemas
from vlmserve.api.admission import Admission
from vlmserve.api.output_constraint import output_constraint
from vlmserve.api.output_parsing import OutputDelta, OutputPlan
from vlmserve.api.reasoning import prompt_opens_reasoning
from vlmserve.api.streaming import ChunkWriter
from vlmserve.api.structured_outputs import RequestedStructure, resolve_structured_output
from vlmserve.api.tool_parsers.streaming import EmittedToolCall
from vlmserve.api.tools import ToolPlan, message_tool_fields, plan_tools
from vlmserve.config import Config, ServerConfig
from vlmserve.engine.client import EngineClient, model_input_bytes
from vlmserve.errors import InvalidRequestError, ModelNotFoundError
from vlmserve.multimodal.loader import ImageRef, MediaLoader, VideoRef, VideoSampling
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import (
    ChatMessage,
    GenerationRequest,
    ImagePart,
    PreparedPrompt,
    SamplingParams,
    TextPart,
    TokenDelta,
    VideoPart,
)

logger = logging.getLogger(__name__)

#: temperatures below this sample greedily: 1e-45 is 0 in float32 and logits / 0 are NaN (vLLM uses the same bound)
_GREEDY_BELOW = 1e-5


#: template variables a request's chat_template_kwargs may not replace
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                                         "pad_token", "unk_token", "range"})


@dataclass
class Choice:
    """What one of the n sequences produced, accumulated from its deltas."""

    text: str = ""
    reasoning: str = ""
    finish_reason: schemas.FinishReasonName | None = None
    num_tokens: int = 0
    logprobs: list[schemas.TokenLogprobEntry] = field(default_factory=list)
    calls: list[EmittedToolCall] = field(default_factory=list)


class ChatService:
    """Turns chat completion requests into engine requests and engine output into OpenAI responses."""

    def __init__(self, engine: EngineClient, renderer: PromptRenderer, media: MediaLoader, *,
                 served_model_names: tuple[str, ...], server_config: ServerConfig, model_family: str = "unknown",
                 tool_parser: str | None = None, reasoning_parser: str | None = None,
                 admission: Admission | None = None) -> None:
        """`tool_parser` / `reasoning_parser`: the resolved parser names (None: none applies)."""
        self._engine = engine
        self._family = model_family
        self._tool_parser = tool_parser
        self._reasoning_parser = reasoning_parser
        self._renderer = renderer
        self._media = media
        self._names = served_model_names
        self._config = server_config
        self._admission = admission or Admission(engine, Config(server=server_config))
        self._salt_caches = server_config.enable_cache_salt and bool(server_config.resolved_api_keys())

    async def prepare(self, request: schemas.ChatCompletionRequest, *, client_id: str | None = None,
                      api_key_id: str | None = None) -> tuple[GenerationRequest, dict[str, Any]]:
        """Validate against this server's limits, fetch and decode images, render the prompt (off the loop).

        `client_id` names the sender for quotas and fair scheduling; `api_key_id` (the digest of the key used, when
        keys are configured) salts the prefix cache. Returns the engine request and a loggable summary of it
        (never prompts, image bytes or keys)."""
        if request.model not in self._names:
            raise ModelNotFoundError(f"the model {request.model!r} does not exist here; served models: "
                                     f"{', '.join(self._names)}", param="model")
        # Every cheap check before the expensive part (fetch, decode, render).
        self._check_limits(request)
        sampling = self._sampling(request)
        self._check_text_size(request.messages)
        resolve_structured_output(request)  # refuse conflicting constraints before any image is fetched
        tool_plan = plan_tools(request, self._tool_parser, self._family)
        template_kwargs = _template_kwargs(request.chat_template_kwargs)
        # NOTE: admission before the expensive part. Without it a burst is refused (429) only after every request
        # has fetched, decoded and rendered its images: CPU and memory would then grow with the burst, not the queue.
        max_tokens = sampling.max_tokens or self._renderer.max_model_len
        ticket = self._admission.admit(client_id, request.n, max_tokens * request.n)
        try:
            images = await self._media.load(_image_refs(request.messages))
            self._admission.hold_bytes(ticket, sum(3 * part.image.width * part.image.height for part in images))
            videos = await self._load_videos(request)
            self._admission.hold_bytes(ticket, sum(3 * f.width * f.height for v in videos for f in v.frames))
            chat = _to_chat_messages(request.messages, images, videos)
            prompt = await asyncio.to_thread(self._render, chat, request.chat_template, tool_plan.tools,
                                             template_kwargs)
            self._admission.hold_bytes(ticket, model_input_bytes(prompt.model_inputs))
        finally:
            self._admission.release(ticket)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        structured = self._output_constraint(request, tool_plan, prompt)
        if structured is not None:
            await self._compile(structured)
            sampling = dataclasses.replace(sampling, structured=structured.spec)
        generation = GenerationRequest(request_id=request_id, prompt=prompt, sampling=sampling, client_id=client_id,
                                       cache_salt=api_key_id if self._salt_caches else None)
        return generation, _summary(generation, images, videos)

    async def _load_videos(self, request: schemas.ChatCompletionRequest) -> list[VideoPart]:
        refs = _video_refs(request.messages)
        if not refs:
            return []
        self._renderer.check_accepts_video()  # before any fetch: a model without a video path refuses at once
        sampling = self._media.default_video_sampling
        options = request.mm_processor_kwargs
        if options is not None:
            if options.max_frames is not None and options.max_frames > sampling.max_frames:
                raise InvalidRequestError(f"mm_processor_kwargs.max_frames is {options.max_frames}; this server "
                                          f"samples at most {sampling.max_frames} frames per video "
                                          "(--max-video-frames)", param="mm_processor_kwargs.max_frames")
            sampling = VideoSampling(fps=options.fps or sampling.fps,
                                     max_frames=options.max_frames or sampling.max_frames)
        return list(await self._media.load_videos(refs, sampling))

    def _check_text_size(self, messages: list[schemas.ChatMessageParam]) -> None:
        """The renderer's length bound, applied before any image is fetched."""
        num_chars = 0
        for message in messages:
            if isinstance(message.content, str):
                num_chars += len(message.content)
            elif message.content is not None:
                num_chars += sum(len(part.text or "") for part in message.content)
        self._renderer.check_text_size(num_chars)

    def reported_cached_tokens(self, cached_tokens: int) -> int:
        return self._config.reported_cached_tokens(cached_tokens)

    def output_plan(self, request: schemas.ChatCompletionRequest, generation: GenerationRequest) -> OutputPlan:
        """How `generation`'s output is read back (tool calls, reasoning); cheap, for a prepared request."""
        tool_plan = plan_tools(request, self._tool_parser, self._family)
        return OutputPlan(tools=tool_plan.tools, tool_parser=tool_plan.parser_name if tool_plan.tools else None,
                          max_calls=tool_plan.max_calls, is_legacy=tool_plan.is_legacy,
                          reasoning_parser=self._reasoning_parser,
                          starts_in_reasoning=self._starts_in_reasoning(generation.prompt))

    def _starts_in_reasoning(self, prompt: PreparedPrompt) -> bool:
        if self._reasoning_parser is None:
            return False
        tail = self._renderer.tokenizer.decode(prompt.token_ids[-8:])
        return prompt_opens_reasoning(str(tail))

    def _output_constraint(self, request: schemas.ChatCompletionRequest, tool_plan: ToolPlan,
                           prompt: PreparedPrompt) -> RequestedStructure | None:
        """One spec from the tool choice, the response format and the reasoning parser (see output_constraint)."""
        structure = resolve_structured_output(request)
        spec = output_constraint(tool_plan.call_grammar, is_forced=tool_plan.is_forced,
                                 structure=structure.spec if structure is not None else None,
                                 reasoning=self._reasoning_parser is not None,
                                 starts_in_reasoning=self._starts_in_reasoning(prompt))
        if spec is None:
            return None
        # NOTE: when tools and a response format merge, a compile error blames the response format's field
        param = structure.param if structure is not None and not tool_plan.is_forced else "tools"
        return RequestedStructure(spec, param)

    async def _compile(self, structure: RequestedStructure) -> None:
        """Compile the grammar before generation starts, so a spec the engine cannot enforce is a 400."""
        try:
            await self._engine.compile_structured(structure.spec)
        except InvalidRequestError as exc:
            raise InvalidRequestError(exc.message, param=structure.param) from exc

    def _render(self, chat: list[ChatMessage], template: str | None, tools: list[dict[str, Any]] | None,
                template_kwargs: dict[str, Any]) -> PreparedPrompt:
        """Worker thread: render the prompt."""
        try:
            return self._renderer.render(chat, chat_template=template, tools=tools, template_kwargs=template_kwargs)
        except StopIteration as exc:
            # NOTE: a StopIteration cannot cross asyncio.to_thread (the awaiting request would hang for ever).
            # Processors raise it when the text holds more image placeholders than images were sent.
            raise InvalidRequestError("the model's processor could not prepare this conversation (more image "
                                      "placeholders than images)", param="messages") from exc

    def _check_limits(self, request: schemas.ChatCompletionRequest) -> None:
        cfg = self._config
        if request.n > cfg.max_n:
            raise InvalidRequestError(f"n is {request.n}; this server allows at most {cfg.max_n} (--max-n)",
                                      param="n")
        if len(request.messages) > cfg.max_messages:
            raise InvalidRequestError(f"{len(request.messages)} messages; at most {cfg.max_messages} are allowed "
                                      "(--max-messages)", param="messages")
        stops = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
        if len(stops) > cfg.max_stop_sequences:
            raise InvalidRequestError(f"{len(stops)} stop sequences; at most {cfg.max_stop_sequences} are "
                                      "allowed (--max-stop-sequences)", param="stop")
        if request.chat_template is not None and not cfg.trust_request_chat_template:
            raise InvalidRequestError("chat_template in a request is refused unless the server runs with "
                                      "--trust-request-chat-template", param="chat_template")

    def _sampling(self, request: schemas.ChatCompletionRequest) -> SamplingParams:
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        logit_bias: dict[int, float] = {}
        for key, value in (request.logit_bias or {}).items():
            # ASCII digits only: str.isdigit() also accepts '²' or Arabic-Indic digits, which int() refuses or reads
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise InvalidRequestError(f"logit_bias keys are token ids; {key[:32]!r} is not", param="logit_bias")
            logit_bias[int(key)] = value
        vocab = len(self._renderer.tokenizer)
        if any(token >= vocab for token in [*logit_bias, *(request.stop_token_ids or [])]):
            raise InvalidRequestError(f"token ids must be below the vocabulary size {vocab}",
                                      param="logit_bias" if logit_bias else "stop_token_ids")
        return SamplingParams(
            max_tokens=request.max_completion_tokens or request.max_tokens,
            temperature=_temperature(request.temperature),
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=max(request.top_k or 0, 0), min_p=request.min_p or 0.0,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty or 1.0, logit_bias=logit_bias, seed=request.seed,
            stop=stop, stop_token_ids=tuple(request.stop_token_ids or ()), min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos, logprobs=request.logprobs, top_logprobs=request.top_logprobs or 0,
            n=request.n, skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens)

    # --- responses -------------------------------------------------------------------------------------------

    async def complete(self, generation: GenerationRequest, model: str,
                       plan: OutputPlan | None = None) -> schemas.ChatCompletion:
        plan = plan or OutputPlan()
        choices = [Choice() for _ in range(generation.sampling.n)]
        cached = 0
        async for delta in self._engine.generate(generation):
            choice = choices[delta.index]
            choice.text += delta.text
            choice.num_tokens = delta.num_generated_tokens
            choice.logprobs += _logprob_entries(delta)
            cached = max(cached, delta.num_cached_tokens)
            if delta.finish_reason is not None:
                choice.finish_reason = cast(schemas.FinishReasonName, delta.finish_reason.value)
        want_logprobs = generation.sampling.logprobs
        return schemas.ChatCompletion(
            id=generation.request_id, created=int(time.time()), model=model,
            choices=[schemas.ChatCompletionChoice(
                index=i, message=_message(c, plan), finish_reason=_finish_reason(c.finish_reason, plan, c.calls),
                logprobs=schemas.ChoiceLogprobs(content=c.logprobs) if want_logprobs else None)
                for i, c in enumerate(choices)],
            usage=_usage(generation.prompt, sum(c.num_tokens for c in choices), self._config.reported_cached_tokens(cached)))

    def stream(self, generation: GenerationRequest, model: str, include_usage: bool,
               plan: OutputPlan | None = None, progress: dict[str, Any] | None = None) -> AsyncIterator[str]:
        """The SSE events of a streamed completion. Errors that need no generation raise here, before any event;
        `progress` gets `completion_tokens` as they come (for the request's log line)."""
        deltas = self._engine.generate(generation)
        return self._stream(generation, deltas, model, include_usage, plan or OutputPlan(),
                            {} if progress is None else progress)

    async def _stream(self, generation: GenerationRequest, deltas: AsyncIterator[TokenDelta], model: str,
                      include_usage: bool, plan: OutputPlan, progress: dict[str, Any]) -> AsyncIterator[str]:
        writer = ChunkWriter(generation.request_id, model, include_usage=include_usage)
        num_choices = generation.sampling.n
        for index in range(num_choices):
            yield writer.role(index)
        parsers = [plan.new_parser() for _ in range(num_choices)]
        completion_tokens = [0] * num_choices
        cached = 0
        async for delta in deltas:
            completion_tokens[delta.index] = delta.num_generated_tokens
            progress["completion_tokens"] = sum(completion_tokens)
            cached = max(cached, delta.num_cached_tokens)
            entries = _logprob_entries(delta) if generation.sampling.logprobs else None
            parsed = parsers[delta.index].feed(delta.text, final=delta.finish_reason is not None)
            for event in _delta_events(writer, delta.index, parsed, entries, plan):
                yield event
            if delta.finish_reason is not None:
                calls = parsers[delta.index].tool_calls
                yield writer.finish(delta.index, _finish_reason(delta.finish_reason.value, plan, calls) or "stop")
        if include_usage:
            yield writer.usage(_usage(generation.prompt, sum(completion_tokens), self._config.reported_cached_tokens(cached)))
        yield writer.done()


def _delta_events(writer: ChunkWriter, index: int, parsed: OutputDelta,
                  entries: list[schemas.TokenLogprobEntry] | None, plan: OutputPlan) -> list[str]:
    events = [writer.reasoning(index, parsed.reasoning)] if parsed.reasoning else []
    if parsed.content or entries:
        events.append(writer.content(index, parsed.content, entries))
    for call in parsed.tool_calls:
        events += writer.tool_call(index, call, legacy=plan.is_legacy)
    return events


def _message(choice: Choice, plan: OutputPlan) -> schemas.ChatCompletionMessage:
    if plan.is_plain:
        return schemas.ChatCompletionMessage(content=choice.text)
    parsed = plan.new_parser().feed(choice.text, final=True)
    choice.calls = parsed.tool_calls
    calls = [schemas.ToolCall(id=c.id, function=schemas.FunctionCall(name=c.name, arguments=c.arguments))
             for c in parsed.tool_calls]
    content = parsed.content if parsed.content or not calls else None
    return schemas.ChatCompletionMessage(
        content=content, reasoning_content=parsed.reasoning or None,
        tool_calls=calls if calls and not plan.is_legacy else None,
        function_call=calls[0].function if calls and plan.is_legacy else None)


def _finish_reason(reason: str | None, plan: OutputPlan, calls: list[EmittedToolCall]
                   ) -> schemas.FinishReasonName | None:
    """OpenAI reports "tool_calls" (legacy: "function_call") when a choice that stopped made calls."""
    if reason == "stop" and calls:
        return "function_call" if plan.is_legacy else "tool_calls"
    return cast(schemas.FinishReasonName | None, reason)


def _template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """`chat_template_kwargs`, checked: extra template variables (e.g. enable_thinking), never the ones the
    server sets."""
    for key in kwargs or {}:
        if not key.isidentifier() or key in RESERVED_TEMPLATE_VARIABLES:
            raise InvalidRequestError(f"chat_template_kwargs may not set {key!r} (reserved or not a name)",
                                      param="chat_template_kwargs")
    return dict(kwargs or {})


def _temperature(value: float | None) -> float:
    """The request's temperature; below _GREEDY_BELOW it is greedy (0), as dividing by it would overflow."""
    if value is None:
        return 1.0
    return 0.0 if value < _GREEDY_BELOW else value


def _usage(prompt: PreparedPrompt, completion_tokens: int, cached: int) -> schemas.Usage:
    return schemas.Usage(prompt_tokens=prompt.num_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt.num_tokens + completion_tokens,
                         prompt_tokens_details=schemas.PromptTokensDetails(cached_tokens=cached,
                                                                           image_tokens=prompt.num_image_tokens))


def _logprob_entries(delta: TokenDelta) -> list[schemas.TokenLogprobEntry]:
    if not delta.logprobs:
        return []
    texts = delta.token_texts or [""] * len(delta.logprobs)
    top_texts = delta.top_token_texts or [[""] * len(lp.top) for lp in delta.logprobs]
    return [schemas.TokenLogprobEntry(
        token=text, logprob=lp.chosen.logprob, bytes=list(text.encode("utf-8")),
        top_logprobs=[schemas.TopLogprob(token=alt_text, logprob=alt.logprob, bytes=list(alt_text.encode("utf-8")))
                      for alt_text, alt in zip(alternatives, lp.top, strict=True)])
        for text, alternatives, lp in zip(texts, top_texts, delta.logprobs, strict=True)]


def _image_refs(messages: list[schemas.ChatMessageParam]) -> list[ImageRef]:
    """Every image of the conversation, in order, with the request field that holds it (for errors)."""
    refs: list[ImageRef] = []
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.image_url is not None:
                    refs.append(ImageRef(url=part.image_url.url, param=f"messages[{i}].content[{j}].image_url",
                                         detail=part.image_url.detail))
    return refs


def _video_refs(messages: list[schemas.ChatMessageParam]) -> list[VideoRef]:
    """Every video of the conversation, in order, with the request field that holds it (for errors)."""
    return [VideoRef(url=part.video_url.url, param=f"messages[{i}].content[{j}].video_url")
            for i, message in enumerate(messages) if isinstance(message.content, list)
            for j, part in enumerate(message.content) if part.video_url is not None]


def _to_chat_messages(messages: list[schemas.ChatMessageParam], images: list[ImagePart],
                      videos: list[VideoPart] | None = None) -> list[ChatMessage]:
    pending_images, pending_videos = iter(images), iter(videos or ())
    chat: list[ChatMessage] = []
    for message, (role, tool_calls, tool_call_id) in zip(messages, message_tool_fields(messages), strict=True):
        parts: list[TextPart | ImagePart | VideoPart] = []
        if isinstance(message.content, str):
            parts.append(TextPart(message.content))
        elif message.content is not None:
            for part in message.content:
                if part.type == "text":
                    parts.append(TextPart(part.text or ""))
                else:
                    parts.append(next(pending_images) if part.type == "image_url" else next(pending_videos))
        chat.append(ChatMessage(role=role, parts=tuple(parts), tool_calls=tool_calls,
                                tool_call_id=tool_call_id if role == "tool" else None))
    return chat


def _summary(generation: GenerationRequest, images: list[ImagePart], videos: list[VideoPart]) -> dict[str, Any]:
    prompt = generation.prompt
    summary: dict[str, Any] = {"request_id": generation.request_id, "prompt_tokens": prompt.num_tokens,
                               "image_tokens": prompt.num_image_tokens,
                               "images": [f"{part.hash[:16]}:{part.image.width}x{part.image.height}"
                                          for part in images],
                               "max_tokens": generation.sampling.max_tokens, "n": generation.sampling.n}
    if videos:
        summary["video_tokens"] = prompt.num_video_tokens
        summary["videos"] = [f"{v.hash[:16]}:{len(v.frames)}x{v.frames[0].width}x{v.frames[0].height}" for v in videos]
    return summary
