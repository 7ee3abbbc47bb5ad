"""Structured outputs inside the engine cores (tiny random Qwen2-VL): the grammar alone makes the output valid.

A random-weight model writes noise; every output below is valid only because the matcher masks the logits."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

import jsonschema
import pytest
import torch

from tests.integration.engine.conftest import Loaded, engine_config, prompts_with_images, request
from vlmserve.config import EngineConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.generate_core import GenerateEngineCore
from vlmserve.engine.protocol import CoreOutput
from vlmserve.types import FinishReason, GenerationRequest, PreparedPrompt, StructuredOutputSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
JSON_SPEC = StructuredOutputSpec("json_schema", json.dumps(SCHEMA))


def run_all(core: object, requests: list[GenerationRequest]) -> dict[str, list[CoreOutput]]:
    outputs: dict[str, list[CoreOutput]] = {r.request_id: [] for r in requests}
    for r in requests:
        core.add_request(r)  # type: ignore[attr-defined]
    for _ in range(2000):
        if not core.has_work():  # type: ignore[attr-defined]
            break
        core.step(lambda batch: [outputs[o.request_id].append(o) for o in batch])  # type: ignore[attr-defined]
    assert all(o and o[-1].finish_reason is not None for o in outputs.values()), "not every request finished"
    return outputs


def text_of(family: Loaded, outputs: list[CoreOutput]) -> str:
    ids = [t for o in outputs for t in o.new_token_ids]
    return str(family.adapter.tokenizer.decode(ids, skip_special_tokens=True))


def constrained(request_id: str, prompt: PreparedPrompt, spec: StructuredOutputSpec, **sampling: object
                ) -> GenerationRequest:
    return request(request_id, prompt, structured=spec, ignore_eos=False, **{"max_tokens": 120, **sampling})


@pytest.fixture(scope="module")
def family(loaded: Callable[[str], Loaded]) -> Loaded:
    return loaded("qwen2_vl")


def test_json_schema_outputs_validate_greedy_sampled_and_seeded(family: Loaded) -> None:
    prompts = prompts_with_images(family.renderer, 3)
    requests = [constrained("greedy", prompts[0], JSON_SPEC, temperature=0.0),
                *(constrained(f"s{i}", prompts[i % 3], JSON_SPEC, temperature=1.2, seed=i) for i in range(4)),
                constrained("free", prompts[1], JSON_SPEC, temperature=1.0, top_p=0.9)]
    outputs = run_all(PagedEngineCore(family.adapter, engine_config()), requests)
    texts = {}
    for request_id, outs in outputs.items():
        assert outs[-1].finish_reason is FinishReason.STOP, request_id
        texts[request_id] = text_of(family, outs)
        jsonschema.validate(json.loads(texts[request_id]), SCHEMA)
    assert len(set(texts.values())) > 2  # sampled rows differ: the grammar constrains, it does not script
    # a seeded constrained row gives the same text alone as in the crowd above (n > 1 children are seeded so)
    alone = run_all(PagedEngineCore(family.adapter, engine_config()),
                    [constrained("s2", prompts[2], JSON_SPEC, temperature=1.2, seed=2)])
    assert text_of(family, alone["s2"]) == texts["s2"]


def test_regex_choice_grammar_and_json_object(family: Loaded) -> None:
    prompt = prompts_with_images(family.renderer, 1)[0]
    specs = {
        "regex": StructuredOutputSpec("regex", r"[a-c]{2,4}-\d{3}"),
        "choice": StructuredOutputSpec("choice", ("yes", "no", "maybe so")),
        "grammar": StructuredOutputSpec("grammar", 'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,2}/'),
        "object": StructuredOutputSpec("json_object"),
    }
    requests = [constrained(f"{name}-{t}", prompt, spec, temperature=t, seed=5, max_tokens=60)
                for name, spec in specs.items() for t in (0.0, 1.0)]
    outputs = run_all(PagedEngineCore(family.adapter, engine_config()), requests)
    for t in (0.0, 1.0):
        assert re.fullmatch(r"[a-c]{2,4}-\d{3}", text_of(family, outputs[f"regex-{t}"]))
        assert text_of(family, outputs[f"choice-{t}"]) in ("yes", "no", "maybe so")
        assert re.fullmatch(r"\(\d{1,2}(\+\d{1,2})*\)", text_of(family, outputs[f"grammar-{t}"]))
        assert outputs[f"regex-{t}"][-1].finish_reason is FinishReason.STOP
        obj = outputs[f"object-{t}"]
        if obj[-1].finish_reason is FinishReason.STOP:  # an object may be cut by max_tokens; one that ends is whole
            assert isinstance(json.loads(text_of(family, obj)), dict)
        else:
            assert text_of(family, obj).startswith("{")


def test_logprobs_and_stop_strings_under_a_grammar(family: Loaded) -> None:
    prompt = prompts_with_images(family.renderer, 1)[0]
    spec = StructuredOutputSpec("regex", r"ab(c|d)+e")
    outputs = run_all(PagedEngineCore(family.adapter, engine_config()), [
        constrained("lp", prompt, spec, temperature=0.0, logprobs=True, top_logprobs=2, max_tokens=12),
        constrained("stop", prompt, StructuredOutputSpec("regex", r"(xy|z){1,3}q{4}"), stop=("q",), max_tokens=30)])
    lp = [p for o in outputs["lp"] for p in (o.new_logprobs or [])]
    assert len(lp) == sum(len(o.new_token_ids) for o in outputs["lp"])
    inputs = family.reference.collate([prompt])
    with torch.inference_mode():
        raw = family.reference.model(**inputs).logits[0, -1].float().log_softmax(-1)
    first = lp[0]
    assert first is not None
    # the grammar picks "a", not the model's favourite; the logprobs stay the model's raw distribution
    assert first.chosen.token_id != int(raw.argmax())
    assert abs(first.chosen.logprob - float(raw[first.chosen.token_id])) < 1e-4
    assert [t.token_id for t in first.top] == raw.topk(2).indices.tolist()
    assert text_of(family, outputs["lp"]).startswith("ab")
    stopped = text_of(family, outputs["stop"])
    assert outputs["stop"][-1].finish_reason is FinishReason.STOP
    assert stopped.endswith("q") and "q" not in stopped[:-1]  # ended in the core at the first "q" of four


def test_preemption_keeps_the_grammar_in_step(family: Loaded) -> None:
    prompts = prompts_with_images(family.renderer, 4)
    longest = max(p.num_tokens for p in prompts) + 120
    core = PagedEngineCore(family.adapter, engine_config(num_kv_blocks=-(-longest // 4) + 6, block_size=4))
    outputs = run_all(core, [constrained(f"p{i}", p, JSON_SPEC, temperature=1.0, seed=i)
                             for i, p in enumerate(prompts)])
    assert core.stats().num_preemptions > 0
    for outs in outputs.values():
        jsonschema.validate(json.loads(text_of(family, outs)), SCHEMA)


def test_generate_engine_enforces_the_grammar(family: Loaded) -> None:
    prompts = prompts_with_images(family.renderer, 2)
    core = GenerateEngineCore(family.fresh_adapter(), EngineConfig())
    outputs = run_all(core, [constrained("g0", prompts[0], JSON_SPEC, temperature=0.0),
                             constrained("g1", prompts[1], StructuredOutputSpec("choice", ("left", "right")),
                                         temperature=1.0, seed=3)])
    jsonschema.validate(json.loads(text_of(family, outputs["g0"])), SCHEMA)
    assert text_of(family, outputs["g1"]) in ("left", "right")
    assert outputs["g1"][-1].finish_reason is FinishReason.STOP


def test_a_spec_that_does_not_compile_fails_only_its_request(family: Loaded,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    prompt = prompts_with_images(family.renderer, 1)[0]
    core = PagedEngineCore(family.adapter, engine_config())
    with caplog.at_level(logging.WARNING, logger="vlmserve.engine.core"):
        outputs = run_all(core, [constrained("bad", prompt, StructuredOutputSpec("regex", "a(b")),
                                 constrained("good", prompt, StructuredOutputSpec("choice", ("ok",)))])
    (refused,) = outputs["bad"]
    assert (refused.request_id, refused.new_token_ids, refused.finish_reason) == ("bad", [], FinishReason.ERROR)
    assert refused.error and "regex" in refused.error
    assert [r.getMessage() for r in caplog.records] == [f"request bad refused by the engine: {refused.error}"]
    assert text_of(family, outputs["good"]) == "ok"
    # the core keeps refusing such requests in later steps
    again = run_all(core, [constrained("bad-again", prompt, StructuredOutputSpec("regex", "a(b"))])
    assert again["bad-again"][-1].finish_reason is FinishReason.ERROR


def test_a_tool_call_grammar_with_an_embedded_schema(family: Loaded) -> None:
    """The shape the tool-calling layer builds for tool_choice "required": a Hermes tag around a JSON call whose
    arguments follow the tool's schema (Lark with `%json`)."""
    arguments = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                  "unit": {"enum": ["c", "f"]}},
                 "required": ["city", "unit"], "additionalProperties": False}
    lark = ('start: "<tool_call>" "{\\"name\\":\\"weather\\",\\"arguments\\":" args "}" "</tool_call>"\n'
            f"args: %json {json.dumps(arguments)}")
    prompt = prompts_with_images(family.renderer, 1)[0]
    outputs = run_all(PagedEngineCore(family.adapter, engine_config()),
                      [constrained(f"t{seed}", prompt, StructuredOutputSpec("grammar", lark), temperature=1.0,
                                   seed=seed) for seed in range(3)])
    for outs in outputs.values():
        text = text_of(family, outs)
        assert text.startswith("<tool_call>") and text.endswith("</tool_call>"), text
        call = json.loads(text[len("<tool_call>"):-len("</tool_call>")])
        assert call["name"] == "weather"
        jsonschema.validate(call["arguments"], arguments)


def test_min_tokens_under_a_grammar_still_ends_where_the_grammar_ends(family: Loaded) -> None:
    prompt = prompts_with_images(family.renderer, 1)[0]
    outputs = run_all(PagedEngineCore(family.adapter, engine_config()),
                      [constrained("short", prompt, StructuredOutputSpec("regex", "ab?"), temperature=0.0,
                                   min_tokens=6)])
    assert text_of(family, outputs["short"]) in ("a", "ab")
    assert outputs["short"][-1].finish_reason is FinishReason.STOP
