"""Grounding markup stays in answers, control tokens do not, and streaming never splits or leaks either."""

from __future__ import annotations

import itertools

import pytest
from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

from tests.fixtures.tiny.glm4v import GLM_SPECIAL_TOKENS
from tests.fixtures.tiny.tokenizer import build_bpe_tokenizer
from vlmserve.demo.build import QWEN_SPECIAL_TOKENS
from vlmserve.engine.detokenizer import IncrementalDetokenizer
from vlmserve.engine.text_policy import TextPolicy

# The grounding tokens the published Qwen2-VL / GLM-4.1V tokenizers carry as special tokens.
QWEN_GROUNDING = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                  "<|quad_start|>", "<|quad_end|>"]
GLM_GROUNDING = ["<|begin_of_box|>", "<|end_of_box|>"]

QWEN_ANSWER = "The cat is <|object_ref_start|>the cat<|object_ref_end|><|box_start|>(517,508),(589,611)<|box_end|>"
GLM_ANSWER = "The cat is at <|begin_of_box|>[517,508,589,611]<|end_of_box|>"


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    raw = build_bpe_tokenizer(QWEN_SPECIAL_TOKENS + QWEN_GROUNDING)
    return Qwen2TokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None)


def glm_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=build_bpe_tokenizer(GLM_SPECIAL_TOKENS + GLM_GROUNDING),
                                   eos_token="<|endoftext|>")


CASES = {"qwen2-vl": (qwen_tokenizer, QWEN_ANSWER, "<|im_end|>", QWEN_GROUNDING),
         "glm-4.1v": (glm_tokenizer, GLM_ANSWER, "<|user|>", GLM_GROUNDING)}


def stream(tokenizer: PreTrainedTokenizerFast, ids: list[int], **options: object) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, policy=TextPolicy.from_tokenizer(tokenizer), **options)  # type: ignore[arg-type]
    pieces = [detok.add_tokens([token]) for token in ids]
    return [*pieces, detok.flush()]


@pytest.mark.parametrize("family", sorted(CASES))
def test_the_policy_splits_markup_from_control(family: str) -> None:
    make, _, control, markup = CASES[family]
    tokenizer = make()
    policy = TextPolicy.from_tokenizer(tokenizer)
    assert {tokenizer.convert_ids_to_tokens(i) for i in policy.markup_ids} == set(markup)
    assert tokenizer.convert_tokens_to_ids(control) in policy.control_ids
    assert policy.dropped_ids(None) == policy.control_ids
    assert policy.dropped_ids(True) == policy.control_ids | policy.markup_ids
    assert policy.dropped_ids(False) == frozenset()


@pytest.mark.parametrize("family", sorted(CASES))
def test_streamed_answer_keeps_its_tags_whole_and_drops_control_tokens(family: str) -> None:
    make, answer, control, markup = CASES[family]
    tokenizer = make()
    ids = tokenizer.encode(answer + control, add_special_tokens=False)
    assert sum(tokenizer.convert_ids_to_tokens(i) in markup for i in ids) >= 2  # the tags are single tokens
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == answer
    for tag in markup:  # a tag arrives inside one piece, never cut across two
        assert all(tag not in a + b or tag in a or tag in b for a, b in itertools.pairwise(pieces))
    assert not any(piece.endswith(("<", "<|")) for piece in pieces)


@pytest.mark.parametrize("family", sorted(CASES))
def test_skip_special_tokens_true_is_the_old_behaviour_and_false_keeps_everything(family: str) -> None:
    make, answer, control, _ = CASES[family]
    tokenizer = make()
    ids = tokenizer.encode(answer + control, add_special_tokens=False)
    assert "".join(stream(tokenizer, ids, skip_special_tokens=True)) == tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False)) == answer + control


def test_spaces_between_special_tokens_separate_tags_from_text() -> None:
    tokenizer = qwen_tokenizer()
    ids = tokenizer.encode("a <|box_start|>(1,2),(3,4)<|box_end|> b", add_special_tokens=False)
    spaced = "".join(stream(tokenizer, ids, spaces_between_special_tokens=True))
    assert spaced == "a  <|box_start|> (1,2),(3,4) <|box_end|>  b"
    assert "".join(stream(tokenizer, ids)) == "a <|box_start|>(1,2),(3,4)<|box_end|> b"


