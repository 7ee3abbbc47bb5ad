"""The fallback engine core: batched `model.generate` for architectures the paged engine cannot run.

Requests waiting when a batch starts run together in one left-padded `generate` call; requests arriving during it
wait for the next. Sampling is still ours (per request, seeded, penalties, logprobs): a logits processor draws
each row's token with `Sampler` and hands `generate` a distribution with all mass on it, so `generate` itself
runs greedy. A stopping criterion ends each row on its own terms (end tokens, max_tokens, abort).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from vlmserve.config import EngineConfig
from vlmserve.engine.inbox import Inbox
from vlmserve.engine.protocol import CoreOutput, Emit
from vlmserve.engine.sampler import Sampler, SequenceSampling
from vlmserve.engine.stopping import finish_reason, make_sampling
from vlmserve.engine.structured import StructuredOutputs
from vlmserve.engine.text_policy import TextPolicy
from vlmserve.engine.vision_timing import TowerTimer, share_by_images
from vlmserve.errors import RequestError
from vlmserve.models.base import ModelAdapter
from vlmserve.types import EngineStats, FinishReason, GenerationRequest, RequestTimings

logger = logging.getLogger(__name__)

#: batches in a row in which every request and the health probe failed before the engine counts as broken
_MAX_CONSECUTIVE_FAILED_BATCHES = 3
_PROBE_TEXT = "ok"


@dataclass
class _Row:
    request: GenerationRequest
    sampling: SequenceSampling
    finish_reason: FinishReason | None = None
    output_token_ids: list[int] = field(default_factory=list)
    #: tokens the current `generate` call has produced for this row; fewer than `output_token_ids` while a
    #: retried row replays what it had already streamed
    num_replayed: int = 0
    #: for /metrics, sent with the row's first token (see `_timings`)
    first_scheduled_time: float | None = None
    vision_encoder_s: float = 0.0
    is_timing_sent: bool = False

    @property
    def is_done(self) -> bool:
        return self.finish_reason is not None


class GenerateEngineCore:
    """`EngineCore` running `model.generate` over batches of waiting requests."""

    name = "generate"

    def __init__(self, adapter: ModelAdapter, config: EngineConfig) -> None:
        self._adapter = adapter
        self.max_model_len = adapter.max_model_len
        self._max_batch = config.max_generate_batch
        self._sampler = Sampler(adapter.device)
        self.structured = StructuredOutputs(adapter.tokenizer, eos_token_ids=adapter.eos_token_ids)
        self._text_policy = TextPolicy.from_tokenizer(adapter.tokenizer)  # for stop strings (engine.stopping)
        self._inbox = Inbox()
        self._waiting: deque[GenerationRequest] = deque()  # engine thread only, like the two below
        self._aborted: set[str] = set()  # ids of running rows whose clients went away
        self._running: list[_Row] = []
        self._counters = {"steps": 0, "generated": 0, "prompt": 0, "aborted": 0, "finished": 0}
        self._consecutive_failures = 0
        self._started = time.monotonic()
        self._tower = TowerTimer(adapter.model)  # the tower runs inside model.generate: timed by hooks

    def add_request(self, request: GenerationRequest) -> None:
        self._inbox.add(request)

    def abort_request(self, request_id: str) -> None:
        self._inbox.abort(request_id)

    def has_work(self) -> bool:
        return not self._inbox.is_empty() or bool(self._waiting)

    def stats(self) -> EngineStats:
        num_waiting, num_running = len(self._waiting), sum(not r.is_done for r in self._running)
        c = self._counters
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return EngineStats(num_running=num_running, num_waiting=num_waiting, num_steps=c["steps"],
                           num_generated_tokens=c["generated"], num_prompt_tokens=c["prompt"],
                           num_aborted=c["aborted"], num_finished=c["finished"],
                           generation_tokens_per_s=c["generated"] / elapsed, engine=self.name)

    def step(self, emit: Emit) -> None:
        self._drain_inbox()
        rows = self._take_batch(emit)
        if not rows:
            return
        try:
            failed = self._run_isolated(rows, emit)
        finally:
            for row in rows:
                self._sampler.release(row.sampling)
            self._aborted.clear()
            self._running = []
        if not failed or self._probe_succeeds():
            self._consecutive_failures = 0
            return
        # Only when our own probe fails too is the engine, not a request, at fault.
        self._consecutive_failures += 1
        if self._consecutive_failures >= _MAX_CONSECUTIVE_FAILED_BATCHES:
            raise RuntimeError("every request and the health probe failed in several consecutive batches")

    def _run_isolated(self, rows: list[_Row], emit: Emit) -> bool:
        """Run `rows` as one batch; if it fails, run its unfinished rows alone so only the culprits fail.

        A row that had already streamed tokens is re-run with those tokens forced (see `_advance`): nothing is
        sent twice, and its sampler state (generator, penalties, grammar) simply continues. Returns True when
        every row failed without a token (what the health accounting looks at).
        """
        try:
            self._generate(rows, emit)
            return False
        except Exception as exc:  # incl. out-of-memory: the batch's requests fail, the engine keeps serving
            logger.warning("generate failed for a batch of %d (%s)", len(rows), type(exc).__name__, exc_info=exc)
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            pending = [r for r in rows if not r.is_done]
            if len(rows) == 1:
                emit(_failed(pending, exc))
                return all(not r.output_token_ids for r in rows)
        if not pending:
            return False
        return all([self._run_isolated([row], emit) for row in pending])

    def _probe_succeeds(self) -> bool:
        """One token of a short text prompt of our own: True when the model itself still runs."""
        try:
            inputs = dict(self._adapter.processor(text=[_PROBE_TEXT], return_tensors="pt"))
            inputs = {k: v.to(self._adapter.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            with torch.inference_mode():
                self._adapter.model.generate(**inputs, generation_config=GenerationConfig(
                    max_new_tokens=1, do_sample=False, num_beams=1,
                    pad_token_id=getattr(self._adapter, "pad_token_id", None)))
        except Exception as exc:
            logger.error("the engine's health probe failed too (%s)", type(exc).__name__)
            return False
        return True

    def _drain_inbox(self) -> None:
        """Queue new requests; drop aborted waiting ones; remember aborted running ones for `_advance`."""
        new, aborts = self._inbox.take()
        self._waiting.extend(new)
        if not aborts:
            return
        gone = set(aborts)
        kept = deque(r for r in self._waiting if r.request_id not in gone)
        self._counters["aborted"] += len(self._waiting) - len(kept)
        self._waiting = kept
        self._aborted |= gone & {r.request.request_id for r in self._running}

    def _take_batch(self, emit: Emit) -> list[_Row]:
        rows: list[_Row] = []
        while self._waiting and len(rows) < self._max_batch:
            request = self._waiting.popleft()
            try:
                rows.append(self._make_row(request))
            except RequestError as exc:  # a grammar the API did not compile first, and that does not compile
                logger.warning("request %s refused by the engine: %s", request.request_id, exc.message)
                emit([CoreOutput(request.request_id, [], FinishReason.ERROR, error=exc.message)])
        self._running = rows
        return rows

    def _make_row(self, request: GenerationRequest) -> _Row:
        sampling = make_sampling(request, eos_token_ids=self._adapter.eos_token_ids, device=self._adapter.device,
                                 tokenizer=self._adapter.tokenizer, text_policy=self._text_policy,
                                 structured=self.structured)
        row = _Row(request=request, sampling=sampling)
        row.sampling.output_token_ids = row.output_token_ids
        return row

    @torch.inference_mode()
    def _generate(self, rows: list[_Row], emit: Emit) -> None:
        now = time.monotonic()
        for row in rows:
            row.num_replayed = 0
            if row.first_scheduled_time is None:
                row.first_scheduled_time = now
        self._tower.take()  # what ran before this call (the health probe) is no row's
        inputs = self._adapter.collate([r.request.prompt for r in rows])
        self._counters["prompt"] += sum(r.request.prompt.num_tokens for r in rows)
        max_new = max(int(r.request.sampling.max_tokens or 1) for r in rows)
        config = GenerationConfig(max_new_tokens=max_new, do_sample=False, num_beams=1,
                                  pad_token_id=getattr(self._adapter, "pad_token_id", None), eos_token_id=None)
        self._adapter.model.generate(
            **inputs, generation_config=config,
            logits_processor=LogitsProcessorList([_DrawTokens(self, rows, emit)]),
            stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]))

    def _advance(self, rows: list[_Row], scores: torch.Tensor, emit: Emit) -> torch.Tensor:
        """Choose every live row's next token, record it, emit it; return scores forcing those tokens."""
        self._drain_inbox()
        _share_tower_time(rows, self._tower.take())
        aborted = self._aborted
        live = [i for i, r in enumerate(rows) if not r.is_done and r.request.request_id not in aborted]
        for r in rows:
            if not r.is_done and r.request.request_id in aborted:
                r.finish_reason = FinishReason.ABORT
                self._sampler.release(r.sampling)
                self._counters["aborted"] += 1
        forced = torch.full_like(scores, float("-inf"))
        forced[:, 0] = 0.0  # rows already done: any token; they are ignored
        replaying = [i for i in live if rows[i].num_replayed < len(rows[i].output_token_ids)]
        for i in replaying:  # a retried row: its streamed tokens again, neither sampled nor emitted
            forced[i, 0] = float("-inf")
            forced[i, rows[i].output_token_ids[rows[i].num_replayed]] = 0.0
            rows[i].num_replayed += 1
        live = [i for i in live if i not in replaying]
        if not live:
            return forced
        drawn = self._sampler(scores[live], [rows[i].sampling for i in live])
        outputs = []
        for j, i in enumerate(live):
            row, token = rows[i], drawn.token_ids[j]
            row.output_token_ids.append(token)
            row.num_replayed += 1
            row.finish_reason = finish_reason(row.sampling, token, num_tokens=row.request.prompt.num_tokens
                                              + len(row.output_token_ids), max_model_len=self.max_model_len)
            if row.is_done:
                self._sampler.release(row.sampling)
                self._counters["finished"] += 1
            forced[i, 0] = float("-inf")
            forced[i, token] = 0.0
            outputs.append(CoreOutput(row.request.request_id, [token], row.finish_reason,
                                      new_logprobs=[drawn.logprobs[j]] if drawn.logprobs[j] else None,
                                      timings=_timings(row)))
        self._counters["steps"] += 1
        self._counters["generated"] += len(live)
        emit(outputs)
        return forced


