"""GLM-4V-9B's prompt format and image preprocessing, with the Hugging Face processor surface.

The original formats conversations in Python (`ChatGLM4Tokenizer.apply_chat_template`), which we reproduce:

    [gMASK]<sop>  then per message  <|{role}|>{metadata}\\n{content}  then  <|assistant|>  (generation prompt)

with no end-of-turn token between messages. The message that carries the image starts its content with
`<|begin_of_image|><|endoftext|><|end_of_image|>`, wherever the image sat among the message's parts. The original
allows ONE image per conversation ("Multiple images are not supported"); more raise `UnsupportedFeatureError`.
Messages with neither text nor image are skipped, as in the original.

Images: resized to image_size x image_size (1120) with bicubic filtering (torchvision's PIL path), scaled to [0, 1]
and normalised with the CLIP mean and std. `__call__` expands each image's single placeholder to the vision
tower's N tokens (1600), so `len(input_ids)` is the true prompt length.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature

from vlmserve.errors import InvalidRequestError, UnsupportedFeatureError
from vlmserve.models.glm4v_9b.config import ChatGLMConfig
from vlmserve.models.glm4v_9b.tokenizer import load_tokenizer
from vlmserve.models.processing import flatten_images, pad_token_rows

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREFIX = "[gMASK]<sop>"
IMAGE_PLACEHOLDER = "<|begin_of_image|><|endoftext|><|end_of_image|>"
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "observation": "observation",
         "tool": "observation"}  # OpenAI's tool results are GLM-4's observations
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
MAX_IMAGES_PER_CONVERSATION = 1


def _text_and_images(content: Any) -> tuple[str, int]:
    """The text of a message (parts concatenated) and how many images it carries."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    texts, num_images = [], 0
    for part in content:
        kind = part.get("type")
        if kind == "text":
            texts.append(part.get("text") or "")
        elif kind in ("image", "image_url") or "image" in part:
            num_images += 1
    return "".join(texts), num_images


def count_images(conversation: Sequence[dict[str, Any]]) -> int:
    return sum(_text_and_images(m.get("content"))[1] + (1 if m.get("image") is not None else 0)
               for m in conversation)


