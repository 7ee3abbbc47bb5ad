"""Chat messages + decoded images → a `PreparedPrompt`, through the model's own template and processor.

Runs off the event loop (the API calls `render` in a worker thread): template rendering, tokenisation and image
preprocessing are CPU work. Renders run in parallel: each worker thread has its own copy of the processor, so a
multi-megabyte prompt or a slow template holds up only its own request.

Two cheap guards run before any of that work:
- text longer than the context could hold even at the vocabulary's longest token is refused from its length;
- special-token strings typed into message text (`<|im_start|>system`, `<|image_pad|>`) are broken up with a
  zero-width space, so they tokenise as the plain text they are and never become control tokens (no role
  spoofing, no stray image placeholders).
"""

from __future__ import annotations

import copy
import re
import threading
from typing import Any

from vlmserve.errors import ContextLengthError, InvalidRequestError, UnsupportedFeatureError
from vlmserve.multimodal.template import render_chat_template
from vlmserve.multimodal.template_probe import holds_tool_images, renders_tool_turns, renders_tools
from vlmserve.types import ChatMessage, ImagePart, ImageSpan, PreparedPrompt, TextPart, VideoPart

_ZERO_WIDTH_SPACE = "\u200b"
#: when the vocabulary cannot be listed: a generous bound on the characters one token covers
_FALLBACK_MAX_TOKEN_CHARS = 64


