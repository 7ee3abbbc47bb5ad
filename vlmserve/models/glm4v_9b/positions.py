"""Where GLM-4V-9B's images sit in a prompt and which rotary positions its tokens get.

Our prompts carry each image EXPANDED: `<|begin_of_image|>`, N image placeholder tokens (`<|endoftext|>`, N=1600
at 1120 px), `<|end_of_image|>`. The vision tower emits N + 2 rows (its own boi row, N image rows, its eoi row),
which replace the embeddings of that whole run, boi and eoi included.

Positions follow the original: it numbers the unexpanded prompt 0, 1, 2, ... (boi at b, one placeholder at b + 1,
eoi at b + 2) and, when it splices the N image rows in, gives all of them the placeholder's position b + 1. So the
boi row has position b, every image row b + 1, the eoi row b + 2, and every later token N - 1 less than its index
(generated tokens too). Padding tokens (mask 0) take no position.
"""

from __future__ import annotations

import torch


def image_runs(token_ids: torch.Tensor, boi_token_id: int, eoi_token_id: int) -> list[tuple[int, int]]:
    """(boi index, eoi index) of every image run in a 1-D sequence of token ids, in order."""
    begins = (token_ids == boi_token_id).nonzero().flatten().tolist()
    ends = (token_ids == eoi_token_id).nonzero().flatten().tolist()
    runs: list[tuple[int, int]] = []
    for begin in begins:
        end = next((e for e in ends if e > begin), None)
        if end is None or (runs and begin < runs[-1][1]):
            raise ValueError("unbalanced <|begin_of_image|> / <|end_of_image|> tokens in the prompt")
        runs.append((begin, end))
    return runs


def sequence_positions(token_ids: torch.Tensor, boi_token_id: int, eoi_token_id: int,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary positions (T,) for one sequence of token ids (T,); padded slots get 0."""
    step = torch.ones_like(token_ids) if attention_mask is None else attention_mask.to(token_ids.dtype, copy=True)
    for begin, end in image_runs(token_ids, boi_token_id, eoi_token_id):
        step[begin + 2 : end] = 0  # image rows after the first share its position
    return (step.cumsum(0) - 1).clamp(min=0)


def batch_positions(input_ids: torch.Tensor, boi_token_id: int, eoi_token_id: int,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary positions (B, T) for a (left-padded) batch of token ids (B, T)."""
    rows = [
        sequence_positions(ids, boi_token_id, eoi_token_id, None if attention_mask is None else attention_mask[i])
        for i, ids in enumerate(input_ids)
    ]
    return torch.stack(rows).to(torch.long)


def rope_delta(num_tokens: int, positions: torch.Tensor) -> int:
    """How far generated positions lag token indices: a token at index i >= num_tokens gets i + delta."""
    return int(positions.max()) + 1 - num_tokens if num_tokens else 0
