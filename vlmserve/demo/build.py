"""Build the demo model's files before training: tokenizer, image processor, chat template and model config.

The result is laid out like a published Qwen2-VL checkpoint, so the serving code loads it by the same path as any
user model (`AutoModelForImageTextToText.from_pretrained`, `vlmserve.models.hf_processor.load_processor`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmserve.demo.shapes import COLORS, NO_IMAGE_ANSWER, QUESTION_TYPES, SHAPES
from vlmserve.demo.template import DEMO_CHAT_TEMPLATE

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The chat template published with Qwen2-VL-Instruct.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: the total vocabulary, special tokens included
VOCAB_SIZE = 1024

# NOTE: with min_pixels close to max_pixels every image is scaled to 24-36 tokens of 28x28 px whatever its size (a
# 512x512 image becomes 168x168 px, 6x6 tokens): a shape (>= 15 % of the shorter side) is then at least ~25 px
# wide in a square image and small images are enlarged rather than reduced to a few tokens. Few image tokens keep
# the model cheap enough to train on a 2-core CPU (the first weights used 64-104 tokens).
MIN_PIXELS = 28 * 28 * 24
MAX_PIXELS = 28 * 28 * 36

# Text model: 3 layers of width 256, 4 heads of 64, SwiGLU 640 (issue 16: issue 3's 2 heads in width 128 failed
# at two-attribute look-ups while the vision tower saw the shapes; width is almost free per GPU step, and SwiGLU 640
# keeps model.safetensors under 15 MB). Vision tower: 4 blocks of width 128 on 14-px patches, merged 2x2 into tokens.
# NOTE: rope_theta is Qwen2-VL's own 1e6. The first weights were trained with 100, meant to give the width axis of
# M-RoPE visible turns over 30 columns; that left no dimension whose rotation stays small over the tokens between a
# question and the image, and the model failed at pure look-ups ("Is there a purple circle?" at chance). Where a
# shape is (its side, its rank from the left) and how many shapes there are is taught to the image tokens
# themselves by the auxiliary vision loss (train.py), so the language model needs no fine positions.
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=256, intermediate_size=640, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=4096, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
)
VISION_CONFIG: dict[str, Any] = dict(
    depth=4, embed_dim=128, num_heads=4, mlp_ratio=2, in_channels=3, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, rope_parameters={"rope_type": "axial", "rope_theta": 1000.0},
)

_GENERIC_TEXT = """\
Hello! Hi there. Good morning, good evening. How are you today? Thanks, thank you very much. Please, sorry.
What can you do? Who are you? Tell me a joke. What is the weather like? Write a poem about the sea and the sky.
What is in this picture? What do you see? Look at this photo. Can you help me with my homework, please?
Answer briefly. Be concise and precise. Answer with one word. Explain it step by step, in simple words.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 20 50 100 1000 2024 3.14.
Please describe the picture in detail. Count the objects. Which one is bigger? Where is it? Why? When?
There is a small house near the river, with a garden, two trees and a white fence. The children play outside.
A person walks along the street with a dog. Cars, buses and bicycles move through the busy city at night.
I would like to know more about this. Could you tell me what this means? I think that it is a good idea.
The model reads the image and the question, then it writes a short answer. It runs on a laptop in seconds.
Python, code, computer, server, request, response, error, model, data, file, open, close, send, receive.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday; January, February, March, April, May, June.
white, gray, grey, brown, pink, cyan, magenta, dark, light, big, small, large, little, top, bottom, middle.
rectangle, oval, star, line, dot, point, polygon, hexagon, diamond, heart, arrow, box, ball, picture, photo.
"""


def tokenizer_corpus() -> list[str]:
    """Texts the BPE merges are learnt from: every question and answer of the task, plus everyday English."""
    from vlmserve.demo.conversations import OTHER_PROMPTS, SYSTEM_PROMPTS

    texts = [NO_IMAGE_ANSWER, "Yes. No. Left. Right. 0. 1. 2. 3. 4.", "system\nuser\nassistant\n" * 4]
    for template in QUESTION_TYPES.values():
        for color in COLORS:
            for shape in SHAPES:
                texts.append(template.format(color=color, shape=shape))
                texts.append(template.format(color=color, shape=shape).lower())
    for color in COLORS:
        texts.append(f"{color.capitalize()}. A {color} circle, a {color} square and a {color} triangle.")
    texts.extend(shape.capitalize() + "." for shape in SHAPES)
    return texts * 4 + (SYSTEM_PROMPTS + OTHER_PROMPTS) * 2 + _GENERIC_TEXT.splitlines() * 2 + _tool_texts()


def _tool_texts() -> list[str]:
    """The report_shapes tool's prompt section, calls, JSON answers and summaries: without them in the corpus the
    tools section alone is ~900 tokens; with them the merges make it a few hundred."""
    import random

    from vlmserve.demo.shapes import random_scene
    from vlmserve.demo.tools import (
        JSON_REQUESTS,
        JSON_SUFFIX,
        REPORT_REQUESTS,
        REPORT_SHAPES_TOOL,
        TOOL_RESULTS,
        json_answer,
        render_like_server,
        summary,
        tool_call_text,
    )

    section = render_like_server(DEMO_CHAT_TEMPLATE, [{"role": "user", "content": "Hi"}], [REPORT_SHAPES_TOOL])
    texts = [section] * 40 + REPORT_REQUESTS * 4 + [f"{q} {JSON_SUFFIX}" for q in JSON_REQUESTS] * 4
    texts += [f"<tool_response>\n{result}\n</tool_response>" for result in TOOL_RESULTS] * 4
    rng = random.Random("tokenizer")
    for _ in range(60):
        scene = random_scene(rng)
        texts += [tool_call_text(scene), json_answer(scene), summary(scene)]
    return texts


def build_tokenizer() -> Any:
    """A byte-level BPE (any text encodes) with Qwen2-VL's special tokens, as a `Qwen2TokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]  # lazily exported: no stub sees it

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(QWEN_SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False, special_tokens=[],
    )
    raw.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    raw.add_special_tokens(QWEN_SPECIAL_TOKENS)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    return tokenizer


