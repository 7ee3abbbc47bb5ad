"""The paged engine core: continuous batching of any transformers VLM over a paged KV cache.

    step = take new requests and aborts → schedule → execute (one forward over every scheduled token) → update

No I/O happens here: requests arrive through thread-safe `add_request`/`abort_request`, results leave through
`emit`. See `scheduler` (what runs), `model_runner` (how it runs), `kv_cache` (where KV lives).
"""

from __future__ import annotations

import logging
import time
from collections import deque

import torch

from vlmserve.config import EngineConfig
from vlmserve.engine.cross_state import CrossKVStore
from vlmserve.engine.image_cache import ImageEmbeddingCache
from vlmserve.engine.inbox import Inbox
from vlmserve.engine.kv_cache import KVCache
from vlmserve.engine.kv_cache_manager import KVCacheManager
from vlmserve.engine.model_runner import ModelRunner
from vlmserve.engine.parallel import group as parallel_group
from vlmserve.engine.parallel.step import StepChannel
from vlmserve.engine.protocol import CoreOutput, Emit
from vlmserve.engine.recurrent_state import RecurrentStates, StateSlots
from vlmserve.engine.request import Sequence
from vlmserve.engine.sampler import SamplerOutput
from vlmserve.engine.scheduler import ScheduledChunk, Scheduler
from vlmserve.engine.stopping import finish_reason, make_sampling
from vlmserve.engine.structured import StructuredOutputs
from vlmserve.engine.text_policy import TextPolicy
from vlmserve.errors import ContextLengthError, RequestError
from vlmserve.models.base import ModelAdapter
from vlmserve.types import (
    EngineStats,
    FinishReason,
    GenerationRequest,
    PreparedPrompt,
    RequestTimings,
    SamplingParams,
)

logger = logging.getLogger(__name__)

#: KV blocks on devices where memory is not profiled (CPU, MPS) unless --num-kv-blocks says otherwise
DEFAULT_CPU_BLOCKS = 4096
#: steps in a row in which every sequence failed before the engine counts as broken
_MAX_CONSECUTIVE_FAILED_STEPS = 3
#: the health probe's prompt, and the token it falls back to (id 0 exists in every vocabulary)
_PROBE_TEXT = "ok"
_PROBE_TOKEN_ID = 0


