"""Owns torch for the paged engine: packs a step's chunks into one ragged batch, runs the decoder, samples.

A step's input is one row per scheduled token, all sequences concatenated:
- embeddings: prompt tokens take the prompt's embeddings (text embeddings with image features merged, computed
  once per prompt when its prefill starts); generated tokens take `embed_tokens`;
- positions: the prompt's own (M-RoPE rows included, from the model's helper), generated token i at i + rope_delta
  on every row — the delta is kept per sequence, as is a dynamic-NTK rotary factor (Qwen-VL-Chat);
- attention metadata: cache slots, per-sequence block tables and lengths (see `engine.attention`).
The decoder runs once on all rows; logits are taken only at each sequence's last row when that row is its newest
token.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from vlmserve.engine import attention, recurrent_state
from vlmserve.engine.attention import AttentionBatch
from vlmserve.engine.cross_state import CrossKVStore
from vlmserve.engine.cuda_graphs import DecodeGraphs
from vlmserve.engine.image_cache import ImageEmbeddingCache
from vlmserve.engine.kv_cache import KVCache
from vlmserve.engine.parallel.step import EAGER, GRAPHED, ForwardPlan, StepChannel
from vlmserve.engine.recurrent_state import RecurrentStates, RecurrentStep
from vlmserve.engine.request import Sequence
from vlmserve.engine.sampler import Sampler, SamplerOutput
from vlmserve.engine.scheduler import ScheduledChunk
from vlmserve.engine.vision_timing import share_by_images, timed
from vlmserve.models import cross_attention
from vlmserve.models.base import ModelAdapter
from vlmserve.types import PreparedPrompt

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    inputs_embeds: torch.Tensor  # (1, T, hidden)
    position_ids: torch.Tensor  # (rows, 1, T) or (1, T)
    attention: AttentionBatch
    sample_rows: list[int]  # row index of each sampling chunk's last token
    sample_sequences: list[Sequence]
    #: per-token decoder inputs of the step's prompt rows (Qwen3-VL deepstack), as decoder keyword arguments
    decoder_extras: dict[str, Any]


class _Rows:
    """A step's input rows in order: prompt slices (embeddings and positions already computed) and generated
    tokens, whose embeddings and positions are made in one call each for the whole step (a decode step of B
    sequences then costs a handful of kernels, not a handful per sequence)."""

    def __init__(self) -> None:
        self.count = 0
        self._prompt: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (first row, embeds, positions)
        self._deepstack: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (first row, visual mask, features)
        self._ids: list[int] = []
        self._positions: list[int] = []
        self._at: list[int] = []  # the row of each generated token
        self._ntk: list[tuple[int, int, float]] = []  # (first row, rows, alpha) of sequences with a scaled rotary

    def add_prompt(self, embeds: torch.Tensor, positions: torch.Tensor,
                   deepstack: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`deepstack`: (visual mask of these rows, (layers, visual rows, hidden) features), if the family has it."""
        if deepstack is not None and bool(deepstack[0].any()):
            self._deepstack.append((self.count, *deepstack))
        self._prompt.append((self.count, embeds, positions))
        self.count += embeds.shape[0]

    def scale_rotary(self, first_row: int, alpha: float) -> None:
        """Rows `first_row`.. up to the current end belong to a sequence whose rotary base uses NTK factor alpha."""
        if alpha != 1.0 and self.count > first_row:
            self._ntk.append((first_row, self.count - first_row, alpha))

    def decoder_extras(self, device: torch.device) -> dict[str, Any]:
        """Per-row decoder keyword arguments for this step: Qwen3-VL's deepstack inputs where an image row is in
        it, Qwen-VL-Chat's per-row dynamic-NTK factors where a sequence has one; empty otherwise."""
        extras: dict[str, Any] = {}
        if self._ntk:
            alphas = torch.ones(self.count, dtype=torch.float64)
            for row, count, alpha in self._ntk:
                alphas[row:row + count] = alpha
            extras["ntk_alphas"] = alphas.to(device)
        if not self._deepstack:
            return extras
        mask = torch.zeros(1, self.count, dtype=torch.bool, device=device)
        for row, visual, _ in self._deepstack:
            mask[0, row:row + visual.shape[0]] = visual
        layers = torch.cat([features for _, _, features in self._deepstack], dim=1)
        return {**extras, "visual_pos_masks": mask, "deepstack_visual_embeds": list(layers.unbind(0))}

    def add_generated(self, token_ids: list[int], first_position: int) -> None:
        n = len(token_ids)
        self._ids += token_ids
        self._positions += range(first_position, first_position + n)
        self._at += range(self.count, self.count + n)
        self.count += n

    def build(self, adapter: ModelAdapter, num_position_rows: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (rows, hidden), positions (position rows, rows))."""
        generated = None
        if self._ids:
            generated = (adapter.embed_tokens(torch.tensor(self._ids, device=device)),
                         torch.tensor(self._positions, device=device).expand(num_position_rows, -1))
            if not self._prompt:
                return generated
        if len(self._prompt) == 1 and generated is None:
            return self._prompt[0][1], self._prompt[0][2]
        first = self._prompt[0][1]
        embeds = first.new_empty(self.count, first.shape[-1])
        positions = torch.empty(num_position_rows, self.count, dtype=torch.long, device=device)
        for row, part_embeds, part_positions in self._prompt:
            embeds[row:row + part_embeds.shape[0]] = part_embeds
            positions[:, row:row + part_embeds.shape[0]] = part_positions
        if generated is not None:
            at = torch.tensor(self._at, device=device)
            embeds[at] = generated[0].to(embeds.dtype)
            positions[:, at] = generated[1]
        return embeds, positions


class ModelRunner:
    def __init__(self, adapter: ModelAdapter, cache: KVCache, image_cache: ImageEmbeddingCache, *,
                 max_num_seqs: int, max_model_len: int, enable_cuda_graphs: bool,
                 compile_decoder: bool = False, enable_vision_graphs: bool = False,
                 channel: StepChannel | None = None, computes_logits: bool = True,
                 states: RecurrentStates | None = None, cross_kv: CrossKVStore | None = None) -> None:
        """`channel`: with tensor parallelism, rank 0's runner sends each forward's inputs through it first (the
        workers run the same forward on their shards); `computes_logits` is False on the workers. `states`: a
        hybrid decoder's recurrent-state pool (`engine.recurrent_state`). `cross_kv`: the per-sequence cross-attention
        K/V of a cross-attention decoder (Mllama; `engine.cross_state`)."""
        self.adapter = adapter
        self._channel = channel
        self.cache = cache
        self.image_cache = image_cache
        self.states = states
        self.device = adapter.device
        self.sampler = Sampler(self.device)
        self._rows = adapter.num_position_rows
        attention.install(adapter.text_model)
        if states is not None:
            recurrent_state.install(adapter, attention.current_batch)
        self.cross_kv = cross_kv
        if cross_kv is not None:
            cross_attention.install(adapter.text_model, attention.current_batch)
        self._graphs: DecodeGraphs | None = None
        if enable_cuda_graphs and self.device.type == "cuda" and states is not None:
            # NOTE: the recurrent layers gather and scatter per-sequence state on the host side of each step
            logger.info("CUDA graphs off for %s: its recurrent layers' state is not captured", adapter.family)
        elif enable_cuda_graphs and self.device.type == "cuda" and cross_kv is not None:
            # NOTE: each request's cross-attention K/V differ in size and are attended in a per-sequence loop
            logger.info("CUDA graphs off for %s: its cross-attention layers read per-request K/V of varying size",
                        adapter.family)
        elif enable_cuda_graphs and self.device.type == "cuda":
            try:
                self._graphs = DecodeGraphs(adapter, cache, max_batch=max_num_seqs, max_model_len=max_model_len,
                                            compile_decoder=compile_decoder, computes_logits=computes_logits)
                if enable_vision_graphs:
                    adapter.enable_vision_graphs()
            except Exception:  # a decoder that cannot be captured still runs, only slower
                # NOTE: capture of every architecture has not been verified on a GPU; eager decode is always right.
                logger.exception("CUDA graph capture failed for %s; decode steps run eagerly", adapter.family)
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one step; returns the sequences that got a new token and the sampler's choices for them.

        With CUDA graphs, the step's single-token chunks replay a captured decode graph and only the prefill chunks
        run eagerly, so a prompt joining the batch does not turn everyone's decode into an eager, launch-bound
        forward. The two parts may run in either order: no sequence reads blocks another writes in the same step.
        """
        graphed, eager = self._partition(chunks)
        sequences: list[Sequence] = []
        logits: list[torch.Tensor] = []
        eager_step = None
        if eager:
            step = eager_step = self._prepare(eager)
            if self._channel is not None:
                self._channel.send(ForwardPlan.of(EAGER, step.inputs_embeds, step.position_ids, step.attention,
                                                  step.decoder_extras))
            with step.attention.active():
                output = self.adapter.text_model(inputs_embeds=step.inputs_embeds, position_ids=step.position_ids,
                                                 use_cache=False, **step.decoder_extras)
            if step.sample_rows:
                sequences += step.sample_sequences
                logits.append(self.adapter.compute_logits(output.last_hidden_state[0, step.sample_rows]))
        if graphed:
            assert self._graphs is not None
            step = self._prepare(graphed)
            positions = step.position_ids.squeeze(1) if self._rows > 1 else step.position_ids
            sequences += step.sample_sequences
            if self._channel is not None:
                self._channel.send(ForwardPlan.of(GRAPHED, step.inputs_embeds[0], positions, step.attention))
            logits.append(self._graphs.run(step.inputs_embeds[0], positions, step.attention))
        if not sequences:
            self._commit(eager_step)
            return [], None
        batch_logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        sampled = self.sampler(batch_logits, [s.sampling for s in sequences])
        self._commit(eager_step)  # only now: a step that failed anywhere before leaves every state as it was
        return sequences, sampled

    @staticmethod
    def _commit(step: StepInputs | None) -> None:
        if step is not None and step.attention.recurrent is not None:
            step.attention.recurrent.commit()

    @torch.inference_mode()
    def run_plan(self, plan: ForwardPlan) -> None:
        """A tensor-parallel worker's side of one forward rank 0 announced: the same forward, on this rank's
        shard and KV cache; the output stays here (only rank 0 computes logits)."""
        batch = plan.attention(self.cache)
        if plan.kind == GRAPHED:
            assert self._graphs is not None, "rank 0 replays a decode graph this worker did not capture"
            self._graphs.run(plan.tensors["embeds"], plan.tensors["positions"], batch)
            return
        with batch.active():
            self.adapter.text_model(inputs_embeds=plan.tensors["embeds"], position_ids=plan.tensors["positions"],
                                    use_cache=False, **plan.extras())

    def _partition(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], list[ScheduledChunk]]:
        """(chunks for the decode graph, chunks to run eagerly)."""
        if self._graphs is None:
            return [], chunks
        # a prompt's last token with decoder extras (an image row, in principle) runs eagerly: graphs take none
        # and so does one inside a bidirectional prompt block: graphs know no blocks, nor per-sequence rotary bases
        graphed = [c for c in chunks if c.num_tokens == 1 and c.samples and c.sequence.prompt_extras is None
                   and not _in_attention_block(c) and c.sequence.ntk_alpha == 1.0]
        if not graphed or len(graphed) > self._graphs.max_batch:
            return [], chunks
        chosen = {id(c) for c in graphed}
        return graphed, [c for c in chunks if id(c) not in chosen]

    # --- packing ---------------------------------------------------------------------------------------------

    def _prepare(self, chunks: list[ScheduledChunk]) -> StepInputs:
        size = self.cache.block_size
        rows = _Rows()
        slots: list[int] = []
        cu_seqlens = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_sequences: list[Sequence] = []
        starting = [c.sequence for c in chunks
                    if c.start < c.sequence.num_prompt_tokens and c.sequence.prompt_embeds is None]
        if starting:
            self._embed_prompts(starting)
        for chunk in chunks:
            sequence = chunk.sequence
            num_prompt = sequence.num_prompt_tokens
            first_row = rows.count
            if chunk.start < num_prompt:
                assert sequence.prompt_embeds is not None and sequence.prompt_positions is not None
                end = min(chunk.end, num_prompt)
                rows.add_prompt(sequence.prompt_embeds[chunk.start:end], sequence.prompt_positions[:, chunk.start:end],
                                _deepstack_slice(sequence.prompt_extras, chunk.start, end))
            generated_start = max(chunk.start, num_prompt)
            if chunk.end > generated_start:
                rows.add_generated(sequence.tokens(generated_start, chunk.end), generated_start + sequence.rope_delta)
            rows.scale_rotary(first_row, sequence.ntk_alpha)
            blocks = sequence.block_ids
            slots.extend(blocks[i // size] * size + i % size for i in range(chunk.start, chunk.end))
            cu_seqlens.append(cu_seqlens[-1] + chunk.num_tokens)
            seq_lens.append(chunk.end)
            if chunk.samples:
                sample_rows.append(cu_seqlens[-1] - 1)
                sample_sequences.append(sequence)
        max_blocks = max(len(c.sequence.block_ids) for c in chunks)
        tables = [c.sequence.block_ids + [0] * (max_blocks - len(c.sequence.block_ids)) for c in chunks]
        device = self.device
        batch = AttentionBatch(
            cache=self.cache, slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            max_q_len=max(c.num_tokens for c in chunks), max_seq_len=max(seq_lens),
            block_bounds=_block_bounds(chunks, device), blocks_spare_window=self.adapter.blocks_spare_window)
        batch.recurrent = self._recurrent_step(chunks, cu_seqlens)
        embeds, position_ids = rows.build(self.adapter, self._rows, device)
        position_ids = position_ids.unsqueeze(1) if self._rows > 1 else position_ids
        extras = rows.decoder_extras(device)
        if self.cross_kv is not None:
            batch.cross = self.cross_kv.segments([c.sequence for c in chunks], [c.start for c in chunks], cu_seqlens)
            if any(segment.kv is not None for segment in batch.cross):
                # the decoder skips its cross-attention layers without cross_attention_states; the layers
                # themselves read each sequence's K/V from the step (models.cross_attention), not this placeholder
                extras["cross_attention_states"] = embeds.new_zeros(1, 1, embeds.shape[-1])
        return StepInputs(inputs_embeds=embeds.unsqueeze(0), position_ids=position_ids,
                          attention=batch, sample_rows=sample_rows, sample_sequences=sample_sequences,
                          decoder_extras=extras)

    def _recurrent_step(self, chunks: list[ScheduledChunk], cu_seqlens: list[int]) -> RecurrentStep | None:
        if self.states is None:
            return None
        slots = []
        for chunk in chunks:
            if chunk.sequence.state_slot is None:
                raise RuntimeError(f"sequence {chunk.sequence.request_id} holds no recurrent-state slot")
            slots.append(chunk.sequence.state_slot)
        step = RecurrentStep(self.states, slots, list(itertools.pairwise(cu_seqlens)),
                             [c.start == 0 for c in chunks], [c.end for c in chunks])
        step.check([c.start for c in chunks])
        return step

    def _embed_prompts(self, sequences: list[Sequence]) -> None:
        """Prompt embeddings and positions of the sequences whose prefill starts this step. Their images come
        from the embedding cache, or from one vision-tower call over all the images it lacks."""
        features: dict[int, list[torch.Tensor]] = {}  # by id of the prompt (n > 1 siblings share one)
        missing: dict[int, PreparedPrompt] = {}
        encoded_for: dict[int, Sequence] = {}  # the sequence a prompt's tower time is reported on (one sibling)
        for sequence in sequences:
            prompt = sequence.request.prompt
            if id(prompt) in features or id(prompt) in missing:
                continue
            cached = self.image_cache.get_all(prompt.image_hashes) if _one_feature_per_image(prompt) else None
            if not prompt.image_hashes or cached is not None:
                features[id(prompt)] = cached or []
            else:
                missing[id(prompt)] = prompt
                encoded_for[id(prompt)] = sequence
        if missing:
            with timed(self.device) as elapsed:
                encoded = self.adapter.encode_image_batch(list(missing.values()))
            counts = [len(prompt.image_hashes) for prompt in missing.values()]
            for key, seconds, count in zip(missing, share_by_images(elapsed[0], counts), counts, strict=True):
                encoded_for[key].vision_encoder_s += seconds
                encoded_for[key].num_images_encoded += count
            for prompt, prompt_features in zip(missing.values(), encoded, strict=True):
                features[id(prompt)] = prompt_features
                if _one_feature_per_image(prompt) and len(prompt_features) == len(prompt.image_hashes):
                    for image_hash, feature in zip(prompt.image_hashes, prompt_features, strict=True):
                        self.image_cache.put(image_hash, feature)
        videos: dict[int, list[torch.Tensor]] = {}
        for sequence in sequences:
            if sequence.request.prompt.video_hashes and id(sequence.request.prompt) not in videos:
                videos[id(sequence.request.prompt)] = self._video_features(sequence)
        cross: dict[int, Any] = {}  # by id of the prompt: n > 1 siblings read one CrossKV (never written)
        for sequence in sequences:
            prompt = sequence.request.prompt
            embedding = self.adapter.embed_prompt(prompt, features[id(prompt)], video_embeds=videos.get(id(prompt)))
            sequence.prompt_embeds = embedding.inputs_embeds
            sequence.prompt_positions = embedding.positions.to(self.device)
            sequence.rope_delta = embedding.rope_delta
            sequence.ntk_alpha = embedding.ntk_alpha
            sequence.prompt_extras = embedding.extras
            if self.cross_kv is not None:
                if id(prompt) not in cross:
                    cross[id(prompt)] = self.adapter.cross_attention_kv(prompt, features[id(prompt)])
                if cross[id(prompt)] is not None:
                    self.cross_kv.put(sequence, cross[id(prompt)])

    def _video_features(self, sequence: Sequence) -> list[torch.Tensor]:
        """The sequence's video features, from the embedding cache (keyed by video hash) or the vision tower (its
        time counted in the sequence's vision-encoder time)."""
        prompt = sequence.request.prompt
        cached = self.image_cache.get_all(prompt.video_hashes, kind="video")
        if cached is not None:
            return cached
        with timed(self.device) as elapsed:
            encoded = self.adapter.encode_videos(prompt)
        sequence.vision_encoder_s += elapsed[0]
        for video_hash, feature in zip(prompt.video_hashes, encoded, strict=True):
            self.image_cache.put(video_hash, feature)
        return encoded


def _in_attention_block(chunk: ScheduledChunk) -> bool:
    return bool(chunk.sequence.attention_blocks) and chunk.start < chunk.sequence.num_prompt_tokens


def _block_bounds(chunks: list[ScheduledChunk], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per row of the step, the first and last key of its bidirectional block (its own index twice outside any);
    None when no chunk has a row in one."""
    if not any(_in_attention_block(c) for c in chunks):
        return None
    first: list[int] = []
    last: list[int] = []
    for chunk in chunks:
        row = len(first)
        first += range(chunk.start, chunk.end)
        last += range(chunk.start, chunk.end)
        for block_start, block_end in chunk.sequence.attention_blocks if _in_attention_block(chunk) else ():
            for index in range(max(block_start, chunk.start), min(block_end, chunk.end)):
                first[row + index - chunk.start] = block_start
                last[row + index - chunk.start] = block_end - 1
    return (torch.tensor(first, dtype=torch.int32, device=device),
            torch.tensor(last, dtype=torch.int32, device=device))


def _one_feature_per_image(prompt: PreparedPrompt) -> bool:
    """Whether the prompt's image runs pair one-to-one with its images (what the embedding cache needs)."""
    return len(prompt.image_spans) == len(prompt.image_hashes)


def _deepstack_slice(extras: dict[str, torch.Tensor] | None, start: int, end: int
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The deepstack inputs of prompt tokens [start, end): their visual mask and their image rows' features."""
    if not extras or "deepstack" not in extras:
        return None
    visual = extras["visual_mask"]
    first = int(visual[:start].sum())
    count = int(visual[start:end].sum())
    return visual[start:end], extras["deepstack"][:, first:first + count]
