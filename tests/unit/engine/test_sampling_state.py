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