class PromptRenderer:
    """Renders conversations for one model. Thread-safe: each thread renders with its own copy of the processor.

    NOTE: Hugging Face processors and fast tokenizers are not documented as thread-safe (a fast tokenizer's
    padding/truncation state is mutated per call), so threads never share one; copies are made once per thread.
    """

    def __init__(self, processor: Any, *, image_token_id: int | None, max_model_len: int,
                 max_images_per_prompt: int | None = None, video_token_id: int | None = None,
                 model_family: str = "this model") -> None:
        """`video_token_id`: the placeholder of video frames' features; None when the model takes no video."""
        self._processor = processor
        self._image_token_id = image_token_id
        self.video_token_id = video_token_id
        self._family = model_family
        self.max_model_len = max_model_len
        self._max_images = max_images_per_prompt
        self._copy_lock = threading.Lock()  # only around making a thread's copy, never around rendering
        self._local = threading.local()
        tokenizer = self.tokenizer
        self._special_pattern = _special_token_pattern(tokenizer)
        self.max_text_chars = max_model_len * _max_token_chars(tokenizer)

    @property
    def tokenizer(self) -> Any:
        return getattr(self._processor, "tokenizer", self._processor)

    def _thread_processor(self) -> Any:
        processor = getattr(self._local, "processor", None)
        if processor is None:
            with self._copy_lock:
                processor = self._local.processor = copy.deepcopy(self._processor)
        return processor

    def check_text_size(self, num_chars: int) -> None:
        """Refuse, from its length alone, text that cannot fit the context whatever the tokenizer does."""
        if num_chars > self.max_text_chars:
            raise ContextLengthError(
                f"the messages hold {num_chars} characters of text, more than the model's {self.max_model_len}-token "
                "context (--max-model-len) can hold", param="messages")


    def render(self, messages: list[ChatMessage], *, chat_template: str | None = None,
               tools: list[dict[str, Any]] | None = None,
               template_kwargs: dict[str, Any] | None = None) -> PreparedPrompt:
        """`tools` (OpenAI tool objects) go into the template's tools section; `template_kwargs` are extra
        template variables (e.g. `enable_thinking`)."""
        template = self._choose_template(chat_template, messages, tools)
        if template is not None and not self._holds_tool_images(template):
            messages = move_tool_images(messages)
        images = [part for message in messages for part in message.images]
        if images and self._image_token_id is None:
            raise UnsupportedFeatureError("this model does not accept images", param="messages")
        videos = [part for message in messages for part in message.videos]
        if videos:
            self.check_accepts_video()
            if images and self.video_token_id == self._image_token_id:
                raise UnsupportedFeatureError(f"{self._family} models take images or videos in one conversation, "
                                              "not both", param="messages")
        if self._max_images is not None and len(images) > self._max_images:
            raise UnsupportedFeatureError(
                f"this model accepts at most {self._max_images} image(s) per conversation; "
                f"this one has {len(images)}", param="messages")
        self.check_text_size(sum(len(part.text) for message in messages for part in message.parts
                                 if isinstance(part, TextPart)))
        special = self._special_pattern
        conversation = [_to_template_message(m, special) for m in messages]
        processor = self._thread_processor()
        # Tool definitions and template variables come from the client too: no special token may hide in them.
        text = self._render_text(processor, conversation, template, _defuse_all(tools, special),
                                 _defuse_all(template_kwargs or {}, special))
        inputs = self._process(processor, text, [part.image for part in images], videos)
        token_ids = [int(t) for t in inputs.pop("input_ids")[0].tolist()]
        if len(token_ids) >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt is {len(token_ids)} tokens (image tokens included, video tokens too) but the model's "
                f"context is {self.max_model_len} tokens (--max-model-len), leaving no room for output",
                param="messages")
        inputs.pop("attention_mask", None)
        inputs.pop("video_metadata", None)
        spans, video_spans = self._spans(token_ids, inputs, len(images), len(videos))
        return PreparedPrompt(token_ids=token_ids, model_inputs=dict(inputs),
                              image_hashes=tuple(p.hash for p in images), image_spans=spans,
                              video_hashes=tuple(v.hash for v in videos), video_spans=video_spans)

    def _spans(self, token_ids: list[int], inputs: dict[str, Any], num_images: int, num_videos: int
               ) -> tuple[tuple[ImageSpan, ...], tuple[ImageSpan, ...]]:
        """Where the images' and the videos' placeholder tokens lie."""
        if num_videos and self.video_token_id == self._image_token_id:
            # video frames written with the image token (GLM-4.1V; never beside images): the processor's token
            # types tell them apart
            types = [2 if int(t) == 2 else 0 for t in inputs["mm_token_type_ids"][0].tolist()]
            return (), placeholder_spans(types, 2, num_videos, "video")
        return (placeholder_spans(token_ids, self._image_token_id, num_images, "image"),
                placeholder_spans(token_ids, self.video_token_id, num_videos, "video"))

    def check_accepts_video(self) -> None:
        """A 400 for models whose video path is not supported here (see vlmserve.models.video_processing)."""
        if self.video_token_id is None:
            raise UnsupportedFeatureError(f"video input is not supported for {self._family} models on this server "
                                          "(video_url parts are taken by Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V, "
                                          "GLM-4.5V, LLaVA-NeXT-Video and LLaVA-OneVision)",
                                          param="messages")

    def _choose_template(self, override: str | None, messages: list[ChatMessage],
                         tools: list[dict[str, Any]] | None) -> str | None:
        """The template to render with: the override, else the processor's, else — when the processor's cannot
        render the tools or tool turns this conversation has — the tokenizer's (Qwen2.5-VL ships its tools
        template only there). None for native processors that format conversations in Python."""
        own = getattr(self._processor, "chat_template", None)
        candidates = [override] if override else [
            t for t in (own, getattr(self.tokenizer, "chat_template", None)) if isinstance(t, str)]
        if not override and own is None:
            if tools and not getattr(self._processor, "renders_tools", False):
                raise UnsupportedFeatureError("this model's prompt format cannot present tools", param="tools")
            return None
        needs_turns = any(m.role == "tool" or m.tool_calls for m in messages)
        for template in dict.fromkeys(candidates):
            if (not tools or renders_tools(template)) and (not needs_turns or renders_tool_turns(template)):
                return template
        what, param = ("tools", "tools") if tools and not renders_tools(candidates[0]) else (
            "tool calls and tool results", "messages")
        raise UnsupportedFeatureError(
            f"this model's chat template cannot render {what}; serve it with a template that can "
            "(--chat-template FILE)", param=param)

    def _holds_tool_images(self, template: str) -> bool:
        marker = self._image_marker()
        return marker is None or holds_tool_images(template, marker)

    def _image_marker(self) -> str | None:
        if self._image_token_id is None:
            return None
        token = self.tokenizer.convert_ids_to_tokens(self._image_token_id)
        return token if isinstance(token, str) else None

    def _render_text(self, processor: Any, conversation: list[dict[str, Any]], template: str | None,
                     tools: list[dict[str, Any]] | None, template_kwargs: dict[str, Any]) -> str:
        if template is None:
            # Native processors without a Jinja template format conversations themselves.
            extra = {"tools": tools} if tools else {}
            return str(processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False,
                                                     **extra))
        tokenizer = self.tokenizer
        context = {**template_kwargs, "messages": conversation, "add_generation_prompt": True,
                   **{name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token",
                                                                       "unk_token")}}
        if tools:
            context["tools"] = tools
        return render_chat_template(template, context)

    def _process(self, processor: Any, text: str, images: list[Any], videos: list[VideoPart]) -> dict[str, Any]:
        bos = getattr(self.tokenizer, "bos_token", None)
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if bos and text.startswith(bos):
            kwargs["add_special_tokens"] = False  # the template already wrote it
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = [list(video.frames) for video in videos]
            kwargs["video_metadata"] = [video_metadata(video) for video in videos]
        try:
            return dict(processor(text=[text], **kwargs))
        except (ValueError, TypeError, IndexError) as exc:
            # e.g. a conversation whose image placeholders the template did not emit
            raise InvalidRequestError("the model's processor could not prepare this conversation "
                                      f"({type(exc).__name__})", param="messages") from exc