def _share_tower_time(rows: list[_Row], seconds: float) -> None:
    """The tower seconds of a `generate` call's prefill, shared by image count over the rows it encoded."""
    if seconds <= 0.0:
        return
    pending = [r for r in rows if not r.is_timing_sent]
    counts = [len(r.request.prompt.image_hashes) for r in pending]
    for row, share in zip(pending, share_by_images(seconds, counts), strict=True):
        row.vision_encoder_s += share


def _timings(row: _Row) -> RequestTimings | None:
    if row.is_timing_sent or row.first_scheduled_time is None:
        return None
    row.is_timing_sent = True
    return RequestTimings(queue_time_s=row.first_scheduled_time - row.request.arrival_time,
                          vision_encoder_s=row.vision_encoder_s,
                          num_images_encoded=len(row.request.prompt.image_hashes))


def _failed(rows: list[_Row], exc: Exception) -> list[CoreOutput]:
    return [CoreOutput(r.request.request_id, [], FinishReason.ERROR, error=type(exc).__name__) for r in rows]


class _DrawTokens(LogitsProcessor):
    """A transformers logits processor that makes `generate` take the tokens our sampler drew."""

    def __init__(self, core: GenerateEngineCore, rows: list[_Row], emit: Emit) -> None:
        self._core, self._rows, self._emit = core, rows, emit

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self._core._advance(self._rows, scores, self._emit)


class _RowsDone(StoppingCriteria):
    """A transformers stopping criterion: a row is done when our bookkeeping says so."""

    def __init__(self, rows: list[_Row]) -> None:
        self._rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return torch.tensor([r.is_done for r in self._rows], device=input_ids.device)
