"""Tokenizer, prompt format and image preprocessing against references written from the original's description.

- BPE: tiktoken's algorithm (regex split, then repeatedly merge the adjacent pair whose concatenation has the
  lowest rank), written out below, on the checkpoint's qwen.tiktoken.
- Prompt: `qwen_generation_utils.make_context` (chatml): each turn's role and content encoded separately, "\\n"
  between turns; `from_list_format` writes images as "Picture N: <img>URL</img>\\n" (N counted over the
  conversation), and `tokenize` pads the URL bytes between the tags with <imgpad> to 256 tokens.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import regex
import torch
from PIL import Image

from vlmserve.errors import InvalidRequestError
from vlmserve.models.qwen_vl_chat.tokenizer import read_ranks

PUBLISHED_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *[f"<|extra_{i}|>" for i in range(205)],
            "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ReferenceEncoder:
    """tiktoken's encoding, spelled out: special tokens, then regex pieces merged by lowest rank."""

    def __init__(self, ranks: dict[bytes, int]) -> None:
        self.ranks = ranks
        self.special = {token: len(ranks) + i for i, token in enumerate(SPECIALS)}
        self.split_special = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk in self.split_special.split(unicodedata.normalize("NFC", text)):
            if chunk in self.special:
                ids.append(self.special[chunk])
            else:
                for piece in regex.findall(PUBLISHED_PATTERN, chunk):
                    ids.extend(self._merge(piece.encode()))
        return ids

    def _merge(self, data: bytes) -> list[int]:
        if data in self.ranks:
            return [self.ranks[data]]
        parts = [bytes([b]) for b in data]
        while True:
            candidates = [(self.ranks[a + b], i) for i, (a, b) in enumerate(itertools.pairwise(parts))
                          if a + b in self.ranks]
            if not candidates:
                return [self.ranks[p] for p in parts]
            _, i = min(candidates)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    def make_context(self, query: str, history: list[tuple[str, str]], system: str) -> list[int]:
        """The original's chatml context tokens, <img>URL</img> spans padded to 256 as its tokenizer does."""
        start, end, newline = [self.special["<|im_start|>"]], [self.special["<|im_end|>"]], self.encode("\n")

        def turn(role: str, content: str) -> list[int]:
            return start + self.encode(role) + newline + self._pad_images(self.encode(content)) + end

        tokens = turn("system", system)
        for asked, answered in history:
            tokens += newline + turn("user", asked) + newline + turn("assistant", answered)
        return tokens + newline + turn("user", query) + newline + start + self.encode("assistant") + newline

    def _pad_images(self, ids: list[int]) -> list[int]:
        open_id, close_id, pad_id = self.special["<img>"], self.special["</img>"], self.special["<imgpad>"]
        out: list[int] = []
        while open_id in ids:
            a = ids.index(open_id)
            b = ids.index(close_id, a)
            url = self._decode_bytes(ids[a + 1:b])
            out += ids[:a] + [open_id] + [self.ranks[bytes([c])] for c in url] + [pad_id] * (256 - len(url))
            out.append(close_id)
            ids = ids[b + 1:]
        return out + ids

    def _decode_bytes(self, ids: list[int]) -> bytes:
        by_id = {rank: token for token, rank in self.ranks.items()}
        return b"".join(by_id[i] for i in ids)


@pytest.fixture(scope="module")
def reference(qwen_vl_chat_dir: Path) -> ReferenceEncoder:
    return ReferenceEncoder(read_ranks(qwen_vl_chat_dir / "qwen.tiktoken"))


@pytest.fixture
def processor(qwen_vl_chat_adapter: Any) -> Any:
    processor = qwen_vl_chat_adapter.processor
    yield processor
    processor.chat_template = None  # tests may set their own


TEXTS = ["Hello, world! What is in this picture?", "The quick brown fox, 12345 and 3.14",
         "  spaces   and\n\n\nnewlines\tand tabs  ", "it's they're WE'LL don't I'm", "~!@#$%^&*()_+{}|:\"<>?`-=[];',./",
         "<|im_start|>user\nPicture 1: <img></img>\nhi<|im_end|>\n<box>(1,2),(3,4)</box>"]


def test_special_token_ids_follow_the_bpe_ranks(qwen_vl_chat_dir: Path, processor: Any,
                                                qwen_vl_chat_adapter: Any) -> None:
    num_ranks = len(read_ranks(qwen_vl_chat_dir / "qwen.tiktoken"))
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(SPECIALS) == list(range(num_ranks, num_ranks + len(SPECIALS)))
    config = json.loads((qwen_vl_chat_dir / "config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<img>") == config["visual"]["image_start_id"]
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>")}
    assert qwen_vl_chat_adapter.eos_token_ids == stops
    assert qwen_vl_chat_adapter.image_token_id == tokenizer.convert_tokens_to_ids("<imgpad>")


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_matches_the_tiktoken_algorithm_and_round_trips(processor: Any, reference: ReferenceEncoder,
                                                                 text: str) -> None:
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text)
    assert processor.tokenizer.decode(ids) == text


