"""Incremental detokenisation: UTF-8 safe, equal to decoding everything at once, stop strings never leak."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlmserve.engine.detokenizer import IncrementalDetokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every token is one byte, so characters span tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=raw)


TOKENIZER = byte_tokenizer()


def stream(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(TOKENIZER, stop)
    pieces = [detok.add_tokens([t]) for t in TOKENIZER.encode(text, add_special_tokens=False)]
    pieces.append(detok.flush())
    return pieces, detok


def test_multibyte_characters_are_never_split() -> None:
    text = "héllo 世界 🙂 done"
    pieces, _ = stream(text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) < len(text.encode())  # bytes of one character came out together


def test_stop_string_is_cut_and_never_emitted() -> None:
    pieces, detok = stream("The answer is 42. END more text", stop=("END",))
    assert "".join(pieces) == "The answer is 42. "
    assert detok.stopped_by == "END"
    assert not any("E" in p for p in pieces)


def test_partial_stop_string_is_released_when_it_does_not_complete() -> None:
    pieces, detok = stream("a STOx b", stop=("STOP",))
    assert "".join(pieces) == "a STOx b" and detok.stopped_by is None


def test_earliest_of_several_stop_strings_wins() -> None:
    pieces, detok = stream("one two three", stop=("three", "two"))
    assert "".join(pieces) == "one " and detok.stopped_by == "two"


def test_only_what_could_still_begin_a_stop_string_is_held_back() -> None:
    # one byte per token: with a 3-character stop string, all but the last 2 characters are out at every step
    text = "abcdefgh"
    detok = IncrementalDetokenizer(TOKENIZER, ("XYZ",))
    emitted = ""
    for i, token in enumerate(TOKENIZER.encode(text, add_special_tokens=False), start=1):
        emitted += detok.add_tokens([token])
        assert emitted == text[:max(0, i - 2)]
    assert emitted + detok.flush() == text
    # without stop strings nothing is held back
    plain = IncrementalDetokenizer(TOKENIZER)
    assert [plain.add_tokens([t]) for t in TOKENIZER.encode("abc", add_special_tokens=False)] == ["a", "b", "c"]
