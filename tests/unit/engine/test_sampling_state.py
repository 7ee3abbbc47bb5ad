"""The batched sampling state against a plain per-row reference, over several steps with rows coming and going."""

from __future__ import annotations

import random

import torch

from vlmserve.engine.sampler import Sampler, SequenceSampling, make_generator
from vlmserve.types import SamplingParams

VOCAB = 64


def reference_choice(logits: torch.Tensor, seq: SequenceSampling, generator: torch.Generator | None) -> int:
    """One row, the textbook way: every setting applied with its own loop."""
    p = seq.params
    x = logits.clone().float()
    for token, bias in p.logit_bias.items():
        x[token] += bias
    if len(seq.output_token_ids) < p.min_tokens:
        for token in seq.end_token_ids:
            x[token] = float("-inf")
    if p.repetition_penalty != 1.0:
        for token in set(seq.prompt_token_ids) | set(seq.output_token_ids):
            x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token in set(seq.output_token_ids):
        count = seq.output_token_ids.count(token)
        x[token] -= p.frequency_penalty * count + p.presence_penalty
    if p.temperature == 0.0:
        return int(x.argmax())
    x = x / p.temperature
    if 0 < p.top_k < VOCAB:
        kth = x.sort(descending=True).values[p.top_k - 1]
        x[x < kth] = float("-inf")
    probs = x.softmax(-1)
    mass = 0.0
    for token in probs.argsort(descending=True).tolist():  # keep the most likely tokens until p is reached
        kept = float(probs[token])
        if mass >= p.top_p:
            probs[token] = 0.0
        mass += kept
    if p.min_p > 0:
        probs[probs < probs.max() * p.min_p] = 0.0
    assert generator is not None
    noise = torch.empty(VOCAB).exponential_(generator=generator)
    return int((probs / noise).argmax())


