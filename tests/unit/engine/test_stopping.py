"""When a sequence ends and why (engine.stopping), on hand-made sequences: end tokens, grammar, stop strings
matched with the client's text options, max_tokens and the context window."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2TokenizerFast

from tests.fixtures.tiny.tokenizer import build_bpe_tokenizer
from vlmserve.demo import WEIGHTS_DIR
from vlmserve.demo.build import QWEN_SPECIAL_TOKENS
from vlmserve.engine.sampler import SequenceSampling
from vlmserve.engine.stopping import finish_reason, make_sampling
from vlmserve.engine.structured import StructuredOutputs
from vlmserve.engine.text_policy import TextPolicy
from vlmserve.errors import UnsupportedFeatureError
from vlmserve.types import (
    FinishReason,
    GenerationRequest,
    PreparedPrompt,
    SamplingParams,
    StructuredOutputSpec,
)

EOS = frozenset({2})


def sampling(tokenizer: object = None, policy: TextPolicy | None = None,
             engine: StructuredOutputs | None = None, **params: object) -> SequenceSampling:
    request = GenerationRequest("r", PreparedPrompt(token_ids=[5, 6]), SamplingParams(**params))  # type: ignore[arg-type]
    return make_sampling(request, eos_token_ids=EOS, device="cpu", tokenizer=tokenizer,  # type: ignore[arg-type]
                         text_policy=policy, structured=engine)


def feed(seq: SequenceSampling, tokens: list[int], *, max_model_len: int = 1000) -> list[FinishReason | None]:
    """finish_reason after each token, appended (and given to the grammar) as the cores do; a 2-token prompt."""
    reasons = []
    for token in tokens:
        seq.output_token_ids.append(token)
        if seq.grammar is not None:
            assert seq.grammar.accept(token)
        reasons.append(finish_reason(seq, token, num_tokens=2 + len(seq.output_token_ids),
                                     max_model_len=max_model_len))
    return reasons


def test_eos_and_stop_token_ids_end_the_sequence_unless_ignore_eos() -> None:
    assert feed(sampling(max_tokens=9, stop_token_ids=(7,)), [4, 2]) == [None, FinishReason.STOP]
    assert feed(sampling(max_tokens=9, stop_token_ids=(7,)), [4, 7]) == [None, FinishReason.STOP]
    assert feed(sampling(max_tokens=9, stop_token_ids=(7,), ignore_eos=True), [2, 2, 7]) == [
        None, None, FinishReason.STOP]


def test_max_tokens_and_the_context_window_end_it_with_length() -> None:
    assert feed(sampling(max_tokens=3), [4, 4, 4]) == [None, None, FinishReason.LENGTH]
    # prompt 2 + 3 generated = a full 5-token context
    assert feed(sampling(max_tokens=9), [4, 4, 4], max_model_len=5) == [None, None, FinishReason.LENGTH]
    assert feed(sampling(max_tokens=9), [4, 4, 4], max_model_len=6) == [None, None, None]


def test_structured_outputs_need_an_engine_that_has_them() -> None:
    with pytest.raises(UnsupportedFeatureError) as caught:
        sampling(engine=None, max_tokens=4, structured=StructuredOutputSpec("regex", "a+"))
    assert caught.value.message == "structured outputs are not available on this engine"
    assert caught.value.param == "response_format"


def test_a_complete_grammar_ends_the_sequence() -> None:
    tokenizer = AutoTokenizer.from_pretrained(WEIGHTS_DIR)
    engine = StructuredOutputs(tokenizer, eos_token_ids=frozenset({tokenizer.eos_token_id}))
    try:
        ids = tokenizer.encode("yes", add_special_tokens=False)
        spec = StructuredOutputSpec("regex", "yes")
        assert feed(sampling(engine=engine, max_tokens=50, structured=spec), ids)[-1] == FinishReason.STOP
        # the grammar is the request's own: "yes" completes "yes" only, not "yes!?"
        longer = feed(sampling(engine=engine, max_tokens=50, structured=StructuredOutputSpec("regex", "yes!?")), ids)
        assert longer[-1] is None
    finally:
        engine.shutdown()


QWEN_GROUNDING = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]


def test_stop_strings_are_matched_in_the_text_the_client_gets() -> None:
    raw = build_bpe_tokenizer(QWEN_SPECIAL_TOKENS + QWEN_GROUNDING)
    tokenizer: PreTrainedTokenizerFast = Qwen2TokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                                                            pad_token="<|endoftext|>", unk_token=None, bos_token=None)
    policy = TextPolicy.from_tokenizer(tokenizer)
    ids = tokenizer.encode("the cat<|box_start|>(1,2)<|box_end|>", add_special_tokens=False)
    at_box = ids.index(tokenizer.convert_tokens_to_ids("<|box_start|>"))

    def reasons(stop: str, **options: object) -> list[FinishReason | None]:
        return feed(sampling(tokenizer, policy, max_tokens=99, stop=(stop,), **options), ids)

    stopped = [None] * at_box + [FinishReason.STOP]
    # the grounding markup is kept by default, so a stop string can match it ...
    assert reasons("<|box_start|>")[:at_box + 1] == stopped
    # ... but not when the request drops every special token
    assert reasons("<|box_start|>", skip_special_tokens=True) == [None] * len(ids)
    # spaces_between_special_tokens puts a space before the tag in the text, and so in what stop strings see
    assert reasons("cat <|box", spaces_between_special_tokens=True)[:at_box + 1] == stopped
    assert reasons("cat <|box") == [None] * len(ids)