def test_without_a_policy_every_special_token_is_skipped() -> None:
    tokenizer = qwen_tokenizer()
    ids = tokenizer.encode(QWEN_ANSWER, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add_tokens(ids) + detok.flush() == "The cat is the cat(517,508),(589,611)"


def test_stripping_trims_the_answer_but_keeps_inner_whitespace_while_streaming() -> None:
    tokenizer = qwen_tokenizer()
    policy = TextPolicy.from_tokenizer(tokenizer, strip_whitespace=True)
    text = "\n  A cat  sits. \n <|box_start|>(1,2),(3,4)<|box_end|>\n\n "
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, policy=policy)
    pieces = [detok.add_tokens([token]) for token in ids]
    assert "".join(pieces) == text.strip()  # trailing whitespace is held back until more text comes ...
    assert detok.flush() == ""  # ... and never comes out at the end
    assert pieces[0] == "" and not any(p.startswith("\n") for p in pieces if p)


def test_stop_strings_still_cut_the_text_with_markup_kept() -> None:
    tokenizer = qwen_tokenizer()
    ids = tokenizer.encode(QWEN_ANSWER + " STOP here", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, ("STOP",), policy=TextPolicy.from_tokenizer(tokenizer))
    text = "".join(detok.add_tokens([token]) for token in ids) + detok.flush()
    assert text == QWEN_ANSWER + " " and detok.stopped_by == "STOP"


def test_spaced_text_decoded_in_one_window_keeps_every_piece() -> None:
    tokenizer = qwen_tokenizer()
    ids = tokenizer.encode("a <|box_start|>(1,2)<|box_end|> b<|box_start|>c", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, policy=TextPolicy.from_tokenizer(tokenizer),
                                   spaces_between_special_tokens=True)
    assert detok.add_tokens(ids) + detok.flush() == "a  <|box_start|> (1,2) <|box_end|>  b <|box_start|> c"


def test_a_logprob_token_is_shown_as_its_own_text_special_or_not() -> None:
    tokenizer = qwen_tokenizer()
    detok = IncrementalDetokenizer(tokenizer, policy=TextPolicy.from_tokenizer(tokenizer))
    box = tokenizer.convert_tokens_to_ids("<|box_start|>")
    assert detok.token_text(box) == "<|box_start|>"
    assert detok.token_text(tokenizer.convert_tokens_to_ids("<|im_end|>")) == "<|im_end|>"
    (word,) = tokenizer.encode("cat", add_special_tokens=False)[:1]
    assert detok.token_text(word) == tokenizer.decode([word])


def test_adjacent_special_tokens_are_each_spaced_when_streamed() -> None:
    tokenizer = qwen_tokenizer()
    ids = tokenizer.encode("x<|box_start|><|box_end|><|box_start|>y", add_special_tokens=False)
    pieces = stream(tokenizer, ids, spaces_between_special_tokens=True)
    assert "".join(pieces) == "x <|box_start|> <|box_end|> <|box_start|> y"


class _Token:
    def __init__(self, content: str, **flags: bool) -> None:
        self.content = content
        self.__dict__.update(flags)


class _NamedOnly:
    """A tokenizer that names its special ids (all_special_ids, None for an unset one) without an added-tokens
    table."""

    all_special_ids = [3, None, 7]

    @staticmethod
    def convert_ids_to_tokens(token_id: int) -> str:
        return {3: "<|box_start|>", 7: "</s>"}[token_id]


class _TableOnly:
    """An added-tokens table whose entries may lack the `special` flag (then they are ordinary text)."""

    added_tokens_decoder = {5: _Token("<|box_end|>"), 6: _Token("<s>", special=True),
                            8: _Token("<ref>", special=True)}


def test_special_tokens_are_found_by_name_or_by_flag() -> None:
    named = TextPolicy.from_tokenizer(_NamedOnly())
    assert (named.markup_ids, named.control_ids) == ({3}, {7})
    table = TextPolicy.from_tokenizer(_TableOnly())
    assert (table.markup_ids, table.control_ids) == ({8}, {6})


def test_the_default_policy_keeps_the_answers_whitespace() -> None:
    tokenizer = qwen_tokenizer()
    ids = tokenizer.encode("\n A cat. ", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids)) == "\n A cat. "