class PagedEngineCore:
    """`EngineCore` with continuous batching, chunked prefill, preemption and an image-aware prefix cache."""

    name = "paged"

    def __init__(self, adapter: ModelAdapter, config: EngineConfig) -> None:
        self._adapter = adapter
        num_blocks, self.max_model_len = kv_cache_size(adapter, config)
        tp_group = parallel_group.current() if config.tensor_parallel_size > 1 else None
        if config.tensor_parallel_size > 1 and tp_group is None:
            raise RuntimeError("--tensor-parallel-size > 1: start the engine through vlmserve.engine.parallel.launch")
        if tp_group is not None and adapter.recurrent_layout is not None:
            # NOTE: the step plan workers receive carries no recurrent-state slots, and the state pool is not
            # sharded: a hybrid decoder runs on one device
            raise RuntimeError(f"--tensor-parallel-size > 1 does not support {adapter.family}: its linear-attention "
                               "layers' per-sequence state is not sharded across ranks")
        if tp_group is not None and adapter.has_cross_attention:
            raise RuntimeError(f"--tensor-parallel-size > 1 does not support {adapter.family}: its cross-attention "
                               "layers' per-request K/V are not sharded across ranks")
        states, slots = self._recurrent_states(adapter, config)
        cross_kv = CrossKVStore() if adapter.has_cross_attention else None
        self.kv = KVCacheManager(num_blocks, block_size=config.block_size,
                                 enable_prefix_caching=config.enable_prefix_caching, state_slots=slots,
                                 cross_kv=cross_kv, scope=adapter.prefix_cache_scope)
        cache = KVCache.allocate(adapter.kv_layout, num_blocks, config.block_size, dtype=adapter.dtype,
                                 device=adapter.device)
        self.scheduler = Scheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens)
        self.image_cache = ImageEmbeddingCache(config.image_cache_bytes)
        self.runner = ModelRunner(adapter, cache, self.image_cache, max_num_seqs=config.max_num_seqs,
                                  max_model_len=self.max_model_len, enable_cuda_graphs=config.enable_cuda_graphs,
                                  compile_decoder=config.compile_decoder,
                                  enable_vision_graphs=config.enable_vision_graphs,
                                  channel=StepChannel(tp_group) if tp_group is not None else None,
                                  states=states, cross_kv=cross_kv)
        self.structured = StructuredOutputs(adapter.tokenizer, eos_token_ids=adapter.eos_token_ids)
        self._text_policy = TextPolicy.from_tokenizer(adapter.tokenizer)  # for stop strings (engine.stopping)
        self._inbox = Inbox()
        self._refused: list[CoreOutput] = []  # requests refused on arrival, reported by the next step
        self._sequences: dict[str, Sequence] = {}
        self._consecutive_failures = 0
        self._health_probe: PreparedPrompt | None = None
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated) of recent steps
        self._counters = {"steps": 0, "generated": 0, "prompt": 0, "aborted": 0, "finished": 0}
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, config.block_size,
                    num_blocks * KVCache.bytes_per_block(adapter.kv_layout, config.block_size, adapter.dtype) / 2**20)

    # --- thread-safe inbox -----------------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest) -> None:
        self._inbox.add(request)

    def abort_request(self, request_id: str) -> None:
        self._inbox.abort(request_id)

    def has_work(self) -> bool:
        return not self._inbox.is_empty() or self.scheduler.has_work()

    # --- the loop body ---------------------------------------------------------------------------------------

    def step(self, emit: Emit) -> None:
        self._take_inbox()
        if self._refused:
            emit(self._refused)
            self._refused = []
        scheduled = self.scheduler.schedule()
        for preempted in scheduled.preempted:
            self.runner.sampler.release(preempted.sampling)  # its sampling row is rebuilt when it runs again
        if not scheduled.chunks:
            return
        _stamp_first_schedule(scheduled.chunks)
        try:
            sequences, sampled = self.runner.execute(scheduled.chunks)
        except Exception as exc:  # incl. CUDA out-of-memory: find the culprit, keep serving the others
            self._recover(scheduled.chunks, exc, emit)
            return
        self._consecutive_failures = 0
        emit(self._update(scheduled.chunks, sequences, sampled))

    def _recover(self, chunks: list[ScheduledChunk], exc: Exception, emit: Emit) -> None:
        """After a failed step, run its chunks one at a time: only the sequences that fail alone are failed.

        Re-running is safe: a failed step changed no sequence's progress, a chunk rewrites the same cache slots, and
        a hybrid decoder's recurrent states are written back only by a step that succeeded. The prefix cache needs no
        cleaning: blocks become findable only after the step that wrote them completed, so none of the failed step's
        blocks was ever findable. Whether the *engine* is broken is decided by a health probe that no client
        controls, never by how many client requests failed: a crafted request that fails every time it runs is that
        request's error (a 500 for it), however often it is sent. Only when the probe fails too, step after step,
        does the error propagate and the server stop (to be restarted by its supervisor).
        """
        logger.warning("engine step of %d sequences failed (%s); retrying them one by one", len(chunks),
                       type(exc).__name__, exc_info=exc)
        if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        failures = 0
        for chunk in chunks if len(chunks) > 1 else []:
            try:
                sequences, sampled = self.runner.execute([chunk])
            except Exception as single:
                failures += 1
                emit(self._fail([chunk], single))
            else:
                emit(self._update([chunk], sequences, sampled))
        if len(chunks) == 1:
            failures = 1
            emit(self._fail(chunks, exc))
        if failures < len(chunks) or self._probe_succeeds():
            self._consecutive_failures = 0
            return
        self._consecutive_failures += 1
        if self._consecutive_failures >= _MAX_CONSECUTIVE_FAILED_STEPS:
            raise RuntimeError("every sequence and the health probe failed in several consecutive steps") from exc

    def _probe_succeeds(self) -> bool:
        """Run a one-token text prompt of our own through the model: True when the engine itself still works."""
        prompt = self._probe_prompt()
        probe_request = GenerationRequest(request_id="vlmserve-health-probe", prompt=prompt,
                                          sampling=SamplingParams(max_tokens=1, temperature=0.0))
        probe = self._new_sequence(probe_request)
        if not self.kv.allocate_slots(probe, prompt.num_tokens):
            # NOTE: no free block to probe with means other sequences hold the pool, and they ran in this step
            # or will in the next one; their success or failure is the evidence, so do not count this step.
            return True
        try:
            self.runner.execute([ScheduledChunk(probe, 0, prompt.num_tokens)])
        except Exception as exc:
            logger.error("the engine's health probe failed too (%s)", type(exc).__name__)
            return False
        finally:
            probe.release_prompt_state()
            self.runner.sampler.release(probe.sampling)
            self.kv.free(probe)  # never cached: the probe's step is not a completed step of any sequence
        return True

    def _probe_prompt(self) -> PreparedPrompt:
        """A short text prompt prepared by the model's own processor (some models need its extra inputs)."""
        if self._health_probe is None:
            processor = self._adapter.processor
            try:
                inputs = dict(processor(text=[_PROBE_TEXT], return_tensors="pt"))
                token_ids = [int(t) for t in inputs.pop("input_ids")[0].tolist()]
                inputs.pop("attention_mask", None)
            except Exception:  # NOTE: a processor that cannot do this still gets a bare probe
                inputs, token_ids = {}, []
            self._health_probe = PreparedPrompt(token_ids=token_ids or [_PROBE_TOKEN_ID], model_inputs=inputs)
        return self._health_probe

    def _take_inbox(self) -> None:
        new, aborts = self._inbox.take()
        for request in new:
            try:
                sequence = self._make_sequence(request)
            except RequestError as exc:  # a grammar the API did not compile first, and that does not compile
                logger.warning("request %s refused by the engine: %s", request.request_id, exc.message)
                self._refused.append(CoreOutput(request.request_id, [], FinishReason.ERROR, error=exc.message))
                continue
            self._sequences[request.request_id] = sequence
            self.scheduler.add(sequence)
        for request_id in aborts:
            aborted = self._sequences.pop(request_id, None)
            if aborted is not None:
                self._finish_sequence(aborted)  # its blocks are free before this step is scheduled
                self._counters["aborted"] += 1

    def _finish_sequence(self, sequence: Sequence) -> None:
        self.scheduler.finish(sequence)
        self.runner.sampler.release(sequence.sampling)

    def check_prompt(self, prompt: PreparedPrompt) -> tuple[tuple[int, int], ...]:
        """The prompt's bidirectional attention blocks; raises ContextLengthError for one longer than a step.
        Safe to call from any thread (the client calls it before accepting a request, to answer 400)."""
        blocks = self._adapter.attention_blocks(prompt)
        budget = self.scheduler.max_num_batched_tokens
        longest = max((stop - start for start, stop in blocks), default=0)
        if longest > budget:
            # the block's tokens attend to each other, so they must all be computed in one step
            raise ContextLengthError(
                f"the prompt has a bidirectional attention block of {longest} tokens (images and, for prefix-LM "
                f"models, the prompt text), more than one engine step's {budget} tokens; raise "
                "--max-num-batched-tokens", param="messages")
        return blocks

    def _make_sequence(self, request: GenerationRequest) -> Sequence:
        sequence = self._new_sequence(request)
        sequence.attention_blocks = self.check_prompt(request.prompt)
        self._counters["prompt"] += request.prompt.num_tokens
        return sequence

    def _new_sequence(self, request: GenerationRequest) -> Sequence:
        sampling = make_sampling(request, eos_token_ids=self._adapter.eos_token_ids, device=self._adapter.device,
                                 tokenizer=self._adapter.tokenizer, text_policy=self._text_policy,
                                 structured=self.structured)
        sequence = Sequence(request=request, sampling=sampling)
        sampling.output_token_ids = sequence.output_token_ids  # the sampler sees tokens as they are appended
        return sequence

    def _update(self, chunks: list[ScheduledChunk], sampled_sequences: list[Sequence],
                sampled: SamplerOutput | None) -> list[CoreOutput]:
        for chunk in chunks:
            sequence = chunk.sequence
            sequence.num_computed_tokens = chunk.end
            self.kv.cache_full_blocks(sequence)  # their KV is written now, and only now may others find them
            if chunk.end >= sequence.num_prompt_tokens:
                sequence.release_prompt_state()
        outputs: list[CoreOutput] = []
        if sampled is None:
            return outputs
        for sequence, token, logprobs in zip(sampled_sequences, sampled.token_ids, sampled.logprobs, strict=True):
            sequence.output_token_ids.append(token)
            finish = finish_reason(sequence.sampling, token, num_tokens=sequence.num_tokens,
                                   max_model_len=self.max_model_len)
            if finish is not None:
                self._finish_sequence(sequence)
                self._sequences.pop(sequence.request_id, None)
                self._counters["finished"] += 1
            outputs.append(CoreOutput(sequence.request_id, [token], finish,
                                      new_logprobs=[logprobs] if logprobs is not None else None,
                                      num_cached_tokens=sequence.num_cached_tokens, timings=_timings(sequence)))
        self._count_step(len(outputs))
        return outputs

    def _fail(self, chunks: list[ScheduledChunk], exc: Exception) -> list[CoreOutput]:
        logger.error("request failed in the engine: %s", type(exc).__name__, exc_info=exc)
        outputs = []
        for chunk in chunks:
            sequence = chunk.sequence
            if self._sequences.pop(sequence.request_id, None) is not None:
                self._finish_sequence(sequence)
                outputs.append(CoreOutput(sequence.request_id, [], FinishReason.ERROR, error=type(exc).__name__))
        return outputs

    # --- stats -----------------------------------------------------------------------------------------------

    def _count_step(self, generated: int) -> None:
        now = time.monotonic()
        self._counters["steps"] += 1
        self._counters["generated"] += generated
        self._recent.append((now, generated))
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()

    def stats(self) -> EngineStats:
        pool, c = self.kv.pool, self._counters
        window = self._recent[-1][0] - self._recent[0][0] if len(self._recent) > 1 else 0.0
        rate = sum(n for _, n in list(self._recent)[1:]) / window if window > 0 else 0.0
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_kv_blocks_total=pool.num_blocks, num_kv_blocks_free=pool.num_free, num_kv_blocks_cached=pool.num_cached,
            prefix_cache_queries=pool.num_queries, prefix_cache_hits=pool.num_hits,
            image_cache_hits=self.image_cache.hits["image"], image_cache_misses=self.image_cache.misses["image"],
            video_cache_hits=self.image_cache.hits["video"], video_cache_misses=self.image_cache.misses["video"],
            num_preemptions=self.scheduler.num_preemptions, num_steps=c["steps"], num_generated_tokens=c["generated"],
            num_prompt_tokens=c["prompt"], generation_tokens_per_s=rate, num_aborted=c["aborted"],
            num_finished=c["finished"], engine=self.name)

    @staticmethod
    def _recurrent_states(adapter: ModelAdapter, config: EngineConfig
                          ) -> tuple[RecurrentStates | None, StateSlots | None]:
        """A hybrid decoder's state pool: one slot per running sequence plus one for the health probe."""
        layout = adapter.recurrent_layout
        if layout is None:
            return None, None
        num_slots = config.max_num_seqs + 1
        if config.enable_prefix_caching:
            logger.info("prefix caching off for %s: its %d linear-attention layers keep a recurrent state that a "
                        "cached KV block cannot restore", adapter.family, len(layout.layers))
        logger.info("recurrent state: %d slots of %.1f MiB (%d linear-attention layers)", num_slots,
                    layout.bytes_per_sequence(adapter.dtype) / 2**20, len(layout.layers))
        states = RecurrentStates.allocate(layout, num_slots, dtype=adapter.dtype, device=adapter.device)
        return states, StateSlots(num_slots)


