"""Per-sequence state inside the paged engine: tokens, progress, blocks, sampling state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vlmserve.engine.sampler import SequenceSampling
from vlmserve.types import GenerationRequest

if TYPE_CHECKING:
    import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One sequence being generated.

    Its tokens are the prompt followed by the generated tokens; `num_computed_tokens` of them have their KV in
    `block_ids`. After a preemption everything is recomputed from the start, generated tokens included.
    """

    request: GenerationRequest
    sampling: SequenceSampling
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    #: chained content hashes of the full blocks of its known tokens, computed once each (see kv_cache_manager)
    block_hashes: list[bytes] = field(default_factory=list)
    #: leading blocks already findable in the prefix cache (found there, or cached after their step completed)
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at (first) admission
    #: set while the prompt is being prefilled: embeddings (tokens, hidden) and positions (rows, tokens)
    prompt_embeds: torch.Tensor | None = None
    prompt_positions: torch.Tensor | None = None
    #: the prompt's per-token decoder extras (`PromptEmbedding.extras`), while it is being prefilled
    prompt_extras: dict[str, torch.Tensor] | None = None
    rope_delta: int = 0
    ntk_alpha: float = 1.0  # `PromptEmbedding.ntk_alpha`: fixed by the prompt, kept through preemption
    num_preemptions: int = 0
    #: its slot in the recurrent-state pool while it holds one (hybrid decoders only; see engine.recurrent_state)
    state_slot: int | None = None
    #: for /metrics (sent once, with the first token): when it was first scheduled, and the vision-tower seconds
    #: and images encoded for it (a preemption before the first token re-encodes, and that counts too)
    first_scheduled_time: float | None = None
    vision_encoder_s: float = 0.0
    num_images_encoded: int = 0
    is_timing_sent: bool = False
    #: prompt token ranges [start, end) that attend bidirectionally (`ModelAdapter.attention_blocks`): a prefill
    #: chunk never ends inside one, and a cached block's key covers the whole of any it overlaps
    attention_blocks: tuple[tuple[int, int], ...] = ()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt.token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt.token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        prompt = self.request.prompt.token_ids
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return self.output_token_ids[start - len(prompt):end - len(prompt)]
        return prompt[start:] + self.output_token_ids[:end - len(prompt)]

    def release_prompt_state(self) -> None:
        self.prompt_embeds = None
        self.prompt_positions = None
        self.prompt_extras = None