def random_params(rng: random.Random, index: int) -> SamplingParams:
    greedy = index % 4 == 0
    return SamplingParams(
        temperature=0.0 if greedy else rng.choice([0.5, 1.0, 1.7]), top_k=rng.choice([0, 0, 5, 20]),
        top_p=rng.choice([1.0, 0.9, 0.6]), min_p=rng.choice([0.0, 0.0, 0.1]),
        presence_penalty=rng.choice([0.0, 0.5, -0.3]), frequency_penalty=rng.choice([0.0, 0.4]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
        logit_bias={rng.randrange(VOCAB): rng.uniform(-5, 5) for _ in range(rng.randrange(3))},
        min_tokens=rng.choice([0, 2]), seed=None if greedy else 1000 + index, logprobs=index % 3 == 0,
        top_logprobs=index % 3)


def make_seq(rng: random.Random, index: int) -> SequenceSampling:
    params = random_params(rng, index)
    return SequenceSampling(params=params, prompt_token_ids=[rng.randrange(VOCAB) for _ in range(6)],
                            output_token_ids=[], generator=make_generator(params.seed, "cpu"),
                            end_token_ids=frozenset({rng.randrange(VOCAB), rng.randrange(VOCAB)}))


def test_batched_state_matches_the_per_row_reference_over_steps() -> None:
    rng = random.Random(7)
    torch.manual_seed(0)
    sampler = Sampler("cpu")
    live = [make_seq(rng, i) for i in range(10)]
    twins = {id(s): make_generator(s.params.seed, "cpu") for s in live}  # the reference's own generators
    next_index = 10
    for step in range(12):
        logits = torch.randn(len(live), VOCAB) * 3
        expected = [reference_choice(logits[i], s, twins[id(s)]) for i, s in enumerate(live)]
        out = sampler(logits, live)
        assert out.token_ids == expected, f"step {step}"
        raw = logits.log_softmax(-1)
        for i, s in enumerate(live):
            lp = out.logprobs[i]
            assert (lp is not None) == s.params.logprobs
            if lp is not None:
                assert abs(lp.chosen.logprob - float(raw[i, expected[i]])) < 1e-5
                assert [t.token_id for t in lp.top] == raw[i].topk(s.params.top_logprobs).indices.tolist()
            s.output_token_ids.append(expected[i])
        # rows leave (finish or preemption) and new ones enter; a preempted row comes back with its tokens
        if step % 3 == 1:
            gone = live.pop(rng.randrange(len(live)))
            sampler.release(gone)
            if step % 2:
                live.insert(rng.randrange(len(live) + 1), gone)  # preempted, rebuilt from its output tokens
        if step % 4 == 2:
            new = make_seq(rng, next_index)
            twins[id(new)] = make_generator(new.params.seed, "cpu")
            live.insert(rng.randrange(len(live) + 1), new)
            next_index += 1
    assert sampler.state is not None and sampler.state.num_active == len(live)


def test_a_freed_slot_forgets_its_previous_holder() -> None:
    sampler = Sampler("cpu")
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 1.0
    first = SequenceSampling(SamplingParams(temperature=0.0, logit_bias={5: 50.0}, frequency_penalty=2.0), [],
                             [3, 3, 3])
    assert sampler(logits, [first]).token_ids == [5]
    sampler.release(first)
    second = SequenceSampling(SamplingParams(temperature=0.0), [], [])
    assert sampler(logits, [second]).token_ids == [3]  # neither the bias nor the counts of `first` remain
    assert second.slot == 0


def test_slots_grow_past_the_initial_capacity() -> None:
    sampler = Sampler("cpu")
    rows = [SequenceSampling(SamplingParams(temperature=0.0, presence_penalty=1.0), [], []) for _ in range(20)]
    logits = torch.randn(20, VOCAB)
    assert sampler(logits, rows).token_ids == logits.argmax(-1).tolist()
    assert sorted(r.slot for r in rows if r.slot is not None) == list(range(20))


def greedy(output: list[int] | None = None, prompt: list[int] | None = None, end: frozenset[int] = frozenset(),
           **params: object) -> SequenceSampling:
    return SequenceSampling(SamplingParams(temperature=0.0, **params), prompt or [], output or [],  # type: ignore[arg-type]
                            end_token_ids=end)


def test_rows_keep_their_counts_bias_and_end_tokens_when_the_slots_grow() -> None:
    rng = random.Random(3)
    sampler = Sampler("cpu")
    rows = [make_seq(rng, i) for i in range(20)]  # past the 8 initial slots, so the buffers grow mid-admission
    for s in rows:
        s.output_token_ids.extend(rng.randrange(VOCAB) for _ in range(rng.randrange(3)))
    twins = {id(s): make_generator(s.params.seed, "cpu") for s in rows}
    for step in range(3):
        logits = torch.randn(len(rows), VOCAB) * 3
        expected = [reference_choice(logits[i], s, twins[id(s)]) for i, s in enumerate(rows)]
        assert sampler(logits, rows).token_ids == expected, f"step {step}"
        for s, token in zip(rows, expected, strict=True):
            s.output_token_ids.append(token)


def test_the_repetition_penalty_divides_positive_logits_and_multiplies_negative_ones() -> None:
    sampler = Sampler("cpu")
    # token 0 is in the prompt: 0.5 / 1.2 = 0.42 falls below 0.45; -1.0 * 1.2 = -1.2 falls below -1.1
    assert sampler(torch.tensor([[0.5, 0.45]]), [greedy(prompt=[0], repetition_penalty=1.2)]).token_ids == [1]
    assert sampler(torch.tensor([[-1.0, -1.1]]), [greedy(prompt=[0], repetition_penalty=1.2)]).token_ids == [1]
    # a penalty below 1 favours the repeated token the same way round
    assert sampler(torch.tensor([[0.4, 0.45]]), [greedy(output=[0], repetition_penalty=0.8)]).token_ids == [0]
    assert sampler(torch.tensor([[-1.1, -1.0]]), [greedy(output=[0], repetition_penalty=0.8)]).token_ids == [0]


def test_ids_outside_the_vocabulary_are_ignored() -> None:
    sampler = Sampler("cpu")
    logits = torch.zeros(1, VOCAB)
    logits[0, 2], logits[0, 1] = 1.0, 0.6
    # prompt/output ids past the logits (e.g. placeholders beyond the head) and biases on them change nothing:
    # token 2 alone is penalised, 1 / 1.5 - 0.1 = 0.57 < 0.6
    row = greedy(output=[VOCAB, 2], prompt=[VOCAB, -1, 2], repetition_penalty=1.5, frequency_penalty=0.1,
                 logit_bias={VOCAB: 100.0})
    assert sampler(logits, [row]).token_ids == [1]


def test_a_bias_on_token_zero_applies() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = 1.0
    assert Sampler("cpu")(logits, [greedy(logit_bias={0: 2.0})]).token_ids == [0]


def test_a_bias_with_only_unknown_ids_is_no_bias() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = 1.0
    rows = [greedy(logit_bias={VOCAB + 3: 9.0}), greedy(logit_bias={-1: 9.0})]
    assert Sampler("cpu")(logits, rows).token_ids == [5, 5]


def test_rows_keep_their_bias_when_a_wider_one_enters() -> None:
    sampler = Sampler("cpu")
    logits = torch.zeros(1, VOCAB)
    narrow = greedy(logit_bias={7: 3.0})
    assert sampler(logits, [narrow]).token_ids == [7]
    wide = greedy(logit_bias={9: 1.0, 10: 2.0, 11: 5.0})
    assert sampler(torch.zeros(2, VOCAB), [narrow, wide]).token_ids == [7, 11]
    assert sampler(torch.zeros(2, VOCAB), [wide, narrow]).token_ids == [11, 7]


def test_rows_keep_their_end_tokens_when_a_row_with_more_enters() -> None:
    sampler = Sampler("cpu")
    # each row's end tokens lead its logits; until min_tokens they are masked, so the runner-up is chosen
    first = greedy(end=frozenset({5}), min_tokens=3)
    second = greedy(end=frozenset({6, 7}), min_tokens=3)
    third = greedy(end=frozenset({8, 9, 10}), min_tokens=3)
    fourth = greedy(end=frozenset({11, 12}), min_tokens=3)  # narrower than the table by then

    def logits_for(rows: list[SequenceSampling]) -> torch.Tensor:
        x = torch.zeros(len(rows), VOCAB)
        x[:, 0] = 1.0  # the runner-up; padding must never mask it
        for i, r in enumerate(rows):
            x[i, sorted(r.end_token_ids)] = 2.0
        return x

    batch: list[SequenceSampling] = []
    for row in (first, second, third, fourth):
        batch.append(row)
        assert sampler(logits_for(batch), batch).token_ids == [0] * len(batch)


def test_a_repetition_penalty_alone_counts_the_prompt_and_the_output() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 3], logits[0, 4], logits[0, 5] = 2.0, 1.5, 1.2
    # 3 was generated, 4 is in the prompt: both halved below 5
    assert Sampler("cpu")(logits, [greedy(output=[3], prompt=[4], repetition_penalty=2.0)]).token_ids == [5]
    # and a slot taken over from a row with penalties starts from this row's own tokens
    sampler = Sampler("cpu")
    first = greedy(output=[5, 5], frequency_penalty=1.0)
    assert sampler(logits, [first]).token_ids == [3]
    sampler.release(first)
    assert sampler(logits, [greedy(output=[3], prompt=[4], repetition_penalty=2.0)]).token_ids == [5]


def test_min_tokens_without_end_tokens_masks_nothing() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 2] = 1.0
    rows = [greedy(min_tokens=3), greedy(end=frozenset({2}), min_tokens=3)]  # e.g. ignore_eos and no stop ids
    assert Sampler("cpu")(logits, rows).token_ids[0] == 2
