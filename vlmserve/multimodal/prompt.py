"""Chat messages + decoded images → a `PreparedPrompt`, through the model's own template and processor.

Runs off the event loop (the API calls `render` in a worker thread): template rendering, tokenisation and image
preprocessing are CPU work.
"""

from __future__ import annotations

import threading
from typing import Any

from vlmserve.errors import ContextLengthError, InvalidRequestError, UnsupportedFeatureError
from vlmserve.multimodal.template import render_chat_template
from vlmserve.types import ChatMessage, ImagePart, ImageSpan, PreparedPrompt, TextPart


class PromptRenderer:
    """Renders conversations for one model. Thread-safe: the processor is used under a lock.

    NOTE: Hugging Face processors and fast tokenizers are not documented as thread-safe, and rendering is cheap
    next to the model step; one lock keeps it simple and correct.
    """

    def __init__(self, processor: Any, *, image_token_id: int | None, max_model_len: int,
                 max_images_per_prompt: int | None = None) -> None:
        self._processor = processor
        self._image_token_id = image_token_id
        self.max_model_len = max_model_len
        self._max_images = max_images_per_prompt
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        return getattr(self._processor, "tokenizer", self._processor)

    def render(self, messages: list[ChatMessage], *, chat_template: str | None = None) -> PreparedPrompt:
        images = [part for message in messages for part in message.images]
        if images and self._image_token_id is None:
            raise UnsupportedFeatureError("this model does not accept images", param="messages")
        if self._max_images is not None and len(images) > self._max_images:
            raise UnsupportedFeatureError(
                f"this model accepts at most {self._max_images} image(s) per conversation; "
                f"this one has {len(images)}", param="messages")
        conversation = [_to_template_message(m) for m in messages]
        with self._lock:
            text = self._render_text(conversation, chat_template)
            inputs = self._process(text, [part.image for part in images])
        token_ids = [int(t) for t in inputs.pop("input_ids")[0].tolist()]
        if len(token_ids) >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt is {len(token_ids)} tokens (image tokens included) but the model's context is "
                f"{self.max_model_len} tokens (--max-model-len), leaving no room for output", param="messages")
        inputs.pop("attention_mask", None)
        spans = self._image_spans(token_ids, len(images))
        return PreparedPrompt(token_ids=token_ids, model_inputs=dict(inputs),
                              image_hashes=tuple(p.hash for p in images), image_spans=spans)

    def _render_text(self, conversation: list[dict[str, Any]], chat_template: str | None) -> str:
        template = chat_template or getattr(self._processor, "chat_template", None)
        if template is None:
            # Native processors without a Jinja template format conversations themselves.
            return str(self._processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                             tokenize=False))
        tokenizer = self.tokenizer
        context = {"messages": conversation, "add_generation_prompt": True,
                   **{name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token",
                                                                       "unk_token")}}
        return render_chat_template(template, context)

    def _process(self, text: str, images: list[Any]) -> dict[str, Any]:
        bos = getattr(self.tokenizer, "bos_token", None)
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if bos and text.startswith(bos):
            kwargs["add_special_tokens"] = False  # the template already wrote it
        try:
            if images:
                return dict(self._processor(text=[text], images=images, **kwargs))
            return dict(self._processor(text=[text], **kwargs))
        except (ValueError, TypeError, IndexError) as exc:
            # e.g. a conversation whose image placeholders the template did not emit
            raise InvalidRequestError("the model's processor could not prepare this conversation "
                                      f"({type(exc).__name__})", param="messages") from exc

    def _image_spans(self, token_ids: list[int], num_images: int) -> tuple[ImageSpan, ...]:
        if not num_images:
            return ()
        runs: list[tuple[int, int]] = []
        for i, token in enumerate(token_ids):
            if token != self._image_token_id:
                continue
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        if len(runs) == num_images:
            return tuple(ImageSpan(start, end, index) for index, (start, end) in enumerate(runs))
        # NOTE: several runs per image (or images back to back): one span covering all image tokens, tagged with
        # the first image; the prefix cache then hashes every image into it, which is conservative and correct.
        if not runs:
            raise InvalidRequestError("the chat template emitted no image placeholder for the images sent",
                                      param="messages")
        return (ImageSpan(runs[0][0], runs[-1][1], -1),)


def _to_template_message(message: ChatMessage) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            content.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            content.append({"type": "image"})
    return {"role": message.role, "content": content}
