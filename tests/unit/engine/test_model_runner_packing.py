"""The paged step's packing: `_Rows` (prompt slices and generated tokens in one ragged batch) and the helpers that
slice deepstack inputs and mark bidirectional prompt blocks. Exact values, so that an off-by-one row, a dropped
sequence or a wrong offset shows."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vlmserve.engine.model_runner import (
    ModelRunner,
    _block_bounds,
    _deepstack_slice,
    _in_attention_block,
    _one_feature_per_image,
    _Rows,
)
from vlmserve.engine.scheduler import ScheduledChunk

CPU = torch.device("cpu")
HIDDEN = 3


class _Adapter:
    """`embed_tokens` of a table whose row i is (i, i, i) + 100, so that every generated row is recognisable."""

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids.to(torch.float32) + 100).unsqueeze(-1).expand(-1, HIDDEN).clone()


ADAPTER: Any = _Adapter()


def _prompt(rows: int, first: float, position_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = torch.arange(rows * HIDDEN, dtype=torch.float32).reshape(rows, HIDDEN) + first
    positions = torch.arange(rows).expand(position_rows, -1) * 10 + first
    return embeds, positions.to(torch.long)


def _chunk(start: int, num_tokens: int, num_prompt: int, blocks: tuple[tuple[int, int], ...] = (),
           num_tokens_total: int | None = None) -> ScheduledChunk:
    sequence: Any = SimpleNamespace(attention_blocks=blocks, num_prompt_tokens=num_prompt,
                                    num_tokens=num_tokens_total or start + num_tokens)
    return ScheduledChunk(sequence, start, num_tokens)


# --- _Rows ------------------------------------------------------------------------------------------------------

def test_generated_rows_only_are_embedded_in_one_call_with_expanded_positions() -> None:
    rows = _Rows()
    rows.add_generated([5, 6], 40)
    rows.add_generated([7], 9)
    assert rows.count == 3
    embeds, positions = rows.build(ADAPTER, 3, CPU)
    assert embeds[:, 0].tolist() == [105.0, 106.0, 107.0]
    assert positions.shape == (3, 3)
    assert positions.tolist() == [[40, 41, 9]] * 3


def test_one_prompt_slice_is_returned_as_it_is() -> None:
    rows = _Rows()
    embeds, positions = _prompt(4, 0.0)
    rows.add_prompt(embeds, positions)
    assert rows.count == 4
    built = rows.build(ADAPTER, 1, CPU)
    assert built[0] is embeds and built[1] is positions


def test_prompts_and_generated_tokens_are_packed_in_order() -> None:
    rows = _Rows()
    first_embeds, first_positions = _prompt(2, 0.0, position_rows=3)
    rows.add_prompt(first_embeds, first_positions)
    rows.add_generated([1, 2], 7)
    second_embeds, second_positions = _prompt(3, 50.0, position_rows=3)
    rows.add_prompt(second_embeds, second_positions)
    rows.add_generated([3], 20)
    assert rows.count == 8
    embeds, positions = rows.build(ADAPTER, 3, CPU)
    assert embeds.shape == (8, HIDDEN) and positions.shape == (3, 8)
    assert torch.equal(embeds[0:2], first_embeds)
    assert embeds[2:4, 0].tolist() == [101.0, 102.0]
    assert torch.equal(embeds[4:7], second_embeds)
    assert embeds[7].tolist() == [103.0] * HIDDEN
    assert positions[0].tolist() == [0, 10, 7, 8, 50, 60, 70, 20]
    assert torch.equal(positions[2], positions[0])


def test_two_prompt_slices_without_generated_tokens() -> None:
    rows = _Rows()
    rows.add_prompt(*_prompt(1, 0.0))
    rows.add_prompt(*_prompt(2, 30.0))
    embeds, positions = rows.build(ADAPTER, 1, CPU)
    assert embeds[:, 0].tolist() == [0.0, 30.0, 33.0]
    assert positions.tolist() == [[0, 30, 40]]


def test_rotary_factors_cover_exactly_their_sequences_rows() -> None:
    rows = _Rows()
    rows.add_generated([1, 2], 0)
    rows.scale_rotary(0, 1.0)  # no factor: nothing recorded
    rows.add_generated([3, 4, 5], 0)
    rows.scale_rotary(2, 2.5)
    rows.scale_rotary(rows.count, 4.0)  # no rows of its own yet: nothing recorded
    rows.add_generated([6], 0)
    rows.scale_rotary(5, 0.5)
    rows.add_generated([7, 8], 0)  # a plain sequence after the scaled ones keeps factor 1
    rows.scale_rotary(6, 1.0)
    extras = rows.decoder_extras(CPU)
    assert set(extras) == {"ntk_alphas"}
    assert extras["ntk_alphas"].tolist() == [1.0, 1.0, 2.5, 2.5, 2.5, 0.5, 1.0, 1.0]


def test_no_extras_without_factors_or_image_rows() -> None:
    rows = _Rows()
    visual = torch.zeros(2, dtype=torch.bool)
    rows.add_prompt(*_prompt(2, 0.0), deepstack=(visual, torch.zeros(2, 0, HIDDEN)))
    rows.scale_rotary(0, 1.0)
    rows.scale_rotary(rows.count, 2.0)  # a scaled sequence with no rows in this step
    assert rows.decoder_extras(CPU) == {}


def test_deepstack_inputs_are_placed_at_their_rows_and_concatenated() -> None:
    rows = _Rows()
    rows.add_generated([9], 0)
    first_visual = torch.tensor([False, True, True])
    first_features = torch.arange(2 * 2 * HIDDEN, dtype=torch.float32).reshape(2, 2, HIDDEN)  # (layers, rows, h)
    rows.add_prompt(*_prompt(3, 0.0), deepstack=(first_visual, first_features))
    second_visual = torch.tensor([True, False])
    second_features = -torch.ones(2, 1, HIDDEN)
    rows.add_prompt(*_prompt(2, 0.0), deepstack=(second_visual, second_features))
    rows.scale_rotary(4, 3.0)
    extras = rows.decoder_extras(CPU)
    assert extras["ntk_alphas"].tolist() == [1.0, 1.0, 1.0, 1.0, 3.0, 3.0]
    assert extras["visual_pos_masks"].tolist() == [[False, False, True, True, True, False]]
    layers = extras["deepstack_visual_embeds"]
    assert isinstance(layers, list) and len(layers) == 2
    for layer in range(2):
        assert torch.equal(layers[layer], torch.cat([first_features[layer], second_features[layer]]))


# --- helpers --------------------------------------------------------------------------------------------------

def test_a_chunk_is_in_an_attention_block_only_while_in_its_prompt() -> None:
    assert _in_attention_block(_chunk(0, 4, 6, blocks=((1, 3),)))
    assert _in_attention_block(_chunk(5, 1, 6, blocks=((1, 3),)))
    assert not _in_attention_block(_chunk(6, 1, 6, blocks=((1, 3),)))
    assert not _in_attention_block(_chunk(0, 4, 6))


def test_block_bounds_are_none_without_a_chunk_in_a_block() -> None:
    assert _block_bounds([_chunk(0, 3, 3), _chunk(7, 1, 6, blocks=((1, 3),))], CPU) is None


def test_block_bounds_mark_each_row_of_each_chunk() -> None:
    chunks = [
        _chunk(2, 3, 8),  # no blocks: its own index twice
        _chunk(2, 5, 10, blocks=((0, 4), (5, 9))),  # rows 2..6: the end of one block, a gap, the start of another
        _chunk(8, 2, 8, blocks=((0, 4),)),  # past its prompt: its own index twice
    ]
    bounds = _block_bounds(chunks, CPU)
    assert bounds is not None
    first, last = bounds
    assert first.dtype == torch.int32 and last.dtype == torch.int32
    assert first.tolist() == [2, 3, 4, 0, 0, 4, 5, 5, 8, 9]
    assert last.tolist() == [2, 3, 4, 3, 3, 4, 8, 8, 8, 9]


def test_block_bounds_of_a_chunk_before_its_block() -> None:
    first, last = _block_bounds([_chunk(0, 2, 6, blocks=((3, 6),))], CPU) or (None, None)
    assert first is not None and last is not None
    assert first.tolist() == [0, 1] and last.tolist() == [0, 1]


@pytest.mark.parametrize(("spans", "hashes", "expected"), [(2, 2, True), (1, 2, False), (0, 0, True)])
def test_one_feature_per_image(spans: int, hashes: int, expected: bool) -> None:
    prompt: Any = SimpleNamespace(image_spans=(object(),) * spans, image_hashes=("h",) * hashes)
    assert _one_feature_per_image(prompt) is expected


def test_deepstack_slice_is_none_without_deepstack() -> None:
    assert _deepstack_slice(None, 0, 3) is None
    assert _deepstack_slice({}, 0, 3) is None
    assert _deepstack_slice({"visual_mask": torch.ones(3, dtype=torch.bool)}, 0, 3) is None


def test_deepstack_slice_takes_the_image_rows_of_its_tokens() -> None:
    visual = torch.tensor([False, True, True, False, True, True, True, False])
    deepstack = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)  # (layers, image rows, hidden)
    sliced = _deepstack_slice({"visual_mask": visual, "deepstack": deepstack}, 2, 6)
    assert sliced is not None
    mask, features = sliced
    assert mask.tolist() == [True, False, True, True]
    assert torch.equal(features, deepstack[:, 1:4])


def test_commit_keeps_the_recurrent_states_only_of_a_step_that_has_them() -> None:
    committed: list[bool] = []
    recurrent = SimpleNamespace(commit=lambda: committed.append(True))
    ModelRunner._commit(None)
    ModelRunner._commit(SimpleNamespace(attention=SimpleNamespace(recurrent=None)))  # type: ignore[arg-type]
    assert committed == []
    ModelRunner._commit(SimpleNamespace(attention=SimpleNamespace(recurrent=recurrent)))  # type: ignore[arg-type]
    assert committed == [True]


def test_a_hybrid_step_refuses_a_sequence_without_a_state_slot() -> None:
    runner: Any = SimpleNamespace(states=object())
    sequence = SimpleNamespace(request_id="r7", state_slot=None, num_tokens=3)
    with pytest.raises(RuntimeError, match=r"^sequence r7 holds no recurrent-state slot$"):
        ModelRunner._recurrent_step(runner, [ScheduledChunk(sequence, 0, 3)], [0, 3])  # type: ignore[arg-type]


def test_a_step_without_recurrent_layers_has_no_recurrent_step() -> None:
    runner: Any = SimpleNamespace(states=None)
    assert ModelRunner._recurrent_step(runner, [_chunk(0, 3, 3)], [0, 3]) is None
