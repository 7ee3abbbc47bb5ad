"""Benchmark inputs: distinct seeded images, sized prompts, fixed-length request bodies, W3 histories."""

from __future__ import annotations

import io
import json

from PIL import Image

from bench.vocab import build_full_vocab_tokenizer
from bench.workloads import (
    Dialect,
    RequestOptions,
    conversation_messages,
    data_uri,
    noise_image_png,
    prompt_text,
    request_body,
)


def test_images_are_seeded_distinct_and_448() -> None:
    first, again, other = noise_image_png(1), noise_image_png(1), noise_image_png(2)
    assert first == again and first != other
    assert Image.open(io.BytesIO(first)).size == (448, 448)
    assert len(first) < 200_000  # compressible: a realistic upload, not 600 kB of noise
    assert data_uri(first).startswith("data:image/png;base64,")


def test_prompt_is_sized_with_the_tokenizer() -> None:
    # The raw tokenizers.Tokenizer has the same encode(text, add_special_tokens=False) as transformers' classes.
    tokenizer = build_full_vocab_tokenizer(vocab_size=12_000, special_tokens={"<|endoftext|>": 11_999})
    text = prompt_text(3, 100, tokenizer)
    assert 90 <= len(tokenizer.encode(text, add_special_tokens=False)) <= 100
    assert text != prompt_text(4, 100, tokenizer)


def test_bodies_force_fixed_length_in_each_dialect() -> None:
    messages = [{"role": "user", "content": "hi"}]
    openai = request_body(messages, RequestOptions(model="bench", max_tokens=128))
    assert openai["ignore_eos"] is True and openai["stream_options"] == {"include_usage": True}
    assert openai["stream"] is True and openai["max_tokens"] == 128 and openai["temperature"] == 0.0
    tserve = request_body(messages, RequestOptions(model="/m", max_tokens=64, dialect=Dialect.TRANSFORMERS_SERVE))
    assert "ignore_eos" not in tserve and "stream_options" not in tserve
    generation = json.loads(tserve["generation_config"])
    assert generation["max_new_tokens"] == generation["min_new_tokens"] == 64 and not generation["do_sample"]


def test_conversation_resends_history_with_the_image_first() -> None:
    messages = conversation_messages("data:image/png;base64,AAAA", ["answer one", "answer two"])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"][0]["type"] == "image_url"
    assert messages[1]["content"] == "answer one" and messages[3]["content"] == "answer two"
    assert all(isinstance(m["content"], str) for m in messages[1:])
