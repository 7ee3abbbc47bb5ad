"""Qwen-VL-Chat's prompt format and image preprocessing, behind the Hugging Face processor surface.

Prompt format (ChatML, `qwen_generation_utils.make_context` with chat_format "chatml"):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nPicture 1: <img>...</img>\\nWhat is this?<|im_end|>\\n
    <|im_start|>assistant\\n

An image is written "Picture N: <img>...</img>\\n" (`tokenization_qwen.from_list_format`), N counting images
across the whole conversation from 1 (the Qwen-VL README's conversation format). In the original the text between
the tags is the image's URL, whose bytes are tokenized and padded with <imgpad> to 256 tokens, and the model then
overwrites those 256 positions with image features. Here the tags are rendered empty and the processor puts
exactly `num_image_tokens` <imgpad> tokens between them, so the token count is the prompt's real length and the
model input is the same.

Images are resized to image_size x image_size (448) with bicubic resampling, ignoring aspect ratio, then
scaled to [0, 1] and normalised with CLIP's mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import BatchFeature

from vlmserve.errors import InvalidRequestError
from vlmserve.models.processing import flatten_images, pad_token_rows
from vlmserve.models.qwen_vl_chat.tokenizer import IMAGE_END, IMAGE_PAD, IMAGE_START, encode_chatml

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

#: the built-in format as a Jinja template (what `--chat-template` replaces)
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') or 'image' in part or 'image_url' in part -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{{- 'Picture ' + image_count.value|string + ': <img></img>\\n' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(f"chat template: {message}", param="messages")


class QwenVLChatProcessor:
    """Chat template, tokenization with image-span expansion, and image preprocessing for Qwen-VL-Chat."""

    def __init__(self, tokenizer: Any, *, image_size: int, num_image_tokens: int,
                 chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.chat_template = chat_template
        self.image_start_id: int = tokenizer.convert_tokens_to_ids(IMAGE_START)
        self.image_end_id: int = tokenizer.convert_tokens_to_ids(IMAGE_END)
        self.image_pad_id: int = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self._environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                          extensions=["jinja2.ext.loopcontrols"])
        self._environment.globals["raise_exception"] = _raise_exception

    # --- prompt ----------------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str:
        """The Jinja template in use: the built-in format unless one was set (e.g. by `--chat-template`)."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._chat_template = template if template is not None else CHAT_TEMPLATE
        # Kept in step so text-only callers of the tokenizer render the same format.
        self.tokenizer.chat_template = self._chat_template

    def apply_chat_template(self, conversation: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render `conversation` (OpenAI-like messages) with `chat_template`; token ids when `tokenize`."""
        template = self._environment.from_string(self.chat_template)
        text = template.render(messages=list(conversation), add_generation_prompt=add_generation_prompt,
                               **kwargs)
        return self.encode(text) if tokenize else text

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt, each <img>...</img> span holding exactly `num_image_tokens` pads."""
        return self._expand_image_spans(encode_chatml(self.tokenizer, text))

    def _expand_image_spans(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == self.image_end_id:
                raise InvalidRequestError(f"the prompt has {IMAGE_END} without {IMAGE_START}", param="messages")
            if token != self.image_start_id:
                out.append(token)
                position += 1
                continue
            try:
                end = ids.index(self.image_end_id, position + 1)
            except ValueError:
                raise InvalidRequestError(f"the prompt has {IMAGE_START} without {IMAGE_END}",
                                          param="messages") from None
            out.extend([self.image_start_id, *[self.image_pad_id] * self.num_image_tokens, self.image_end_id])
            position = end + 1
        return out

    def count_images(self, ids: Sequence[int]) -> int:
        return sum(1 for token in ids if token == self.image_start_id)

    # --- model inputs ----------------------------------------------------------------------------------------

    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None,
                 return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """input_ids / attention_mask (padded on the tokenizer's side) and pixel_values for every image."""
        texts = [text] if isinstance(text, str) else list(text or [])
        flat_images = flatten_images(images)
        rows = [self.encode(t) for t in texts]
        num_spans = sum(self.count_images(row) for row in rows)
        if num_spans != len(flat_images):
            raise InvalidRequestError(
                f"the prompt marks {num_spans} image(s) with {IMAGE_START}{IMAGE_END} but {len(flat_images)} "
                f"image(s) were given; Qwen-VL-Chat reserves these tags for images, so text must not contain "
                "them", param="messages")
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        data: dict[str, Any] = pad_token_rows(rows, self.tokenizer.pad_token_id, left=left)
        if flat_images:
            data["pixel_values"] = self.preprocess_images(flat_images)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, 3, S, S) float32: RGB, bicubic resize to S x S, /255, CLIP mean/std normalisation."""
        from PIL import Image

        mean = np.asarray(CLIP_MEAN, dtype=np.float32)
        std = np.asarray(CLIP_STD, dtype=np.float32)
        arrays = []
        for image in images:
            picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
            picture = picture.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            pixels = np.asarray(picture, dtype=np.float32) / 255.0
            arrays.append(((pixels - mean) / std).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrays))

    # --- tokenizer passthrough -------------------------------------------------------------------------------

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return str(self.tokenizer.decode(*args, **kwargs))

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return list(self.tokenizer.batch_decode(*args, **kwargs))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, chat_template: str | None = None) -> QwenVLChatProcessor:
        """The processor of the checkpoint directory `path` (its qwen.tiktoken and config.json)."""
        from vlmserve.models.qwen_vl_chat.config import QwenVLChatConfig
        from vlmserve.models.qwen_vl_chat.tokenizer import load_tokenizer

        config = QwenVLChatConfig.from_pretrained(path)
        tokenizer = load_tokenizer(path, model_max_length=config.max_position_embeddings)
        processor = cls(tokenizer, image_size=int(config.visual["image_size"]),
                        num_image_tokens=config.num_image_queries, chat_template=chat_template)
        if tokenizer.convert_tokens_to_ids(IMAGE_START) != config.image_start_id:
            raise ValueError(f"qwen.tiktoken puts {IMAGE_START} at id {processor.image_start_id}, but config.json "
                             f"says visual.image_start_id is {config.image_start_id}")
        return processor
