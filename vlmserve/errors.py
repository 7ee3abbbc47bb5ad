"""Typed exceptions for everything below the HTTP layer.

Nothing here imports HTTP libraries. `vlmserve.api.errors` maps these classes (walking the MRO) to OpenAI's
`{"error": {message, type, param, code}}` bodies and HTTP statuses, in one place.

Two families matter most:
- `RequestError`: the request was wrong or cannot be served *now*; the server is fine and keeps serving.
- `EngineDeadError`: the engine cannot serve anything any more; `/health` turns 503 and the process exits.

A bare `ValueError` escaping to the API is a bug (answered 500), never a client error: raise one of these.
Messages are shown to clients: they must name the field, the limit and the flag that changes it, and must never
contain text from third-party libraries (Pillow, httpx and friends can leak addresses and paths).
"""

from __future__ import annotations


class VlmserveError(Exception):
    """Base class of all vlmserve errors."""

    #: OpenAI-style machine-readable code; subclasses override.
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


# --- the client's fault (4xx) -------------------------------------------------------------------------------


class RequestError(VlmserveError):
    """The request cannot be served; the server keeps serving."""


class InvalidRequestError(RequestError):
    """A field has a wrong type, shape or value (400)."""

    code = "invalid_request"


class ContextLengthError(InvalidRequestError):
    """The prompt (image tokens included) or prompt + max_tokens exceeds the model's context (400)."""

    code = "context_length_exceeded"


class MediaError(InvalidRequestError):
    """An image could not be fetched or decoded, or breaks a media limit (400)."""

    code = "invalid_image"


class MediaFetchError(MediaError):
    """A remote or local image source was refused or could not be read (400)."""

    code = "invalid_image_url"


class VideoError(MediaError):
    """A video could not be decoded, or breaks a video limit (400)."""

    code = "invalid_video"


class VideoFetchError(MediaFetchError):
    """A remote or local video source was refused or could not be read (400)."""

    code = "invalid_video_url"


class UnsupportedFeatureError(InvalidRequestError):
    """The request is valid OpenAI but asks for something this model or server does not do (400)."""

    code = "unsupported"


class AuthenticationError(RequestError):
    """Missing or wrong API key (401)."""

    code = "invalid_api_key"


class ModelNotFoundError(RequestError):
    """The `model` field names no served model (404)."""

    code = "model_not_found"


class NotFoundError(RequestError):
    """Unknown route (404)."""

    code = "not_found"


class PayloadTooLargeError(RequestError):
    """The request body exceeds `--max-request-bytes` (413)."""

    code = "payload_too_large"


class QueueFullError(RequestError):
    """The engine's waiting queue is full; retry later (429 with Retry-After)."""

    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QuotaExceededError(QueueFullError):
    """One client (API key or address) holds its share of the server already (429 with Retry-After)."""

    code = "quota_exceeded"


class ServerBusyError(QueueFullError):
    """Requests being prepared hold the memory budget (--max-preparing-bytes); retry later (429)."""

    code = "server_busy"


class UnsupportedMediaTypeError(RequestError):
    """A request body that is not `Content-Type: application/json` (415)."""

    code = "unsupported_media_type"


class RequestTimeoutError(RequestError):
    """The client did not send its request body in time (408)."""

    code = "request_timeout"


class HostNotAllowedError(InvalidRequestError):
    """The Host header names no host this server answers to (400): DNS rebinding, or a missing --allowed-hosts."""

    code = "host_not_allowed"


# --- the server's state (5xx) --------------------------------------------------------------------------------


class ServiceUnavailableError(VlmserveError):
    """The server is shutting down or still starting (503); retry elsewhere or later."""

    code = "service_unavailable"


class EngineDeadError(ServiceUnavailableError):
    """The engine loop died; nothing can be served until the process is restarted (503)."""

    code = "engine_dead"


class InternalError(VlmserveError):
    """A bug or an unexpected failure while serving one request (500); details only in the server log."""

    code = "internal_error"


class ModelLoadError(VlmserveError):
    """A model could not be found or loaded at start-up (raised to the CLI, never to a client)."""


class TensorParallelError(ModelLoadError):
    """The model cannot be sharded by --tensor-parallel-size (family, head counts or sizes); raised at start-up."""
