"""The full-size ASCII vocabulary: exact size, specials at their ids, every id decodes to ASCII."""

from __future__ import annotations

import random

import pytest

from bench.vocab import build_full_vocab_tokenizer


def test_vocab_has_exact_size_specials_and_ascii_tokens() -> None:
    specials = {"<|endoftext|>": 9_990, "<|im_end|>": 9_992, "<|image_pad|>": 9_995}
    tok = build_full_vocab_tokenizer(vocab_size=10_000, special_tokens=specials)
    assert tok.get_vocab_size() == 10_000
    assert {name: tok.token_to_id(name) for name in specials} == specials
    ids = random.Random(0).sample(range(10_000), 500)
    text = tok.decode([i for i in ids if i not in specials.values()])
    assert text and text.isascii()
    # Ids above the specials are regular tokens too (the padded embedding rows of the published config).
    assert tok.decode([9_999]) != ""
    sentence = "What is in this picture? Describe it."
    assert tok.decode(tok.encode(sentence).ids) == sentence


def test_about_half_the_tokens_start_a_word() -> None:
    tok = build_full_vocab_tokenizer(vocab_size=40_000, special_tokens={"<|endoftext|>": 39_999})
    vocab = tok.get_vocab()
    assert 0.35 < sum(token.startswith("Ġ") for token in vocab) / len(vocab) < 0.6


def test_bad_special_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        build_full_vocab_tokenizer(vocab_size=100, special_tokens={"<a>": 100})
