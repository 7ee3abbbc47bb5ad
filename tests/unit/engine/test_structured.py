"""The grammar engine on the demo model's tokenizer: compilation, errors, the cache and the bitmask."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from transformers import AutoTokenizer

from vlmserve.demo import WEIGHTS_DIR
from vlmserve.engine.structured import StructuredOutputs, accept_tokens, apply_bitmask, fill_bitmask
from vlmserve.errors import InvalidRequestError
from vlmserve.types import StructuredOutputSpec


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return AutoTokenizer.from_pretrained(WEIGHTS_DIR)


@pytest.fixture
def engine(tokenizer: object) -> StructuredOutputs:
    structured = StructuredOutputs(tokenizer, eos_token_ids=frozenset({tokenizer.eos_token_id}),  # type: ignore[attr-defined]
                                   max_cached=2)
    yield structured  # type: ignore[misc]
    structured.shutdown()


def walk(engine: StructuredOutputs, tokenizer: object, spec: StructuredOutputSpec, text: str) -> bool:
    """Feed `text`'s tokens to a fresh matcher; True if all were accepted and the grammar is then complete."""
    matcher = engine.matcher(spec)
    ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    return all(matcher.accept(t) for t in ids) and matcher.matcher.is_accepting()


@pytest.mark.parametrize(("spec", "value", "bad"), [
    (StructuredOutputSpec("regex", r"\d{2}-[a-z]+"), "12-ab", "1-ab"),
    (StructuredOutputSpec("choice", ("red", "a \"quoted\" one")), 'a "quoted" one', "blue"),
    (StructuredOutputSpec("json_schema", json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                                                     "required": ["n"]})), '{"n":42}', '{"m":1}'),
    (StructuredOutputSpec("json_object"), '{"any":[1,2]}', "[1,2]"),
    (StructuredOutputSpec("grammar", 'start: "x" ("," "x")*'), "x,x,x", "x,,x"),
])
def test_each_kind_accepts_its_language_only(engine: StructuredOutputs, tokenizer: object,
                                             spec: StructuredOutputSpec, value: str, bad: str) -> None:
    assert walk(engine, tokenizer, spec, value)
    assert not walk(engine, tokenizer, spec, bad)