def placeholder_spans(token_ids: list[int], token_id: int | None, count: int, noun: str) -> tuple[ImageSpan, ...]:
    """Where the `count` images (or videos) of a prompt lie: the runs of their placeholder token, one per item."""
    if not count:
        return ()
    runs: list[tuple[int, int]] = []
    for i, token in enumerate(token_ids):
        if token != token_id:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    if len(runs) == count:
        return tuple(ImageSpan(start, end, index) for index, (start, end) in enumerate(runs))
    # NOTE: several runs per item (tiles, or Qwen3-VL's frames with timestamps between) or items back to back:
    # one span covering all their tokens, tagged -1; the prefix cache then hashes every item into it, which is
    # conservative and correct.
    if not runs:
        raise InvalidRequestError(f"the chat template emitted no {noun} placeholder for the {noun}s sent",
                                  param="messages")
    return (ImageSpan(runs[0][0], runs[-1][1], -1),)


def video_metadata(video: VideoPart) -> Any:
    """What transformers' processors read about a sampled video: its source frame rate and the frames taken."""
    from transformers.video_utils import VideoMetadata

    width, height = video.frames[0].size
    return VideoMetadata(total_num_frames=max(1, round(video.duration_s * video.source_fps)), fps=video.source_fps,
                         width=width, height=height, duration=video.duration_s, video_backend="pyav",
                         frames_indices=list(video.frame_indices))


def _special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching every special token's text (longest first), or None when the tokenizer has none."""
    texts: set[str] = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            texts.add(str(token.content))
    texts = {text for text in texts if len(text) > 1}
    if not texts:
        return None
    return re.compile("|".join(re.escape(text) for text in sorted(texts, key=len, reverse=True)))


def _defuse(text: str, pattern: re.Pattern[str] | None) -> str:
    """`text` with every special token's spelling broken by a zero-width space after its first character."""
    if pattern is None:
        return text
    return pattern.sub(lambda match: match.group(0)[0] + _ZERO_WIDTH_SPACE + match.group(0)[1:], text)


def _defuse_all(value: Any, pattern: re.Pattern[str] | None) -> Any:
    """`value` (JSON-like: dicts, lists, strings) with every string in it, keys included, defused."""
    if pattern is None or value is None:
        return value
    if isinstance(value, str):
        return _defuse(value, pattern)
    if isinstance(value, dict):
        return {_defuse_all(k, pattern): _defuse_all(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_defuse_all(item, pattern) for item in value)
    return value


def _max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of this vocabulary can stand for (byte-level vocabularies: bytes)."""
    try:
        return max(1, max(len(token) for token in tokenizer.get_vocab()))
    except Exception:  # NOTE: native tokenizers may not list their vocabulary; then a generous constant bounds it
        return _FALLBACK_MAX_TOKEN_CHARS


def _to_template_message(message: ChatMessage, special: re.Pattern[str] | None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            content.append({"type": "text", "text": _defuse(part.text, special)})
        elif isinstance(part, ImagePart):
            content.append({"type": "image"})
        elif isinstance(part, VideoPart):
            content.append({"type": "video"})
    rendered: dict[str, Any] = {"role": message.role, "content": content}
    if message.role == "tool" or message.tool_calls:
        # NOTE: templates written for text-only LLMs (Qwen2.5's tokenizer template among them) print these turns'
        # content as a string; a list would come out as its Python repr. Text-only content goes as a string.
        if not message.images:
            rendered["content"] = "".join(_defuse(p.text, special) for p in message.parts if isinstance(p, TextPart))
        if message.tool_calls:
            rendered["tool_calls"] = [_defuse_all(dict(call), special) for call in message.tool_calls]
        if message.tool_call_id is not None:
            rendered["tool_call_id"] = message.tool_call_id
    return rendered


def move_tool_images(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Images of tool results moved into a user turn right after the run of tool turns, for templates that
    cannot place an image inside a tool turn. The tool turn keeps its text and says where its image went."""
    moved: list[ChatMessage] = []
    pending: list[TextPart | ImagePart] = []
    for message in messages:
        if message.role != "tool" and pending:
            moved.append(ChatMessage(role="user", parts=tuple(pending)))
            pending = []
        if message.role == "tool" and message.images:
            label = f"Image returned by tool call {message.tool_call_id}:"
            pending += [TextPart(label), *message.images]
            text = tuple(p for p in message.parts if isinstance(p, TextPart))
            note = TextPart(" (image attached in the next user message)")
            message = ChatMessage(role="tool", parts=(*text, note), tool_call_id=message.tool_call_id)
        moved.append(message)
    if pending:
        moved.append(ChatMessage(role="user", parts=tuple(pending)))
    return moved