#: GLM-4's tools preamble, as the original tokenizer's `get_tools_content` writes it into a system turn (its
#: full-width commas are the model's text)
TOOLS_PREAMBLE = ("你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"  # noqa: RUF001
                  "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
TOOL_SUFFIX = "在调用上述函数时，请使用 Json 格式表示调用的参数。"  # noqa: RUF001


def format_tools(tools: Sequence[dict[str, Any]]) -> str:
    """GLM-4's system turn listing the tools: per function a `## name` heading and its JSON (indent 4)."""
    parts = [f"<|system|>\n{TOOLS_PREAMBLE}"]
    for tool in tools:
        function = tool.get("function", tool)
        parts.append(f"\n\n## {function['name']}\n\n{json.dumps(function, indent=4, ensure_ascii=False)}\n"
                     f"{TOOL_SUFFIX}")
    return "".join(parts)


def _tool_call_turns(message: dict[str, Any]) -> list[str]:
    """An assistant turn's calls in GLM-4's form: the function name as the turn's metadata, JSON arguments after."""
    turns = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        turns.append(f"<|assistant|>{function['name']}\n{text}")
    return turns


def format_conversation(conversation: Sequence[dict[str, Any]], *, add_generation_prompt: bool,
                        tools: Sequence[dict[str, Any]] | None = None) -> str:
    """The original GLM-4V prompt for OpenAI-like messages (also accepts the original's `image` key); `tools`
    and assistant `tool_calls` in GLM-4's function-call format, tool results as `observation` turns."""
    num_images = count_images(conversation)
    if num_images > MAX_IMAGES_PER_CONVERSATION:
        raise UnsupportedFeatureError(
            f"GLM-4V-9B accepts one image per conversation (the original model supports no more); this one has "
            f"{num_images}", param="messages")
    pieces = [PREFIX, format_tools(tools)] if tools else [PREFIX]
    for index, message in enumerate(conversation):
        role = ROLES.get(str(message.get("role")))
        if role is None:
            raise InvalidRequestError(f"unsupported role {message.get('role')!r} for GLM-4V-9B",
                                      param=f"messages[{index}].role")
        text, images_here = _text_and_images(message.get("content"))
        has_image = images_here > 0 or message.get("image") is not None
        if text or has_image:
            pieces.append(f"<|{role}|>{message.get('metadata') or ''}\n")
            pieces.append((IMAGE_PLACEHOLDER if has_image else "") + text)
        pieces += _tool_call_turns(message)
    if add_generation_prompt:
        pieces.append("<|assistant|>")
    return "".join(pieces)


def preprocess_image(image: Any, image_size: int) -> torch.Tensor:
    """RGB PIL image -> (3, image_size, image_size) float32, CLIP-normalised."""
    from PIL import Image

    resized = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


class Glm4vProcessor:
    """Chat formatting, tokenisation with image expansion, and pixel preprocessing for GLM-4V-9B.

    `chat_template` is None by default (the built-in format above); when set (e.g. by `--chat-template`) it is a
    Jinja template rendered with `messages` and `add_generation_prompt`.
    """

    #: the built-in format can present tools (GLM-4's function-call format)
    renders_tools = True

    def __init__(self, tokenizer: Any, *, image_size: int, num_image_tokens: int,
                 chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.chat_template = chat_template
        ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (
            "<|begin_of_image|>", "<|end_of_image|>", "<|endoftext|>", "[gMASK]", "<sop>", *ROLE_TOKENS)}
        self.boi_token_id = ids["<|begin_of_image|>"]
        self.eoi_token_id = ids["<|end_of_image|>"]
        self.image_token_id = ids["<|endoftext|>"]
        self._specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        specials = sorted(self._specials, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, chat_template: str | None = None) -> Glm4vProcessor:
        config = ChatGLMConfig.from_pretrained(path)
        return cls(load_tokenizer(path), image_size=int(config.vision_config["image_size"]),
                   num_image_tokens=config.num_image_tokens, chat_template=chat_template)

    # --- text ------------------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        if self.chat_template is not None:
            text = self._render_jinja(conversation, add_generation_prompt, kwargs)
        else:
            text = format_conversation(conversation, add_generation_prompt=add_generation_prompt,
                                       tools=kwargs.get("tools"))
        return self.encode(text, expand_images=False) if tokenize else text

    def _render_jinja(self, conversation: Sequence[dict[str, Any]], add_generation_prompt: bool,
                      extra: dict[str, Any]) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if count_images(conversation) > MAX_IMAGES_PER_CONVERSATION:
            raise UnsupportedFeatureError("GLM-4V-9B accepts one image per conversation", param="messages")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template or "")
        return template.render(messages=list(conversation), add_generation_prompt=add_generation_prompt, **extra)

    def encode(self, text: str, *, expand_images: bool = True) -> list[int]:
        """Token ids of a rendered prompt; each boi, placeholder, eoi triple expanded when `expand_images`.

        Special tokens are cut out first and the text between them is encoded on its own; the text after a role
        token is encoded as "metadata\\n" and the message apart, as the original does.
        """
        ids: list[int] = []
        after_role = False
        for piece in self._special_split.split(text):
            if not piece:
                continue
            if piece in self._specials:
                ids.append(self.tokenizer.convert_tokens_to_ids(piece))
                after_role = piece in ROLE_TOKENS
                continue
            if after_role and "\n" in piece:
                head, tail = piece.split("\n", 1)
                ids += self._encode_plain(head + "\n") + self._encode_plain(tail)
            else:
                ids += self._encode_plain(piece)
            after_role = False
        return self._expand(ids) if expand_images else ids

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _expand(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for i, token in enumerate(ids):
            out.append(token)
            if (token == self.image_token_id and 0 < i < len(ids) - 1 and ids[i - 1] == self.boi_token_id
                    and ids[i + 1] == self.eoi_token_id):
                out.extend([self.image_token_id] * (self.num_image_tokens - 1))
        return out

    # --- text + images ---------------------------------------------------------------------------------------

    def __call__(self, text: str | list[str] | None = None, images: Any = None, return_tensors: str | None = "pt",
                 add_special_tokens: bool = True, **kwargs: Any) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        flat_images = flatten_images(images)
        sequences = []
        for prompt in texts:
            if add_special_tokens and not prompt.startswith(PREFIX):
                prompt = PREFIX + prompt  # what the original tokenizer prepends to every sequence
            sequences.append(self.encode(prompt))
        num_runs = sum(seq.count(self.boi_token_id) for seq in sequences)
        if num_runs != len(flat_images):
            raise InvalidRequestError(f"the prompt has {num_runs} image placeholder(s) but {len(flat_images)} "
                                      "image(s) were given", param="messages")
        if any(seq.count(self.boi_token_id) > MAX_IMAGES_PER_CONVERSATION for seq in sequences):
            raise UnsupportedFeatureError("GLM-4V-9B accepts one image per conversation", param="messages")
        data: dict[str, Any] = pad_token_rows(sequences, self.tokenizer.pad_token_id, left=True)
        if flat_images:
            data["pixel_values"] = torch.stack([preprocess_image(im, self.image_size) for im in flat_images])
        return BatchFeature(data, tensor_type=return_tensors)

    def decode(self, token_ids: Any, **kwargs: Any) -> str:
        return str(self.tokenizer.decode(token_ids, **kwargs))

    def batch_decode(self, sequences: Any, **kwargs: Any) -> list[str]:
        return list(self.tokenizer.batch_decode(sequences, **kwargs))
