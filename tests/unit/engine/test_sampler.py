"""The sampler's filters and penalties on hand-made logits."""

from __future__ import annotations

import torch

from vlmserve.engine.sampler import Sampler, SequenceSampling, make_generator
from vlmserve.types import SamplingParams


def seq(output: list[int] | None = None, prompt: list[int] | None = None, end: frozenset[int] = frozenset(),
        **params: object) -> SequenceSampling:
    sampling = SamplingParams(**params)  # type: ignore[arg-type]
    return SequenceSampling(params=sampling, prompt_token_ids=prompt or [], output_token_ids=output or [],
                            generator=make_generator(sampling.seed, "cpu"), end_token_ids=end)


def draw(logits: list[float], n: int = 400, **params: object) -> set[int]:
    sampler = Sampler("cpu")
    row = torch.tensor([logits])
    return {sampler(row, [seq(**params)]).token_ids[0] for _ in range(n)}


def test_greedy_takes_the_argmax() -> None:
    assert draw([0.1, 3.0, 2.9], n=5, temperature=0.0) == {1}


def test_top_k_keeps_only_the_k_best() -> None:
    assert draw([1.0, 0.9, 0.8, 0.7], top_k=2) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    assert draw(logits, top_p=0.7) == {0, 1}
    assert draw(logits, top_p=0.5) == {0}


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    assert draw(logits, min_p=0.5) == {0, 1}


def test_logit_bias_and_min_tokens() -> None:
    sampler = Sampler("cpu")
    row = torch.tensor([[5.0, 0.0, 0.0]])
    assert sampler(row, [seq(temperature=0.0, logit_bias={2: 10.0})]).token_ids == [2]
    # token 0 is an end token: masked until two tokens exist
    assert sampler(row, [seq([7], end=frozenset({0}), temperature=0.0, min_tokens=2)]).token_ids != [0]
    assert sampler(row, [seq([7, 8], end=frozenset({0}), temperature=0.0, min_tokens=2)]).token_ids == [0]


def test_penalties_push_away_from_seen_tokens() -> None:
    sampler = Sampler("cpu")
    row = torch.tensor([[2.0, 1.9, 0.0]])
    assert sampler(row, [seq([0, 0], temperature=0.0, frequency_penalty=0.2)]).token_ids == [1]
    assert sampler(row, [seq([0], temperature=0.0, presence_penalty=0.2)]).token_ids == [1]
    assert sampler(row, [seq([], prompt=[0], temperature=0.0, repetition_penalty=1.2)]).token_ids == [1]
    assert sampler(row, [seq([1], temperature=0.0, frequency_penalty=0.0)]).token_ids == [0]


def test_seeded_rows_do_not_depend_on_their_neighbours() -> None:
    logits = torch.randn(1, 50)
    alone = [Sampler("cpu")(logits, [s]).token_ids[0] for s in [seq(temperature=1.0, seed=3)] for _ in range(1)]
    crowd = torch.cat([torch.randn(2, 50), logits, torch.randn(1, 50)])
    rows = [seq(temperature=1.0), seq(temperature=0.7, seed=9), seq(temperature=1.0, seed=3), seq(temperature=1.0)]
    assert Sampler("cpu")(crowd, rows).token_ids[2] == alone[0]


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    sampler = Sampler("cpu")
    counts = torch.zeros(3)
    for token in sampler(probs.log().repeat(3000, 1), [seq(temperature=1.0) for _ in range(3000)]).token_ids:
        counts[token] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.04)


def test_presence_and_frequency_count_only_generated_tokens() -> None:
    sampler = Sampler("cpu")
    row = torch.tensor([[2.0, 1.9, 0.0]])
    # token 0 fills the prompt but was never generated: presence/frequency leave it alone (OpenAI, vLLM) ...
    assert sampler(row, [seq([], prompt=[0, 0, 0], temperature=0.0, presence_penalty=2.0,
                             frequency_penalty=2.0)]).token_ids == [0]
    # ... while the repetition penalty counts the prompt too (transformers, vLLM)
    assert sampler(row, [seq([], prompt=[0], temperature=0.0, repetition_penalty=1.2)]).token_ids == [1]


