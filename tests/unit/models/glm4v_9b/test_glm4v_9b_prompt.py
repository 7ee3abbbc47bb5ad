"""GLM-4V-9B's prompt format, tokenizer and image preprocessing, against the original's documented behaviour.

The expected strings follow the original `ChatGLM4Tokenizer.apply_chat_template` (published tokenization_chatglm.py)
and vLLM's GLM-4V example prompt `<|user|>\\n<|begin_of_image|><|endoftext|><|end_of_image|>{question}<|assistant|>`
(the tokenizer adds `[gMASK]<sop>` in front).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import regex
import torch
from PIL import Image

from vlmserve.errors import InvalidRequestError, UnsupportedFeatureError
from vlmserve.models.glm4v_9b.config import GLM4V_9B_CONFIG
from vlmserve.models.glm4v_9b.processor import CLIP_MEAN, CLIP_STD
from vlmserve.models.glm4v_9b.tokenizer import GLM4_PATTERN, GLM4_SPECIAL_TOKENS, read_ranks

IMAGE = "<|begin_of_image|><|endoftext|><|end_of_image|>"


def user(text: str, *, image: bool = False, image_first: bool = False) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image:
        parts.insert(0 if image_first else 1, {"type": "image"})
    return {"role": "user", "content": parts}


def test_special_token_ids_are_the_originals() -> None:
    # GLM-4's 14 special tokens follow its 151329 ranks; config.json's ids must land on the right names
    first = 151329
    ids = {name: first + i for i, name in enumerate(GLM4_SPECIAL_TOKENS)}
    assert GLM4V_9B_CONFIG["boi_token_id"] == ids["<|begin_of_image|>"] == 151339
    assert GLM4V_9B_CONFIG["eoi_token_id"] == ids["<|end_of_image|>"] == 151340
    assert GLM4V_9B_CONFIG["eos_token_id"] == [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    assert GLM4V_9B_CONFIG["pad_token_id"] == ids["<|endoftext|>"]
    assert ids["<|end_of_video|>"] == 151342 and first + len(GLM4_SPECIAL_TOKENS) <= 151552


def test_single_turn_with_image(glm_adapter: Any) -> None:
    text = glm_adapter.processor.apply_chat_template([user("What is this?", image=True)],
                                                     add_generation_prompt=True, tokenize=False)
    assert text == f"[gMASK]<sop><|user|>\n{IMAGE}What is this?<|assistant|>"
    # the original puts the image first in the message wherever the part came
    first = glm_adapter.processor.apply_chat_template([user("What is this?", image=True, image_first=True)])
    assert first == text


def test_multi_turn_and_roles(glm_adapter: Any) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        {"role": "assistant", "content": "Hello!"},
        user("And this?", image=True),
        {"role": "assistant", "content": [{"type": "text", "text": "A "}, {"type": "text", "text": "cat."}]},
        {"role": "tool", "content": "42"},
        {"role": "user", "content": ""},  # skipped, as in the original
    ]
    text = glm_adapter.processor.apply_chat_template(conversation, add_generation_prompt=False)
    assert text == ("[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello!"
                    f"<|user|>\n{IMAGE}And this?<|assistant|>\nA cat.<|observation|>\n42")


def test_one_image_per_conversation(glm_adapter: Any, photo: Image.Image) -> None:
    processor = glm_adapter.processor
    with pytest.raises(UnsupportedFeatureError) as info:
        processor.apply_chat_template([user("a", image=True), {"role": "assistant", "content": "b"},
                                       user("c", image=True)])
    assert info.value.param == "messages" and "one image" in info.value.message
    with pytest.raises(UnsupportedFeatureError):
        processor(text=[f"[gMASK]<sop><|user|>\n{IMAGE}{IMAGE}x<|assistant|>"], images=[photo, photo])
    with pytest.raises(InvalidRequestError):
        processor(text=[f"<|user|>\n{IMAGE}x<|assistant|>"], images=None)
    with pytest.raises(InvalidRequestError) as role:
        processor.apply_chat_template([{"role": "narrator", "content": "x"}])
    assert role.value.param == "messages[0].role"
    assert glm_adapter.max_images_per_prompt == 1


def test_image_placeholder_is_expanded(glm_adapter: Any, photo: Image.Image) -> None:
    processor, config = glm_adapter.processor, glm_adapter.config
    text = processor.apply_chat_template([user("Describe.", image=True)])
    inputs = processor(text=[text], images=[photo], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    short = processor.encode(text, expand_images=False)
    assert len(ids) == len(short) + config.num_image_tokens - 1
    boi, eoi = ids.index(config.boi_token_id), ids.index(config.eoi_token_id)
    assert ids[boi + 1 : eoi] == [processor.image_token_id] * config.num_image_tokens
    assert ids[:2] == processor.tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    assert inputs["attention_mask"].tolist() == [[1] * len(ids)]
    # without the prefix the processor adds it, like the original tokenizer's build_inputs_with_special_tokens
    bare = processor(text=[text.removeprefix("[gMASK]<sop>")], images=[photo])["input_ids"][0].tolist()
    assert bare == ids


def test_pixels_are_clip_normalised_at_the_configured_size(glm_adapter: Any) -> None:
    color = (200, 100, 30)
    pixels = glm_adapter.processor(text=[IMAGE], images=[Image.new("RGB", (300, 170), color)])["pixel_values"]
    size = glm_adapter.config.vision_config["image_size"]
    assert pixels.shape == (1, 3, size, size) and pixels.dtype == torch.float32
    for channel in range(3):
        expected = (color[channel] / 255.0 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        torch.testing.assert_close(pixels[0, channel], torch.full((size, size), expected), rtol=0, atol=1e-5)


def test_batch_is_left_padded(glm_adapter: Any, photo: Image.Image) -> None:
    processor = glm_adapter.processor
    long_text = processor.apply_chat_template([user("A longer question about the picture?", image=True)])
    short_text = processor.apply_chat_template([user("Hi")])
    inputs = processor(text=[long_text, short_text], images=[photo])
    mask = inputs["attention_mask"]
    assert inputs["input_ids"].shape == mask.shape and mask[0].all() and not mask[1].all()
    assert mask[1].tolist() == sorted(mask[1].tolist())  # zeros first
    assert inputs["pixel_values"].shape[0] == 1


def tiktoken_reference(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm: split with the regex, then repeatedly merge the adjacent pair of lowest rank."""
    out: list[int] = []
    for piece in regex.findall(GLM4_PATTERN, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            candidates = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            candidates = [c for c in candidates if c[0] is not None]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out += [ranks[p] for p in parts]
    return out


def test_tokenizer_encodes_like_tiktoken(glm_adapter: Any, glm_checkpoint: Path) -> None:
    ranks = read_ranks(glm_checkpoint / "tokenizer.model")
    tokenizer = glm_adapter.processor.tokenizer
    rng = random.Random(0)
    alphabet = [*"the quick brown fox What is this? 0123456789 \n\n  \t'sllve", "中", "文", "é", "🙂", "\u2014"]
    samples = ["What is in this picture?", "Hello,   world!\n\nThe cat's mat 12345678", "图片里有什么\uff1f émoji 🙂"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    for text in samples:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == tiktoken_reference(ranks, text), text
        assert tokenizer.decode(ids) == text


def test_special_tokens_round_trip(glm_adapter: Any, glm_checkpoint: Path) -> None:
    tokenizer = glm_adapter.processor.tokenizer
    num_ranks = len(read_ranks(glm_checkpoint / "tokenizer.model"))
    assert tokenizer.convert_tokens_to_ids(list(GLM4_SPECIAL_TOKENS)) == list(
        range(num_ranks, num_ranks + len(GLM4_SPECIAL_TOKENS)))
    text = glm_adapter.processor.apply_chat_template([user("Hi there")])
    ids = glm_adapter.processor.encode(text, expand_images=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\nHi there"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.convert_ids_to_tokens(ids[:3]) == ["[gMASK]", "<sop>", "<|user|>"]
    # like the original, "{metadata}\n" and the message are encoded apart (it matters when a message starts
    # with a newline: "\n\n" alone would be one pre-token)
    plain = [tokenizer.convert_tokens_to_ids("<|user|>")]
    plain += tokenizer.encode("\n", add_special_tokens=False) + tokenizer.encode("\nx", add_special_tokens=False)
    assert glm_adapter.processor.encode("<|user|>\n\nx") == plain


def test_jinja_template_override(glm_adapter: Any) -> None:
    processor = glm_adapter.processor
    template = ("[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    processor.chat_template = template
    try:
        assert processor.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
            "[gMASK]<sop><|user|>\nHi<|assistant|>")
    finally:
        processor.chat_template = None


def test_tools_and_tool_calls_in_glm4s_function_call_format(glm_adapter: Any) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    conversation = [
        user("Weather in Paris?"),
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    text = glm_adapter.processor.apply_chat_template(conversation, tools=tools)
    system = ("<|system|>\n你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"  # noqa: RUF001
              "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## get_weather\n\n{\n"
              '    "name": "get_weather",\n    "parameters": {\n        "type": "object"\n    }\n}\n'
              "在调用上述函数时，请使用 Json 格式表示调用的参数。")  # noqa: RUF001
    assert text == (f"[gMASK]<sop>{system}<|user|>\nWeather in Paris?"
                    '<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\nsunny<|assistant|>')