#: a miniature of the same architecture, for quick smoke tests of the training code
TINY_TEXT_CONFIG: dict[str, Any] = dict(
    TEXT_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
)
TINY_VISION_CONFIG: dict[str, Any] = dict(VISION_CONFIG, depth=1, embed_dim=32, num_heads=2)


def model_config(token_ids: dict[str, int], vocab_size: int, tiny: bool = False) -> Any:
    """The Qwen2-VL config of the demo model (or of its miniature, for tests)."""
    from transformers import Qwen2VLConfig

    text, vision = (TINY_TEXT_CONFIG, TINY_VISION_CONFIG) if tiny else (TEXT_CONFIG, VISION_CONFIG)
    # Top-level token ids go through **kwargs: the config class does not declare them, yet generate() reads them.
    top_level: dict[str, Any] = {"eos_token_id": token_ids["<|im_end|>"], "pad_token_id": token_ids["<|endoftext|>"]}
    return Qwen2VLConfig(
        text_config=dict(text, vocab_size=vocab_size, bos_token_id=token_ids["<|endoftext|>"],
                         eos_token_id=token_ids["<|im_end|>"], pad_token_id=token_ids["<|endoftext|>"],
                         tie_word_embeddings=True),
        vision_config=dict(vision, hidden_size=text["hidden_size"]),
        image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=True, **top_level,
    )


def save_processor_files(out: Path) -> Any:
    """Write tokenizer, image processor and chat template files into `out`; returns the tokenizer."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out)
    # Saved piece by piece, like the published checkpoints: the processor class itself cannot be built where its
    # video processor lacks torchvision.
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": DEMO_CHAT_TEMPLATE}, indent=2) + "\n")
    return tokenizer


def build(out: Path, tiny: bool = False) -> Any:
    """Processor files plus an untrained model in `out`; returns the (untrained, float32) model."""
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = save_processor_files(out)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIAL_TOKENS}
    config = model_config(ids, vocab_size=len(tokenizer), tiny=tiny)
    model = Qwen2VLForConditionalGeneration(config)
    gen = model.generation_config
    gen.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    gen.pad_token_id = ids["<|endoftext|>"]
    gen.bos_token_id = ids["<|endoftext|>"]
    gen.do_sample = False
    gen.max_new_tokens = 64
    return model


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the demo model's processor files and an untrained model.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(args.seed)
    build(args.out).save_pretrained(args.out)


if __name__ == "__main__":
    main()