def test_logprobs_are_the_raw_distribution_whatever_the_processing() -> None:
    sampler = Sampler("cpu")
    row = torch.tensor([[3.0, 1.0, 0.5, -1.0]])
    raw = row.log_softmax(-1)[0]
    out = sampler(row, [seq([0, 0], prompt=[1], temperature=0.5, logit_bias={3: 40.0}, presence_penalty=1.0,
                            frequency_penalty=0.5, repetition_penalty=1.5, logprobs=True, top_logprobs=2)])
    (position,) = out.logprobs
    assert out.token_ids == [3] and position is not None
    assert abs(position.chosen.logprob - float(raw[3])) < 1e-6
    assert [t.token_id for t in position.top] == [0, 1]
    assert abs(position.top[0].logprob - float(raw[0])) < 1e-6


def test_top_k_of_one_is_greedy() -> None:
    assert draw([1.0, 1.2, 1.1, 0.0], top_k=1) == {1}


def test_unseeded_rows_beside_a_seeded_one_draw_independently() -> None:
    # 64 unseeded rows over a flat distribution of 64 tokens, plus one seeded row: the unseeded rows each get
    # their own noise, so they do not all land on the same token
    rows = [seq(temperature=1.0) for _ in range(64)] + [seq(temperature=1.0, seed=5)]
    tokens = Sampler("cpu")(torch.zeros(65, 64), rows).token_ids
    assert len(set(tokens[:64])) > 20


def test_sampling_leaves_the_global_torch_generator_alone() -> None:
    # the sampler draws from its own generators: unseeded requests do not consume (or depend on) torch's global
    # RNG, which the model's code and other libraries share
    sampler = Sampler("cpu")
    before = torch.get_rng_state()
    sampler(torch.zeros(3, 16), [seq(temperature=1.0) for _ in range(3)])
    sampler(torch.zeros(3, 16), [seq(temperature=1.0), seq(temperature=1.0, seed=1), seq(temperature=1.0)])
    assert torch.equal(torch.get_rng_state(), before)


def test_min_p_of_one_keeps_only_the_best() -> None:
    assert draw([0.1, 0.0, 2.0, 1.9], min_p=1.0) == {2}


def test_a_rows_filters_apply_whatever_the_rows_after_it_ask() -> None:
    # each batch: the row under test first, then a plain row that asks for none of its settings
    plain = {"temperature": 1.0}
    logits = torch.tensor([[1.0, 0.9, 0.8, 0.7], [0.0, 0.0, 0.0, 0.0]])
    sampler = Sampler("cpu")
    for _ in range(100):
        assert sampler(logits, [seq(temperature=1.0, top_k=1), seq(**plain)]).token_ids[0] == 0
        assert sampler(logits, [seq(temperature=1.0, min_p=1.0), seq(**plain)]).token_ids[0] == 0
    greedy_row = torch.tensor([[2.0, 1.9, 0.0], [0.0, 0.0, 0.0]])
    neutral = {"temperature": 0.0}
    assert sampler(greedy_row, [seq(temperature=0.0, logit_bias={2: 5.0}), seq(**neutral)]).token_ids[0] == 2
    assert sampler(greedy_row, [seq([0], temperature=0.0, presence_penalty=1.0), seq(**neutral)]).token_ids[0] == 1
    assert sampler(greedy_row, [seq([0], temperature=0.0, repetition_penalty=2.0), seq(**neutral)]).token_ids[0] == 1
    # the neutral row after a penalised one is left as it was
    assert sampler(greedy_row, [seq([0], temperature=0.0, repetition_penalty=2.0),
                                seq([0], **neutral)]).token_ids == [1, 0]


def test_the_grammar_mask_applies_to_its_own_row_only() -> None:
    from transformers import AutoTokenizer

    from vlmserve.demo import WEIGHTS_DIR
    from vlmserve.engine.structured import StructuredOutputs
    from vlmserve.types import StructuredOutputSpec

    tokenizer = AutoTokenizer.from_pretrained(WEIGHTS_DIR)
    engine = StructuredOutputs(tokenizer)
    try:
        (seven,) = tokenizer.encode("7", add_special_tokens=False)
        vocab = len(tokenizer)
        logits = torch.zeros(2, vocab)
        logits[:, 5] = 9.0  # what both rows would take unconstrained
        constrained = seq(temperature=0.0)
        constrained.grammar = engine.matcher(StructuredOutputSpec("regex", "7"))
        out = Sampler("cpu")(logits, [seq(temperature=0.0), constrained])
        assert out.token_ids == [5, seven] and constrained.grammar.is_finished
    finally:
        engine.shutdown()