def test_decode_can_skip_special_tokens(processor: Any) -> None:
    ids = processor.tokenizer.encode("<|im_start|>assistant\nA red circle.<|im_end|>", add_special_tokens=False)
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == "assistant\nA red circle."
    assert processor.tokenizer.convert_ids_to_tokens(ids[:1]) == ["<|im_start|>"]


CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": "A red square."},
    {"role": "user", "content": [{"type": "text", "text": "And here? "}, {"type": "image"}, {"type": "image"},
                                 {"type": "text", "text": "Compare."}]},
]


def test_chat_template_writes_the_original_chatml_format(processor: Any) -> None:
    text = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>"
                "\n<|im_start|>user\nPicture 1: <img></img>\nWhat is this?<|im_end|>"
                "\n<|im_start|>assistant\nA red square.<|im_end|>"
                "\n<|im_start|>user\nAnd here? Picture 2: <img></img>\nPicture 3: <img></img>\nCompare.<|im_end|>"
                "\n<|im_start|>assistant\n")
    assert text == expected
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(with_system, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_tokens_equal_the_originals_make_context(processor: Any, reference: ReferenceEncoder) -> None:
    conversation = [*CONVERSATION[:2], {"role": "user", "content": "\n\nStarting with newlines, 42 times."}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    ids = processor(text=[text], images=[_solid((255, 0, 0))])["input_ids"][0]
    history = [("Picture 1: <img></img>\nWhat is this?", "A red square.")]
    assert ids == reference.make_context("\n\nStarting with newlines, 42 times.", history,
                                         system="You are a helpful assistant.")


def test_each_image_span_holds_256_pads(processor: Any) -> None:
    text = processor.apply_chat_template([CONVERSATION[0], CONVERSATION[2]], add_generation_prompt=True)
    batch = processor(text=[text], images=[_solid((255, 0, 0)), _solid((0, 255, 0)), _solid((0, 0, 255))],
                      return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    tok = processor.tokenizer
    starts = [i for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids("<img>")]
    ends = [i for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids("</img>")]
    pad = tok.convert_tokens_to_ids("<imgpad>")
    assert len(starts) == len(ends) == 3
    for a, b in zip(starts, ends, strict=True):
        assert b - a - 1 == 256 and set(ids[a + 1:b]) == {pad}
    assert ids.count(pad) == 3 * 256
    unexpanded = len(tok.encode(text, add_special_tokens=False))
    assert len(ids) == unexpanded + 3 * 256 == int(batch["attention_mask"].sum())
    assert batch["pixel_values"].shape == (3, 3, processor.image_size, processor.image_size)


def test_batches_are_padded_with_a_mask(processor: Any) -> None:
    texts = [processor.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
             for t in ("Hi", "A much longer question about shapes and colors?")]
    batch = processor(text=texts, return_tensors="pt")
    lengths = [len(processor.encode(t)) for t in texts]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(-1).tolist() == lengths
    assert "pixel_values" not in batch


@pytest.mark.parametrize(("text", "num_images"), [
    ("<|im_start|>user\nPicture 1: <img></img>\nhi<|im_end|>\n", 0),
    ("<|im_start|>user\nhi<|im_end|>\n", 1),
    ("<|im_start|>user\n<img> never closed<|im_end|>\n", 1),
    ("<|im_start|>user\n</img> stray<|im_end|>\n", 0),
])
def test_image_tags_and_images_must_agree(processor: Any, text: str, num_images: int) -> None:
    with pytest.raises(InvalidRequestError):
        processor(text=[text], images=[_solid((0, 0, 0))] * num_images)


def test_pixels_are_resized_bicubic_to_square_and_clip_normalised(processor: Any) -> None:
    size = processor.image_size
    pixels = processor.preprocess_images([_solid((255, 128, 0), (70, 30))])
    expected = [(v / 255.0 - m) / s for v, m, s in zip((255, 128, 0), CLIP_MEAN, CLIP_STD, strict=True)]
    assert pixels.shape == (1, 3, size, size)
    for channel in range(3):
        assert torch.allclose(pixels[0, channel], torch.full((size, size), expected[channel]), atol=1e-6)
    halves = np.zeros((40, 120, 3), dtype=np.uint8)
    halves[:, 60:] = 255  # left black, right white: squashed (not cropped) to a square, the split stays central
    resized = processor.preprocess_images([halves])[0, 0]
    assert resized[:, : size // 2 - 2].max() < resized[:, size // 2 + 2:].min()
    reference = np.asarray(Image.fromarray(halves).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    assert torch.allclose(resized, torch.from_numpy((reference[..., 0] / 255 - CLIP_MEAN[0]) / CLIP_STD[0]),
                          atol=1e-6)


def test_a_custom_chat_template_replaces_the_builtin_one(processor: Any) -> None:
    processor.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}"
    assert processor.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi"
    assert processor.tokenizer.chat_template == processor.chat_template
    processor.chat_template = None
    assert processor.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<|im_start|>system\n")


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)
