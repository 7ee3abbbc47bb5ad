"""Benchmark inputs: seeded distinct images and prompts, and the request bodies of W1/W2/W3.

Every request gets its own image and its own text, drawn from seeds, so no image, embedding or prefix cache can
serve one request from another's work (W3 re-sends one conversation's image on purpose). Images are random
colour blocks: unique, yet PNG-compressible to a realistic upload size (pure per-pixel noise would make every
upload ~600 kB and benchmark base64/PNG decoding instead of the model).
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass
from typing import Any

_WORDS = [
    "the", "image", "shows", "a", "small", "red", "house", "next", "to", "a", "tall", "green", "tree",
    "under", "a", "bright", "blue", "sky", "with", "white", "clouds", "there", "is", "a", "person",
    "walking", "a", "brown", "dog", "along", "the", "road", "while", "two", "children", "play", "with", "a",
    "yellow", "ball", "near", "the", "fence", "a", "car", "is", "parked", "by", "the", "gate", "and",
    "birds", "fly", "over", "the", "roof", "describe", "every", "object", "its", "colour", "its",
    "position", "and", "what", "might", "happen", "next", "in", "the", "scene", "then", "count", "the",
    "windows", "doors", "and", "animals", "you", "can", "see",
]

W3_QUESTIONS = [
    "Describe this picture in detail.",
    "What colours stand out the most, and where are they?",
    "How many distinct regions can you count in the image?",
    "Which part of the picture is the brightest? Explain.",
    "Summarise everything we discussed about the image in two sentences.",
]


class Dialect:
    """How a server wants the fixed-length, usage-reporting request expressed."""

    OPENAI = "openai"  # vLLM-style: ignore_eos + stream_options.include_usage (vlmserve, the seed server)
    TRANSFORMERS_SERVE = "transformers-serve"  # rejects unknown fields: fixed length via generation_config


def noise_image_png(seed: int, size: int = 448, block: int = 8) -> bytes:
    """A seeded image of random `block`x`block` colour squares, PNG-encoded."""
    from PIL import Image

    rng = random.Random(seed)
    cells = size // block
    small = Image.frombytes("RGB", (cells, cells), bytes(rng.getrandbits(8) for _ in range(cells * cells * 3)))
    image = small.resize((size, size), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def prompt_text(seed: int, num_tokens: int = 100, tokenizer: Any = None) -> str:
    """A seeded English-like prompt of about `num_tokens` tokens (exact when a tokenizer is given)."""
    rng = random.Random(seed)
    words = [rng.choice(_WORDS) for _ in range(num_tokens * 2)]
    if tokenizer is None:
        # Without the tokenizer, assume ~1.6 tokens per word (what the benchmark vocabulary gives).
        return " ".join(words[: max(1, int(num_tokens / 1.6))]) + "?"
    low, high = 1, len(words)
    while low < high:  # the longest word prefix that stays within num_tokens
        mid = (low + high + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]) + "?", add_special_tokens=False)) <= num_tokens:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[:low]) + "?"


def image_message(image_url: str, text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                        {"type": "text", "text": text}]}


@dataclass(frozen=True)
class RequestOptions:
    """What every request of a run shares."""

    model: str
    max_tokens: int = 128
    dialect: str = Dialect.OPENAI
    temperature: float = 0.0


def request_body(messages: list[dict[str, Any]], options: RequestOptions) -> dict[str, Any]:
    """A streaming chat-completions body that forces exactly `max_tokens` output tokens."""
    body: dict[str, Any] = {
        "model": options.model, "messages": messages, "max_tokens": options.max_tokens,
        "temperature": options.temperature, "stream": True,
    }
    if options.dialect == Dialect.TRANSFORMERS_SERVE:
        # transformers serve refuses fields outside the OpenAI schema (ignore_eos gets a 422) and always reports
        # usage in its last chunk; its own `generation_config` field fixes the length.
        body["generation_config"] = json.dumps({
            "max_new_tokens": options.max_tokens, "min_new_tokens": options.max_tokens,
            "do_sample": options.temperature > 0})
    else:
        body["ignore_eos"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def single_image_bodies(num_requests: int, options: RequestOptions, *, seed: int = 0, prompt_tokens: int = 100,
                        tokenizer: Any = None) -> list[dict[str, Any]]:
    """W1/W2: one distinct 448x448 image + ~`prompt_tokens` distinct text tokens per request."""
    bodies = []
    for i in range(num_requests):
        image = data_uri(noise_image_png(seed * 1_000_003 + i))
        text = prompt_text(seed * 1_000_003 + i, prompt_tokens, tokenizer)
        bodies.append(request_body([image_message(image, text)], options))
    return bodies


def conversation_messages(image_url: str, answers: list[str]) -> list[dict[str, Any]]:
    """W3 turn len(answers)+1: the first question with the image, every earlier answer and question, a new one."""
    messages = [image_message(image_url, W3_QUESTIONS[0])]
    for turn, answer in enumerate(answers, start=1):
        messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": W3_QUESTIONS[turn % len(W3_QUESTIONS)]})
    return messages