@pytest.mark.parametrize(("spec", "param", "words"), [
    (StructuredOutputSpec("regex", "a(b"), "structured_outputs", "regex"),
    (StructuredOutputSpec("json_schema", json.dumps({"type": "object", "dependentSchemas": {"a": {}}})),
     "response_format", "dependentSchemas"),
    (StructuredOutputSpec("json_schema", json.dumps({"type": "string", "format": "no-such-format"})),
     "response_format", "no-such-format"),
    (StructuredOutputSpec("json_schema", "[1, 2]"), "response_format", "JSON"),
    (StructuredOutputSpec("grammar", "start: undefined_rule"), "structured_outputs", "grammar"),
])
def test_a_spec_that_cannot_be_enforced_is_a_typed_request_error(engine: StructuredOutputs,
                                                                spec: StructuredOutputSpec, param: str,
                                                                words: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(engine.compile(spec))
    assert caught.value.param == param and words in caught.value.message


def test_compiled_grammars_are_cached_by_spec_and_bounded(engine: StructuredOutputs, tokenizer: object) -> None:
    specs = [StructuredOutputSpec("regex", f"a{{{i}}}") for i in range(1, 4)]
    asyncio.run(engine.compile(specs[0]))
    engine.matcher(specs[0])
    assert engine.num_compiled == 1  # the matcher came from the cache
    engine.matcher(specs[1])
    engine.matcher(specs[2])  # evicts specs[0] (max_cached=2)
    engine.matcher(specs[0])
    assert engine.num_compiled == 4
    first, second = engine.matcher(specs[1]), engine.matcher(specs[1])
    (a,) = tokenizer.encode("a", add_special_tokens=False)  # type: ignore[attr-defined]
    assert first.accept(a) and first.accept(a) and first.matcher.is_accepting() and first.num_accepted == 2
    assert second.num_accepted == 0 and second.accept(a)  # each sequence has its own copy of the grammar


def test_bitmask_allows_exactly_what_the_matcher_allows(engine: StructuredOutputs, tokenizer: object) -> None:
    spec = StructuredOutputSpec("choice", ("cat", "dog"))
    matchers = [engine.matcher(spec), engine.matcher(StructuredOutputSpec("regex", "[0-9]+"))]
    vocab = engine.tokenizer.vocab_size + 40  # the model's logits may be wider than the tokenizer
    bitmask = fill_bitmask(matchers, vocab)
    logits = torch.zeros(3, vocab)
    apply_bitmask(logits, bitmask, [0, 2])
    assert bool((logits[1] == 0).all())  # a row without grammar is untouched
    for row, matcher_index in ((0, 0), (2, 1)):
        allowed = {t for t in range(vocab) if logits[row, t] == 0}
        assert allowed and all(t < engine.tokenizer.vocab_size for t in allowed)
        texts = {tokenizer.decode([t]) for t in allowed}  # type: ignore[attr-defined]
        if matcher_index == 0:
            assert all("cat".startswith(x) or "dog".startswith(x) for x in texts)
        else:
            assert all(x.isdigit() for x in texts)


def test_a_refusal_names_the_kind_and_keeps_the_first_300_characters_of_the_reason(
        engine: StructuredOutputs) -> None:
    prefix = "cannot be enforced by this server's grammar engine (llguidance): "
    cases = [(StructuredOutputSpec("regex", "a(b"), "the regex "),
             (StructuredOutputSpec("grammar", "start: undefined_rule"), "the grammar "),
             (StructuredOutputSpec("json_schema", json.dumps({"type": "string", "format": "no-such-format"})),
              "the JSON schema ")]
    for spec, kind in cases:
        with pytest.raises(InvalidRequestError) as caught:
            engine.matcher(spec)
        assert caught.value.message.startswith(kind + prefix)
    with pytest.raises(InvalidRequestError) as caught:
        engine.matcher(StructuredOutputSpec("grammar", "start: " + "u" * 400))  # llguidance repeats the name
    assert caught.value.message == 'the grammar ' + prefix + 'at 1(8): unknown name: "' + ("u" * 400)[:300 - 24]


def test_rollback_and_reset_return_the_matcher_to_an_earlier_position(engine: StructuredOutputs,
                                                                      tokenizer: object) -> None:
    matcher = engine.matcher(StructuredOutputSpec("regex", "abc"))
    a, b, c = (tokenizer.encode(x, add_special_tokens=False)[0] for x in "abc")  # type: ignore[attr-defined]
    assert matcher.accept(a) and matcher.accept(b) and matcher.accept(c) and matcher.num_accepted == 3
    matcher.rollback(1)  # back to just after "ab": "c" is next again
    assert matcher.num_accepted == 2 and matcher.accept(c) and matcher.num_accepted == 3
    matcher.reset()  # back to the start: "a" is next again
    assert matcher.num_accepted == 0 and matcher.accept(a) and matcher.num_accepted == 1


def test_several_matchers_advance_each_on_its_own_token(engine: StructuredOutputs, tokenizer: object,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmserve.engine.structured as structured

    monkeypatch.setattr(structured, "_executor", None)  # the shared executor is made on first use
    digits, letters = engine.matcher(StructuredOutputSpec("regex", "[0-9]+")), engine.matcher(
        StructuredOutputSpec("regex", "[a-z]+"))
    (seven,) = tokenizer.encode("7", add_special_tokens=False)  # type: ignore[attr-defined]
    (x,) = tokenizer.encode("x", add_special_tokens=False)  # type: ignore[attr-defined]
    bitmask = fill_bitmask([digits, letters], engine.tokenizer.vocab_size)
    logits = torch.zeros(2, engine.tokenizer.vocab_size)
    apply_bitmask(logits, bitmask, [0, 1])
    assert logits[0, seven] == 0 and logits[0, x] == float("-inf")
    assert logits[1, x] == 0 and logits[1, seven] == float("-inf")
    accept_tokens([digits, letters], [seven, x])
    accept_tokens([digits, letters], [seven, seven])  # the second is refused by the letters' grammar
    assert (digits.num_accepted, letters.num_accepted) == (2, 1)
    assert not digits.is_error and letters.is_error
