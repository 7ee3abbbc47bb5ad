"""`EngineClient`: the only thing the API holds. `AsyncEngine` runs an engine core in a thread behind it.

The core works on token ids in its own thread, with no I/O. Its outputs cross to the event loop with
`call_soon_threadsafe`; there each sequence's detokenizer turns them into `TokenDelta`s, checks stop strings
(aborting the sequence in the core when one matches) and feeds the request's queue. `n > 1` fans out into n
sequences whose deltas share one queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from vlmserve.engine.detokenizer import IncrementalDetokenizer
from vlmserve.engine.protocol import CoreOutput, EngineCore
from vlmserve.engine.text_policy import TextPolicy
from vlmserve.errors import (
    ContextLengthError,
    EngineDeadError,
    InternalError,
    InvalidRequestError,
    QueueFullError,
    ServiceUnavailableError,
    UnsupportedFeatureError,
)
from vlmserve.types import (
    EngineStats,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StructuredOutputSpec,
    TokenDelta,
)

logger = logging.getLogger(__name__)


def model_input_bytes(inputs: dict[str, Any]) -> int:
    """Bytes of the array-like model inputs (pixel values and friends), without importing torch."""
    total = 0
    for value in inputs.values():
        nbytes = getattr(value, "nbytes", None)
        if isinstance(nbytes, int):
            total += nbytes
    return total


class EngineClient(Protocol):
    """What the HTTP layer may ask of an engine."""

    max_model_len: int

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Deltas of every sequence of the request (n of them), each ending with a finish_reason.

        Errors that do not depend on generation (context length, queue full, a dead engine) raise at the call,
        before the iterator is returned; only failures while generating raise from the iterator."""
        ...

    def stats(self) -> EngineStats: ...

    async def compile_structured(self, spec: StructuredOutputSpec) -> None:
        """Compile (and cache) a structured-output grammar off the engine thread; raises InvalidRequestError when
        the engine cannot enforce it, UnsupportedFeatureError when this engine has no grammar support."""
        ...

    def check_can_accept(self, num_sequences: int, *, num_reserved: int = 0) -> None:
        """Raise (QueueFullError, ServiceUnavailableError, EngineDeadError) if `num_sequences` more sequences, on
        top of `num_reserved` the caller is still preparing, would be refused now."""
        ...

    @property
    def is_dead(self) -> bool: ...

    def client_load(self, client_id: str | None) -> tuple[int, int]:
        """(sequences, tokens) the client has running or waiting; tokens count prompt plus max_tokens."""
        ...

    def held_prompt_bytes(self) -> int:
        """Bytes of model inputs (image tensors) held by the requests in the engine."""
        ...

    async def shutdown(self, timeout_s: float) -> None: ...


def resolve_max_tokens(request: GenerationRequest, max_model_len: int) -> int:
    """The request's output budget: its max_tokens, or the rest of the context when it has none. Raises
    `ContextLengthError` when the prompt leaves no room or max_tokens asks for more than is left."""
    prompt_tokens = request.prompt.num_tokens
    room = max_model_len - prompt_tokens
    if room < 1:
        raise ContextLengthError(
            f"the prompt is {prompt_tokens} tokens (image tokens included) but the model's context is "
            f"{max_model_len} tokens (--max-model-len)", param="messages")
    wanted = request.sampling.max_tokens
    if wanted is None:
        return room
    if wanted > room:
        raise ContextLengthError(
            f"max_tokens is {wanted} but only {room} tokens are left in the model's {max_model_len}-token "
            f"context after the {prompt_tokens}-token prompt (image tokens included); lower max_tokens",
            param="max_tokens")
    return wanted


@dataclasses.dataclass
class _Sequence:
    """Client-side state of one sequence: where its deltas go and how its text is made."""

    index: int
    queue: asyncio.Queue[TokenDelta | BaseException]
    detokenizer: IncrementalDetokenizer
    num_prompt_tokens: int
    want_logprobs: bool
    num_generated: int = 0
    client_id: str | None = None
    num_reserved_tokens: int = 0  # prompt + max_tokens: what the client's token quota counts
    prompt_bytes: int = 0  # this sequence's share of its prompt's model-input bytes


