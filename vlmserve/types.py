"""Engine-side types: what the API hands the engine and what comes back.

These know nothing of HTTP or of the OpenAI schema. Tensors travel inside `PreparedPrompt.model_inputs` as
opaque values; nothing in this module imports torch.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


class FinishReason(str, enum.Enum):
    """Why a sequence stopped. Values are what the OpenAI API reports."""

    STOP = "stop"  # end-of-sequence token, stop token id or stop string
    LENGTH = "length"  # max_tokens or the context window reached
    ABORT = "abort"  # client went away, or the server shut down before it finished
    ERROR = "error"  # this request failed inside the engine; others carry on


StructuredKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutputSpec:
    """A constraint on the generated text, enforced on the logits every step by the engine's grammar matcher.

    `value` by kind: "json_schema" → the schema as JSON text; "json_object" → None (any JSON object);
    "regex" → the pattern; "choice" → the allowed strings; "grammar" → a Lark grammar in llguidance's dialect
    (which may embed JSON schemas with `%json {...}`). The API layer builds these; the engine never sees OpenAI
    field names. Specs are hashable so compiled grammars can be cached by spec.
    """

    kind: StructuredKind
    value: str | tuple[str, ...] | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. Defaults follow the OpenAI API (not the model's generation config).

    `temperature == 0` means greedy decoding; top_k == 0 and top_p == 1 and min_p == 0 disable those filters.
    `max_tokens=None` means "up to the end of the context window", as in the OpenAI API.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    structured: StructuredOutputSpec | None = None
    # How the answer's text is made (vLLM's names): None keeps the model's content markup (grounding tags) and
    # drops control tokens; True drops every special token, False keeps them all.
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
        )


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """A decoded RGB image (a PIL image, typed loosely to keep this module import-light) and its content hash."""

    image: Any
    hash: str
    detail: str = "auto"


@dataclass(frozen=True)
class VideoPart:
    """A decoded video: its sampled RGB frames (PIL images) and what the model's processor needs to place them in
    time. `hash` covers every frame's pixels and the timestamps, so the prefix cache keys video tokens on it."""

    frames: tuple[Any, ...]
    hash: str
    timestamps: tuple[float, ...]  # seconds from the start, one per frame
    source_fps: float  # the stream's own frame rate
    sampled_fps: float  # frames per second of the sampled frames (the rate the model is told)
    duration_s: float

    @property
    def frame_indices(self) -> tuple[int, ...]:
        """Each frame's index in the source stream (processors place frames in time from these and the fps)."""
        return tuple(round(t * self.source_fps) for t in self.timestamps)


MediaPart = ImagePart | VideoPart


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn after media intake: text parts and decoded images, in order.

    Assistant turns may carry the tool calls they made (`{"id", "type", "function": {"name", "arguments"}}`,
    arguments as an object, as chat templates expect); tool turns name the call they answer."""

    role: str
    parts: tuple[TextPart | ImagePart | VideoPart, ...]
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    tool_call_id: str | None = None

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.parts if isinstance(p, ImagePart)]

    @property
    def videos(self) -> list[VideoPart]:
        return [p for p in self.parts if isinstance(p, VideoPart)]


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's placeholder tokens sit in a prompt: token_ids[start:end] belong to image `index`."""

    start: int
    end: int
    index: int


@dataclass
class PreparedPrompt:
    """A fully rendered prompt: token ids plus what the model needs for its images.

    Built by `vlmserve.multimodal.prompt` through the model's own processor, off the event loop.
    `token_ids` already hold the image placeholder tokens, so `len(token_ids)` is the true prompt length
    (image tokens counted). `image_hashes[i]` is the content hash of image i; spans locate the images' tokens,
    which the prefix cache folds into block hashes.
    """

    token_ids: list[int]
    model_inputs: dict[str, Any] = field(default_factory=dict)
    image_hashes: tuple[str, ...] = ()
    image_spans: tuple[ImageSpan, ...] = ()
    # Videos as images: `video_spans[i].index` indexes `video_hashes` (-1: the span stands for every video).
    video_hashes: tuple[str, ...] = ()
    video_spans: tuple[ImageSpan, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_video_tokens(self) -> int:
        return sum(span.end - span.start for span in self.video_spans)

    @property
    def num_image_tokens(self) -> int:
        return sum(span.end - span.start for span in self.image_spans)


@dataclass
class GenerationRequest:
    """One sequence to generate. `n > 1` is fanned out by the engine client into n of these."""

    request_id: str
    prompt: PreparedPrompt
    sampling: SamplingParams
    #: time.monotonic() when the request entered its engine core's queue (restamped there: what queue time
    #: measures from, on the clock of the process that schedules it)
    arrival_time: float = field(default_factory=time.monotonic)
    # NOTE: folded into the first prefix-cache block hash, so requests with different salts (different API keys,
    # by default) never share cached KV or learn from `cached_tokens` what another client sent.
    cache_salt: str | None = None
    # NOTE: who sent the request (an API key's digest, or a client address): the scheduler shares running slots
    # fairly between clients, and the API counts per-client quotas by it. None: one anonymous client.
    client_id: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class PositionLogprobs:
    """The chosen token's logprob and the top alternatives at one generated position."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class RequestTimings:
    """What the engine core measured of one sequence up to its first token (metrics, not the answer).

    `queue_time_s`: from entering the core's queue to its first schedule. `vision_encoder_s`: its share of the
    vision-tower time that encoded its images (a batch of several prompts' images is shared by image count);
    `num_images_encoded`: those images (images found in the embedding cache are not encoded, and count 0 s).
    """

    queue_time_s: float
    vision_encoder_s: float = 0.0
    num_images_encoded: int = 0


@dataclass
class TokenDelta:
    """New output of one sequence since its last delta, already detokenized and stop-string checked.

    `text` is UTF-8 safe: bytes of a character split across tokens are held back until complete.
    The final delta has `finish_reason` set; counts are cumulative.
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: list[PositionLogprobs] | None = None
    token_texts: list[str] | None = None  # text of each token in `logprobs`, for the API's `token` field
    top_token_texts: list[list[str]] | None = None  # text of each alternative in `logprobs[i].top`
    num_cached_tokens: int = 0
    #: on the sequence's first delta that carries a token: the engine's queue and vision-tower timings
    timings: RequestTimings | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's state, for tests, /metrics and logs."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks_total: int = 0
    num_kv_blocks_free: int = 0
    num_kv_blocks_cached: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    image_cache_hits: int = 0
    image_cache_misses: int = 0
    video_cache_hits: int = 0  # videos' embeddings share the image cache; counted apart
    video_cache_misses: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    num_generated_tokens: int = 0
    num_prompt_tokens: int = 0
    generation_tokens_per_s: float = 0.0
    num_aborted: int = 0
    num_finished: int = 0
    num_grammars_compiled: int = 0  # structured-output grammars compiled (cache misses)
    grammar_compile_seconds: float = 0.0  # their compile time, summed
    engine: str = ""

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
