"""`POST /v1/completions`: text (or token-id) prompts → engine requests, with no chat template and no images.

Each prompt of the request is one `GenerationRequest` of n sequences; choice `i * n + j` is prompt i's sequence j,
as in OpenAI's API. Everything that does not depend on generation (lengths, context, limits, queue) is checked for
every prompt before the first byte of a stream.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from vlmserve.api import schemas
from vlmserve.api.sampling_params import build_sampling
from vlmserve.api.schemas_completions import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from vlmserve.config import ServerConfig
from vlmserve.engine.client import EngineClient
from vlmserve.errors import InvalidRequestError, ModelNotFoundError, UnsupportedFeatureError
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import GenerationRequest, PreparedPrompt, SamplingParams, TokenDelta


@dataclass
class _Choice:
    text: str = ""
    finish_reason: str | None = None
    num_tokens: int = 0
    logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)


@dataclass
class PreparedCompletion:
    """The engine requests of one completions request, and the texts `echo` puts before each prompt's choices."""

    completion_id: str
    generations: list[GenerationRequest]
    echoes: list[str]
    n: int
    want_logprobs: bool
    #: sequences generated per prompt; with best_of > n the n of highest cumulative logprob are returned
    best_of: int = 1


class CompletionsService:
    def __init__(self, engine: EngineClient, renderer: PromptRenderer, *, served_model_names: tuple[str, ...],
                 server_config: ServerConfig) -> None:
        self._engine = engine
        self._renderer = renderer
        self._names = served_model_names
        self._config = server_config
        # the same prefix-cache isolation as chat (serving_chat.ChatService): one salt per API key
        self._salt_caches = server_config.enable_cache_salt and bool(server_config.resolved_api_keys())

    @property
    def _tokenizer(self) -> Any:
        # looked up per call: the renderer owns the processor (and tests build apps without one)
        return self._renderer.tokenizer

    async def prepare(self, request: CompletionRequest, *, client_id: str | None = None,
                      api_key_id: str | None = None) -> PreparedCompletion:
        """`client_id` names the sender for fair scheduling; `api_key_id` (the digest of the key used, when keys
        are configured) salts the prefix cache, as in chat: no key's requests find blocks another key's wrote."""
        if request.model not in self._names:
            raise ModelNotFoundError(f"the model {request.model!r} does not exist here; served models: "
                                     f"{', '.join(self._names)}", param="model")
        self._check(request)
        prompts = request.prompts()
        sampling = self._sampling(request)
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        token_lists = await asyncio.to_thread(self._tokenize, prompts)
        salt = api_key_id if self._salt_caches else None
        generations = [GenerationRequest(
            request_id=completion_id if len(prompts) == 1 else f"{completion_id}-p{i}",
            prompt=PreparedPrompt(token_ids=ids), sampling=sampling, client_id=client_id, cache_salt=salt)
            for i, ids in enumerate(token_lists)]
        echoes = [""] * len(prompts)
        if request.echo:
            echoes = [p if isinstance(p, str) else str(self._tokenizer.decode(p)) for p in prompts]
        return PreparedCompletion(completion_id, generations, echoes, request.n, request.logprobs is not None,
                                  best_of=sampling.n)

    def _check(self, request: CompletionRequest) -> None:
        if request.suffix:
            raise UnsupportedFeatureError("suffix (insertion / fill-in-the-middle) is not supported by this server",
                                          param="suffix")
        if request.best_of is not None and request.best_of < request.n:
            raise InvalidRequestError(f"best_of ({request.best_of}) must be at least n ({request.n})",
                                      param="best_of")
        if request.stream and (request.best_of or request.n) > request.n:
            raise UnsupportedFeatureError("best_of above n cannot be streamed (the best are known only at the "
                                          "end)", param="best_of")
        if request.echo and request.logprobs is not None:
            raise UnsupportedFeatureError("echo with logprobs needs the prompt's logprobs, which this server does "
                                          "not compute", param="echo")
        total = len(request.prompts()) * (request.best_of or request.n)
        if total > self._config.max_n:
            raise InvalidRequestError(f"{total} sequences requested (prompts x n); this server allows at most "
                                      f"{self._config.max_n} (--max-n)", param="prompt")
        stops = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
        if len(stops) > self._config.max_stop_sequences:
            raise InvalidRequestError(f"{len(stops)} stop sequences; at most {self._config.max_stop_sequences} "
                                      "are allowed (--max-stop-sequences)", param="stop")

    def _sampling(self, request: CompletionRequest) -> SamplingParams:
        ranked = (request.best_of or request.n) > request.n
        return build_sampling(
            vocab_size=len(self._tokenizer), max_tokens=request.max_tokens, temperature=request.temperature,
            top_p=request.top_p, n=request.best_of or request.n, stop=request.stop, seed=request.seed,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            logit_bias=request.logit_bias, top_k=request.top_k,
            # best_of ranks candidates by cumulative logprob: ask for the chosen tokens' logprobs even if the
            # client did not (they are dropped from the answer then)
            top_logprobs=request.logprobs if request.logprobs is not None or not ranked else 0,
            min_p=request.min_p, repetition_penalty=request.repetition_penalty, min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos, stop_token_ids=request.stop_token_ids)

    def _tokenize(self, prompts: list[str | list[int]]) -> list[list[int]]:
        vocab = len(self._tokenizer)
        token_lists = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                token_lists.append([int(t) for t in self._tokenizer(prompt)["input_ids"]])
            elif any(t >= vocab for t in prompt):
                raise InvalidRequestError(f"prompt token ids must be below the vocabulary size {vocab}",
                                          param="prompt" if len(prompts) == 1 else f"prompt[{i}]")
            else:
                token_lists.append(list(prompt))
            if not token_lists[-1]:
                raise InvalidRequestError("the prompt is empty (0 tokens): there is nothing to complete from",
                                          param="prompt" if len(prompts) == 1 else f"prompt[{i}]")
        return token_lists

    # --- answers ---------------------------------------------------------------------------------------------

    def start(self, prepared: PreparedCompletion) -> list[AsyncIterator[TokenDelta]]:
        """Start every prompt's generation; raises (a status, not a stream event) what needs no generation."""
        # NOTE: if a later prompt is refused, the earlier ones' iterators are dropped unstarted: nothing was
        # submitted yet (the engine submits on the first iteration), so there is nothing to abort.
        return [self._engine.generate(generation) for generation in prepared.generations]

    async def complete(self, prepared: PreparedCompletion, model: str) -> Completion:
        streams = self.start(prepared)
        n = prepared.best_of
        choices = [_Choice(text=prepared.echoes[i // n]) for i in range(len(streams) * n)]
        cached = 0
        async for prompt_index, delta in _merge(streams):
            choice = choices[prompt_index * n + delta.index]
            if delta.logprobs:
                _extend_logprobs(choice.logprobs, delta, len(choice.text))
            choice.text += delta.text
            choice.num_tokens = delta.num_generated_tokens
            cached = max(cached, delta.num_cached_tokens)
            if delta.finish_reason is not None:
                choice.finish_reason = delta.finish_reason.value
        prompt_tokens = sum(g.prompt.num_tokens for g in prepared.generations)
        generated = sum(c.num_tokens for c in choices)  # every candidate counts, as OpenAI bills best_of
        if prepared.best_of > prepared.n:
            choices = _best(choices, prepared.best_of, prepared.n)
        return Completion(
            id=prepared.completion_id, created=int(time.time()), model=model,
            choices=[CompletionChoice(index=i, text=c.text, logprobs=c.logprobs if prepared.want_logprobs else None,
                                      finish_reason=cast(schemas.FinishReasonName, c.finish_reason))
                     for i, c in enumerate(choices)],
            usage=_usage(prompt_tokens, generated, self._config.reported_cached_tokens(cached)))

    def stream(self, prepared: PreparedCompletion, model: str, include_usage: bool,
               progress: dict[str, Any]) -> AsyncIterator[str]:
        return self._stream(prepared, self.start(prepared), model, include_usage, progress)

    async def _stream(self, prepared: PreparedCompletion, streams: list[AsyncIterator[TokenDelta]], model: str,
                      include_usage: bool, progress: dict[str, Any]) -> AsyncIterator[str]:
        created, n = int(time.time()), prepared.n
        offsets = [len(prepared.echoes[i // n]) for i in range(len(streams) * n)]
        tokens = [0] * len(offsets)
        cached = 0

        def chunk(choices: list[dict[str, Any]], usage: schemas.Usage | None = None) -> str:
            body: dict[str, Any] = {"id": prepared.completion_id, "object": "text_completion", "created": created,
                                    "model": model, "choices": choices}
            if include_usage:
                body["usage"] = usage.model_dump(mode="json") if usage else None
            return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

        for index, echo in enumerate(prepared.echoes):
            if echo:
                for j in range(n):
                    yield chunk([_chunk_choice(index * n + j, echo, None, None)])
        async for prompt_index, delta in _merge(streams):
            index = prompt_index * n + delta.index
            tokens[index] = delta.num_generated_tokens
            progress["completion_tokens"] = sum(tokens)
            cached = max(cached, delta.num_cached_tokens)
            logprobs = None
            if prepared.want_logprobs and delta.logprobs:
                logprobs = CompletionLogprobs()
                _extend_logprobs(logprobs, delta, offsets[index])
            offsets[index] += len(delta.text)
            if delta.text or logprobs is not None or delta.finish_reason is not None:
                reason = delta.finish_reason.value if delta.finish_reason is not None else None
                yield chunk([_chunk_choice(index, delta.text, logprobs, reason)])
        if include_usage:
            prompt_tokens = sum(g.prompt.num_tokens for g in prepared.generations)
            yield chunk([], _usage(prompt_tokens, sum(tokens), self._config.reported_cached_tokens(cached)))
        yield "data: [DONE]\n\n"


def _best(choices: list[_Choice], best_of: int, n: int) -> list[_Choice]:
    """Per prompt, the n of its best_of candidates with the highest cumulative logprob, best first."""
    kept: list[_Choice] = []
    for start in range(0, len(choices), best_of):
        group = choices[start:start + best_of]
        group.sort(key=lambda c: sum(lp for lp in c.logprobs.token_logprobs if lp is not None), reverse=True)
        kept += group[:n]
    return kept


def _chunk_choice(index: int, text: str, logprobs: CompletionLogprobs | None, reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs.model_dump() if logprobs else None,
            "finish_reason": reason}


def _extend_logprobs(target: CompletionLogprobs, delta: TokenDelta, offset: int) -> None:
    texts = delta.token_texts or [""] * len(delta.logprobs or ())
    tops = delta.top_token_texts or [[""] * len(lp.top) for lp in delta.logprobs or ()]
    for text, alternatives, lp in zip(texts, tops, delta.logprobs or (), strict=True):
        target.tokens.append(text)
        target.token_logprobs.append(lp.chosen.logprob)
        target.top_logprobs.append({alt_text: alt.logprob for alt_text, alt in zip(alternatives, lp.top,
                                                                                    strict=True)})
        target.text_offset.append(offset)
        offset += len(text)


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> schemas.Usage:
    return schemas.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens,
                         prompt_tokens_details=schemas.PromptTokensDetails(cached_tokens=cached))


async def _merge(streams: list[AsyncIterator[TokenDelta]]) -> AsyncIterator[tuple[int, TokenDelta]]:
    """Deltas of several generations as they come, tagged with the generation's index."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, TokenDelta] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[TokenDelta]) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