def kv_cache_size(adapter: ModelAdapter, config: EngineConfig) -> tuple[int, int]:
    """(KV blocks, context limit) of the engine's cache. With tensor parallelism every rank computes its own and
    all take the smallest (the memory profile is a forward all ranks run together, in the same order)."""
    num_blocks = config.num_kv_blocks or _default_num_blocks(adapter, config)
    tp_group = parallel_group.current() if config.tensor_parallel_size > 1 else None
    if tp_group is not None:
        num_blocks = tp_group.agree_min(num_blocks)
    # A sequence must fit the whole pool alone, or preemption could never make room for it.
    max_model_len = min(adapter.max_model_len, num_blocks * config.block_size)
    if max_model_len < adapter.max_model_len:
        logger.warning("context limited to %d tokens: the KV cache holds %d blocks of %d tokens "
                       "(raise --num-kv-blocks or --kv-cache-memory-fraction)", max_model_len,
                       num_blocks, config.block_size)
    return num_blocks, max_model_len


def _default_num_blocks(adapter: ModelAdapter, config: EngineConfig) -> int:
    if adapter.device.type != "cuda":
        return DEFAULT_CPU_BLOCKS
    from vlmserve.engine.memory import profile_num_blocks

    return profile_num_blocks(adapter, config)


def _stamp_first_schedule(chunks: list[ScheduledChunk]) -> None:
    now = time.monotonic()
    for chunk in chunks:
        if chunk.sequence.first_scheduled_time is None:
            chunk.sequence.first_scheduled_time = now


def _timings(sequence: Sequence) -> RequestTimings | None:
    """The sequence's queue and tower timings, once: on its first output (later outputs carry None)."""
    if sequence.is_timing_sent or sequence.first_scheduled_time is None:
        return None
    sequence.is_timing_sent = True
    return RequestTimings(queue_time_s=sequence.first_scheduled_time - sequence.request.arrival_time,
                          vision_encoder_s=sequence.vision_encoder_s, num_images_encoded=sequence.num_images_encoded)
