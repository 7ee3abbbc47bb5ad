"""Owns torch for the paged engine: packs a step's chunks into one ragged batch, runs the decoder, samples.

A step's input is one row per scheduled token, all sequences concatenated:
- embeddings: prompt tokens take the prompt's embeddings (text embeddings with image features merged, computed
  once per prompt when its prefill starts); generated tokens take `embed_tokens`;
- positions: the prompt's own (M-RoPE rows included, from the model's helper), generated token i at i + rope_delta
  on every row — the delta is kept per sequence;
- attention metadata: cache slots, per-sequence block tables and lengths (see `engine.attention`).
The decoder runs once on all rows; logits are taken only at each sequence's last row when that row is its newest
token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vlmserve.engine import attention
from vlmserve.engine.attention import AttentionBatch
from vlmserve.engine.cuda_graphs import DecodeGraphs
from vlmserve.engine.image_cache import ImageEmbeddingCache
from vlmserve.engine.kv_cache import KVCache
from vlmserve.engine.request import Sequence
from vlmserve.engine.sampler import Sampler, SamplerOutput
from vlmserve.engine.scheduler import ScheduledChunk
from vlmserve.models.base import ModelAdapter

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    inputs_embeds: torch.Tensor  # (1, T, hidden)
    position_ids: torch.Tensor  # (rows, 1, T) or (1, T)
    attention: AttentionBatch
    sample_rows: list[int]  # row index of each sampling chunk's last token
    sample_sequences: list[Sequence]


class ModelRunner:
    def __init__(self, adapter: ModelAdapter, cache: KVCache, image_cache: ImageEmbeddingCache, *,
                 max_num_seqs: int, max_model_len: int, enable_cuda_graphs: bool) -> None:
        self.adapter = adapter
        self.cache = cache
        self.image_cache = image_cache
        self.device = adapter.device
        self.sampler = Sampler(self.device)
        self._rows = adapter.num_position_rows
        attention.install(adapter.text_model)
        self._graphs: DecodeGraphs | None = None
        if enable_cuda_graphs and self.device.type == "cuda":
            try:
                self._graphs = DecodeGraphs(adapter, cache, max_batch=max_num_seqs, max_model_len=max_model_len)
            except Exception:  # a decoder that cannot be captured still runs, only slower
                # NOTE: capture of every architecture has not been verified on a GPU; eager decode is always right.
                logger.exception("CUDA graph capture failed for %s; decode steps run eagerly", adapter.family)
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one step; returns the sequences that got a new token and the sampler's choices for them."""
        step = self._prepare(chunks)
        if self._is_graphable(step, len(chunks)):
            assert self._graphs is not None
            positions = step.position_ids.squeeze(1) if self._rows > 1 else step.position_ids
            logits = self._graphs.run(step.inputs_embeds[0], positions, step.attention)
        else:
            with step.attention.active():
                output = self.adapter.text_model(inputs_embeds=step.inputs_embeds, position_ids=step.position_ids,
                                                 use_cache=False)
            if not step.sample_rows:
                return [], None
            logits = self.adapter.compute_logits(output.last_hidden_state[0, step.sample_rows])
        return step.sample_sequences, self.sampler(logits, [s.sampling for s in step.sample_sequences])

    def _is_graphable(self, step: StepInputs, num_chunks: int) -> bool:
        """A pure decode step: one token per sequence, every one sampled, within the captured sizes."""
        return (self._graphs is not None and step.attention.max_q_len == 1
                and len(step.sample_rows) == num_chunks <= self._graphs.max_batch)

    # --- packing ---------------------------------------------------------------------------------------------

    def _prepare(self, chunks: list[ScheduledChunk]) -> StepInputs:
        embeds: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        slots: list[int] = []
        cu_seqlens = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_sequences: list[Sequence] = []
        size = self.cache.block_size
        for chunk in chunks:
            sequence = chunk.sequence
            chunk_embeds, chunk_positions = self._chunk_inputs(chunk)
            embeds.append(chunk_embeds)
            positions.append(chunk_positions)
            slots.extend(sequence.block_ids[i // size] * size + i % size for i in range(chunk.start, chunk.end))
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
            max_q_len=max(c.num_tokens for c in chunks), max_seq_len=max(seq_lens))
        position_ids = torch.cat(positions, dim=1)
        position_ids = position_ids.unsqueeze(1) if self._rows > 1 else position_ids
        return StepInputs(inputs_embeds=torch.cat(embeds).unsqueeze(0), position_ids=position_ids,
                          attention=batch, sample_rows=sample_rows, sample_sequences=sample_sequences)

    def _chunk_inputs(self, chunk: ScheduledChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (tokens, hidden) and positions (rows, tokens) of one chunk."""
        sequence = chunk.sequence
        num_prompt = sequence.num_prompt_tokens
        parts_e: list[torch.Tensor] = []
        parts_p: list[torch.Tensor] = []
        if chunk.start < num_prompt:
            if sequence.prompt_embeds is None:
                self._embed_prompt(sequence)
            assert sequence.prompt_embeds is not None and sequence.prompt_positions is not None
            end = min(chunk.end, num_prompt)
            parts_e.append(sequence.prompt_embeds[chunk.start:end])
            parts_p.append(sequence.prompt_positions[:, chunk.start:end])
        generated_start = max(chunk.start, num_prompt)
        if chunk.end > generated_start:
            ids = torch.tensor(sequence.tokens(generated_start, chunk.end), device=self.device)
            parts_e.append(self.adapter.embed_tokens(ids))
            index = torch.arange(generated_start, chunk.end, device=self.device) + sequence.rope_delta
            parts_p.append(index.unsqueeze(0).expand(self._rows, -1))
        embeds = parts_e[0] if len(parts_e) == 1 else torch.cat(parts_e)
        positions = parts_p[0] if len(parts_p) == 1 else torch.cat(parts_p, dim=1)
        return embeds, positions

    def _embed_prompt(self, sequence: Sequence) -> None:
        prompt = sequence.request.prompt
        image_embeds: list[torch.Tensor] = []
        if prompt.image_hashes:
            image_embeds = self._image_embeds(sequence)
        embedding = self.adapter.embed_prompt(prompt, image_embeds)
        sequence.prompt_embeds = embedding.inputs_embeds
        sequence.prompt_positions = embedding.positions.to(self.device)
        sequence.rope_delta = embedding.rope_delta

    def _image_embeds(self, sequence: Sequence) -> list[torch.Tensor]:
        """Per-image features from the embedding cache, else from the vision tower (then cached)."""
        prompt = sequence.request.prompt
        one_per_image = len(prompt.image_spans) == len(prompt.image_hashes)
        cached = self.image_cache.get_all(prompt.image_hashes) if one_per_image else None
        if cached is not None:
            return cached
        features = self.adapter.encode_images(prompt)
        if one_per_image and len(features) == len(prompt.image_hashes):
            for image_hash, feature in zip(prompt.image_hashes, features, strict=True):
                self.image_cache.put(image_hash, feature)
        return features
