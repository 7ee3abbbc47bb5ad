"""The self-check's comparison of paged logprobs with model.generate's, on hand-made numbers."""

from __future__ import annotations

import math

import torch

from vlmserve.engine.paged_check import _compare
from vlmserve.types import PositionLogprobs, TokenLogprob

EXPECTED = torch.tensor([[-0.5, -1.0, -2.0, -4.0], [-0.1, -3.0, -2.5, -6.0], [-1.5, -0.3, -2.0, -3.0]])
TOKENS = [0, 0, 1]


def positions(shift: dict[tuple[int, int], float] | None = None, tokens: list[int] | None = None,
              top: tuple[int, ...] = (2, 3)) -> list[PositionLogprobs]:
    """The expected logprobs as the paged engine would report them, with `shift[(position, token)]` added."""
    shift = shift or {}
    out = []
    for i, token in enumerate(tokens or TOKENS):
        def entry(t: int, i: int = i) -> TokenLogprob:
            return TokenLogprob(t, float(EXPECTED[i, t]) + shift.get((i, t), 0.0))
        out.append(PositionLogprobs(chosen=entry(token), top=tuple(entry(t) for t in top)))
    return out


def test_equal_logprobs_pass_with_every_position_compared() -> None:
    assert _compare(positions(), EXPECTED, TOKENS, atol=1e-4, rtol=0.0) == (0.0, 3, True)


def test_the_tolerance_is_absolute_plus_relative_to_the_reference() -> None:
    # token 3 at position 1 has logprob -6: atol 0.1 + rtol 0.05 * 6 = 0.4
    within = positions({(1, 3): 0.39})
    beyond = positions({(1, 3): 0.41})
    error, compared, ok = _compare(within, EXPECTED, TOKENS, atol=0.1, rtol=0.05)
    assert ok and compared == 3 and abs(error - 0.39) < 1e-6
    error, compared, ok = _compare(beyond, EXPECTED, TOKENS, atol=0.1, rtol=0.05)
    assert not ok and compared == 3 and abs(error - 0.41) < 1e-6
    # the chosen token is compared as well as the alternatives, and the largest difference is reported
    error, _, ok = _compare(positions({(0, 0): -2e-4, (2, 2): 1e-4}), EXPECTED, TOKENS, atol=1e-4, rtol=0.0)
    assert not ok and abs(error - 2e-4) < 1e-9
    assert _compare(positions({(2, 1): 1e-4}), EXPECTED, TOKENS, atol=1e-4, rtol=0.0)[2]


def test_nan_fails_and_reads_as_an_infinite_error() -> None:
    error, _, ok = _compare(positions({(1, 2): math.nan}), EXPECTED, TOKENS, atol=1.0, rtol=1.0)
    assert not ok and error == math.inf


def test_a_missing_position_fails() -> None:
    assert _compare(positions()[:2], EXPECTED, TOKENS, atol=1.0, rtol=1.0) == (math.inf, 0, False)


def test_positions_after_the_first_different_choice_are_not_compared() -> None:
    # the paged engine chose token 1 at position 1 (a near-tie): position 2 then follows another context
    tokens = [0, 1, 1]
    got = positions({(2, 2): 5.0}, tokens=tokens)
    error, compared, ok = _compare(got, EXPECTED, TOKENS, atol=1e-4, rtol=0.0)
    assert (error, compared, ok) == (0.0, 2, True)


def test_a_difference_exactly_at_the_tolerance_passes_and_a_failure_is_a_bool() -> None:
    # -0.5 + 0.25 and the difference 0.25 are exact in binary floating point
    assert _compare(positions({(0, 0): 0.25}), EXPECTED, TOKENS, atol=0.25, rtol=0.0) == (0.25, 3, True)
    assert _compare(positions({(0, 0): 0.5}), EXPECTED, TOKENS, atol=0.25, rtol=0.0) == (0.5, 3, False)
    assert _compare(positions({(0, 0): 0.5}), EXPECTED, TOKENS, atol=0.25, rtol=0.0)[2] is False
