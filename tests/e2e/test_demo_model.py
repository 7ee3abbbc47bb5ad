"""The bundled demo model through `vlmserve serve` (no MODEL argument) and the official openai client.

The demo model is the oracle for batching and caching: a wrong image reaching a request shows as a wrong answer.
Two kinds of checks:
- structural, always on: concurrent answers equal the same requests answered alone (no cross-request mix-up);
- accuracy (issue 3): >= 95 % of >= 100 fresh questions right, and 32 concurrent requests all right.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import ServerProcess
from vlmserve.demo.shapes import encode, is_correct, sample_qa

FIRST_SEED = 7_000_000  # far from training's and evaluate.py's seed streams


@pytest.fixture(scope="module")
def demo(start_server: type[ServerProcess]) -> Iterator[ServerProcess]:
    yield start_server(["--max-num-seqs", "32"])


@pytest.fixture(scope="module")
def base_url(demo: ServerProcess) -> str:
    return f"{demo.base_url}/v1"


def client_for(base_url: str) -> openai.AsyncOpenAI:
    """A client for one asyncio.run: its connections belong to that run's event loop."""
    return openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)


def question(seed: int) -> tuple[list[dict[str, Any]], str, int]:
    """A fresh question as OpenAI messages (PNG or JPEG data URI, varied sizes), its answer and type."""
    image, text, answer, qtype = sample_qa(seed)
    fmt = random.Random(seed).choice(["PNG", "JPEG"])
    data = encode(image, fmt, quality=random.Random(seed + 1).randint(80, 95)) if fmt == "JPEG" else encode(image)
    url = f"data:image/{fmt.lower()};base64,{base64.b64encode(data).decode()}"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": text}]}]
    return messages, answer, qtype


async def ask(client: openai.AsyncOpenAI, messages: list[dict[str, Any]]) -> str:
    response = await client.chat.completions.create(model="vlmserve-demo", messages=messages, temperature=0,
                                                    max_tokens=40)
    return response.choices[0].message.content or ""


def test_demo_is_served_under_its_name(demo: ServerProcess) -> None:
    with openai.OpenAI(base_url=f"{demo.base_url}/v1", api_key="unused") as client:
        assert [m.id for m in client.models.list().data] == ["vlmserve-demo"]
        reply = client.chat.completions.create(model="vlmserve-demo", max_tokens=30, temperature=0,
                                               messages=[{"role": "user", "content": "Hello!"}])
    assert "image" in (reply.choices[0].message.content or "").lower()  # it asks for a picture


def test_concurrent_answers_equal_answers_alone(base_url: str) -> None:
    questions = [question(FIRST_SEED + 500 + i)[0] for i in range(16)]

    async def run() -> tuple[list[str], list[str]]:
        async with client_for(base_url) as client:
            together = await asyncio.gather(*(ask(client, q) for q in questions))
            alone = [await ask(client, q) for q in questions]
        return list(together), alone

    together, alone = asyncio.run(run())
    assert together == alone


def test_fresh_questions_are_answered_right(base_url: str) -> None:
    cases = [question(FIRST_SEED + i) for i in range(105)]
    assert {qtype for _, _, qtype in cases} == set(range(1, 8))

    async def run() -> list[str]:
        semaphore = asyncio.Semaphore(8)
        async with client_for(base_url) as client:

            async def bounded(messages: list[dict[str, Any]]) -> str:
                async with semaphore:
                    return await ask(client, messages)

            return list(await asyncio.gather(*(bounded(m) for m, _, _ in cases)))

    answers = asyncio.run(run())
    right = sum(is_correct(a, expected, qtype) for a, (_, expected, qtype) in zip(answers, cases, strict=True))
    assert right / len(cases) >= 0.95, f"{right}/{len(cases)} right"


def test_thirty_two_simultaneous_images_each_get_their_own_answer(base_url: str) -> None:
    cases = [question(FIRST_SEED + 1000 + i) for i in range(32)]

    async def run() -> list[str]:
        async with client_for(base_url) as client:
            return list(await asyncio.gather(*(ask(client, m) for m, _, _ in cases)))

    answers = asyncio.run(run())
    wrong = [(a, expected) for a, (_, expected, qtype) in zip(answers, cases, strict=True)
             if not is_correct(a, expected, qtype)]
    assert not wrong, wrong


def test_image_in_an_earlier_turn_still_counts(base_url: str) -> None:
    messages, _, _ = question(FIRST_SEED + 2000)
    follow_up = [*messages, {"role": "assistant", "content": "Let me look."},
                 {"role": "user", "content": "How many shapes are there?"}]
    async def run() -> tuple[int, int]:
        async with client_for(base_url) as client:
            with_image = await client.chat.completions.create(model="vlmserve-demo", messages=follow_up,
                                                              max_tokens=5, temperature=0)
            text_turns = [{"role": "user", "content": "Hi"}, *follow_up[1:]]
            without = await client.chat.completions.create(model="vlmserve-demo", messages=text_turns,
                                                           max_tokens=5, temperature=0)
        assert with_image.usage is not None and without.usage is not None
        return with_image.usage.prompt_tokens, without.usage.prompt_tokens

    with_image, without = asyncio.run(run())
    assert with_image > without + 16  # the earlier turn's image tokens are in the prompt