class AsyncEngine:
    """An `EngineClient` over an `EngineCore` running in a daemon thread."""

    def __init__(self, core: EngineCore, tokenizer: Any, *, max_model_len: int, max_sequences: int,
                 placeholder_token_ids: frozenset[int] = frozenset(), text_policy: TextPolicy | None = None) -> None:
        self._core = core
        self._tokenizer = tokenizer
        self._text_policy = text_policy or TextPolicy.from_tokenizer(tokenizer)
        self.max_model_len = max_model_len
        # image/video placeholder ids: they may only appear inside a prompt's image spans (see _check_prompt)
        self._placeholder_ids = placeholder_token_ids
        self._max_sequences = max_sequences  # running + waiting; beyond it, 429
        self._sequences: dict[str, _Sequence] = {}
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._accepting = True
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.dead = asyncio.Event()  # set when the engine loop died; the server then exits non-zero

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"vlmserve-{self._core.name}-engine", daemon=True)
        self._thread.start()
        structured = getattr(self._core, "structured", None)
        if structured is not None:
            structured.warm_up()

    @property
    def is_dead(self) -> bool:
        return self._error is not None

    @property
    def is_accepting(self) -> bool:
        return self._accepting

    @property
    def max_sequences(self) -> int:
        """Sequences this engine holds at once (running + waiting) before it answers 429."""
        return self._max_sequences

    def stats(self) -> EngineStats:
        stats = self._core.stats()
        structured = getattr(self._core, "structured", None)
        if structured is None:
            return stats
        return dataclasses.replace(stats, num_grammars_compiled=structured.num_compiled,
                                   grammar_compile_seconds=structured.compile_seconds)

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting, let running sequences finish for up to `timeout_s`, abort the rest, stop the thread."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._sequences and time.monotonic() < deadline and not self.is_dead:
            await asyncio.sleep(0.05)
        for request_id in list(self._sequences):
            self._finish(request_id, FinishReason.ABORT)
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None and self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 10.0)
        structured = getattr(self._core, "structured", None)
        if structured is not None:
            structured.shutdown()

    # --- requests --------------------------------------------------------------------------------------------

    async def compile_structured(self, spec: StructuredOutputSpec) -> None:
        structured = getattr(self._core, "structured", None)
        if structured is None:
            raise UnsupportedFeatureError("structured outputs are not supported by this engine",
                                          param="response_format")
        await structured.compile(spec)

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        # NOTE: a plain function, so every check that does not need the model raises here, at the call: a
        # streaming route calls this before its first byte and can still answer 4xx instead of an error event.
        self.check_can_accept(request.sampling.n)
        self._check_prompt(request)
        max_tokens = self._resolve_max_tokens(request)
        return self._generate(request, max_tokens)

    async def _generate(self, request: GenerationRequest, max_tokens: int) -> AsyncIterator[TokenDelta]:
        queue: asyncio.Queue[TokenDelta | BaseException] = asyncio.Queue()
        child_ids = self._submit(request, max_tokens, queue)
        remaining = set(child_ids)
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.is_finished:
                    remaining.discard(item.request_id)
                yield item
        finally:
            for child_id in remaining:  # the consumer went away (client disconnect) or failed: free the work
                self._abort(child_id)

    def _submit(self, request: GenerationRequest, max_tokens: int,
                queue: asyncio.Queue[TokenDelta | BaseException]) -> list[str]:
        params = request.sampling
        n = params.n
        child_ids = [request.request_id if n == 1 else f"{request.request_id}-{i}" for i in range(n)]
        prompt_bytes = model_input_bytes(request.prompt.model_inputs)
        for index, child_id in enumerate(child_ids):
            seed = None if params.seed is None else params.seed + index
            sampling = dataclasses.replace(params, n=1, seed=seed, max_tokens=max_tokens)
            self._sequences[child_id] = _Sequence(
                index=index, queue=queue, detokenizer=self._detokenizer(params),
                num_prompt_tokens=request.prompt.num_tokens, want_logprobs=params.logprobs,
                client_id=request.client_id, num_reserved_tokens=request.prompt.num_tokens + max_tokens,
                prompt_bytes=prompt_bytes // n)
            self._core.add_request(dataclasses.replace(request, request_id=child_id, sampling=sampling))
        self._wakeup.set()
        return child_ids

    def _detokenizer(self, params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self._tokenizer, params.stop, policy=self._text_policy,
                                      skip_special_tokens=params.skip_special_tokens,
                                      spaces_between_special_tokens=params.spaces_between_special_tokens)

    def check_can_accept(self, num_sequences: int, *, num_reserved: int = 0) -> None:
        if self._error is not None:
            raise EngineDeadError("the engine has stopped; the server is restarting")
        if not self._accepting:
            raise ServiceUnavailableError("the server is shutting down")
        if len(self._sequences) + num_reserved + num_sequences > self._max_sequences:
            raise QueueFullError(f"the server is at capacity ({self._max_sequences} sequences running or "
                                 "waiting, --max-num-seqs + --max-waiting-requests); retry shortly",
                                 retry_after_s=1.0)

    def client_load(self, client_id: str | None) -> tuple[int, int]:
        mine = [s for s in self._sequences.values() if s.client_id == client_id]
        return len(mine), sum(s.num_reserved_tokens for s in mine)

    def held_prompt_bytes(self) -> int:
        return sum(s.prompt_bytes for s in self._sequences.values())

    def _check_prompt(self, request: GenerationRequest) -> None:
        """Refuse prompts the core cannot run: they would fail inside a step and take the engine loop down."""
        prompt = request.prompt
        if prompt.num_tokens < 1:
            # NOTE: a template may render nothing (e.g. a request template of sandbox-blocked expressions, which
            # Jinja renders as empty); an empty prompt would reach the model runner and kill the engine loop.
            raise InvalidRequestError("the chat template rendered an empty prompt (0 tokens): there is nothing "
                                      "to generate from", param="messages")
        check = getattr(self._core, "check_prompt", None)  # the paged core: bidirectional blocks fit a step
        if check is not None:
            check(prompt)
        if not self._placeholder_ids:
            return
        # NOTE: special tokens typed into message text ("<|image_pad|>") tokenize to the real placeholder ids;
        # placeholders outside the images' spans have no features to fill them and crash the model's forward.
        spans = [(span.start, span.end) for span in (*prompt.image_spans, *prompt.video_spans)]
        for position, token in enumerate(prompt.token_ids):
            if token in self._placeholder_ids and not any(start <= position < end for start, end in spans):
                raise InvalidRequestError(
                    "the conversation holds an image or video placeholder token that belongs to no image sent "
                    "(special tokens typed into message text are not allowed)", param="messages")

    def _resolve_max_tokens(self, request: GenerationRequest) -> int:
        return resolve_max_tokens(request, self.max_model_len)

    def _abort(self, request_id: str) -> None:
        if self._sequences.pop(request_id, None) is not None:
            self._core.abort_request(request_id)
            self._wakeup.set()

    # --- engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._core.has_work():
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                self._core.step(self._emit)
        except BaseException as exc:
            logger.exception("the engine loop died")
            self._error = exc
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_all)

    def _emit(self, outputs: list[CoreOutput]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    # --- event loop: core outputs → deltas -------------------------------------------------------------------

    def _dispatch(self, outputs: list[CoreOutput]) -> None:
        for output in outputs:
            sequence = self._sequences.get(output.request_id)
            if sequence is None:
                continue  # aborted or already finished by a stop string
            if output.finish_reason is FinishReason.ERROR:
                logger.error("request %s failed in the engine: %s", output.request_id, output.error)
                self._sequences.pop(output.request_id, None)
                sequence.queue.put_nowait(InternalError("the engine failed while generating this request"))
                continue
            self._deliver(output, sequence)

    def _deliver(self, output: CoreOutput, sequence: _Sequence) -> None:
        detokenizer = sequence.detokenizer
        token_ids = output.new_token_ids
        text = detokenizer.add_tokens(token_ids)
        finish = output.finish_reason
        if detokenizer.stopped_by is not None and finish is None:
            finish = FinishReason.STOP
            self._core.abort_request(output.request_id)
        sequence.num_generated += len(token_ids)
        delta = TokenDelta(request_id=output.request_id, index=sequence.index, text=text, token_ids=token_ids,
                           num_prompt_tokens=sequence.num_prompt_tokens, num_generated_tokens=sequence.num_generated,
                           num_cached_tokens=output.num_cached_tokens, timings=output.timings)
        if sequence.want_logprobs and output.new_logprobs:
            delta.logprobs = [lp for lp in output.new_logprobs if lp is not None]
            delta.token_texts = [detokenizer.token_text(lp.chosen.token_id) for lp in delta.logprobs]
            delta.top_token_texts = [[detokenizer.token_text(alt.token_id) for alt in lp.top] for lp in delta.logprobs]
        if finish is not None:
            delta.text += detokenizer.flush()
            delta.finish_reason = finish
            self._sequences.pop(output.request_id, None)
        sequence.queue.put_nowait(delta)

    def _finish(self, request_id: str, reason: FinishReason) -> None:
        sequence = self._sequences.pop(request_id, None)
        if sequence is None:
            return
        self._core.abort_request(request_id)
        sequence.queue.put_nowait(TokenDelta(
            request_id=request_id, index=sequence.index, text=sequence.detokenizer.flush(), token_ids=[],
            num_prompt_tokens=sequence.num_prompt_tokens, num_generated_tokens=sequence.num_generated,
            finish_reason=reason))

    def _fail_all(self) -> None:
        for request_id, sequence in list(self._sequences.items()):
            self._sequences.pop(request_id, None)
            sequence.queue.put_nowait(EngineDeadError("the engine stopped while generating this request"))
        self.dead.set()
