"""Configuration: frozen dataclasses, each field documented; CLI flags are derived from these fields.

Config flows one way: command line (and the few environment variables read here, nowhere else) → these
dataclasses → components. Validation happens in `__post_init__` and raises `ConfigError` with a message that
names the flag.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

DEMO_MODEL_NAME = "vlmserve-demo"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag."""


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, metavar: str | None = None,
           example: str | None = None, flag: str | None = None, positional: bool = False) -> Any:
    """A dataclass field that carries its own CLI documentation."""
    meta = {"help": help, "choices": choices, "metavar": metavar, "example": example, "flag": flag,
            "positional": positional}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    return field(default=default, metadata=meta)


def _env_api_keys() -> tuple[str, ...]:
    raw = os.environ.get("VLMSERVE_API_KEY", "")
    return tuple(k.strip() for k in raw.split(",") if k.strip())


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how."""

    model: str | None = option(
        None,
        "Model to serve: a local directory, a Hugging Face id (honours HF_HUB_OFFLINE and the usual cache) or "
        "'modelscope:ORG/NAME'. Omit it to serve the bundled demo model.",
        metavar="MODEL", example="Qwen/Qwen2-VL-2B-Instruct", positional=True)
    served_model_name: tuple[str, ...] = option(
        (), "Names clients may put in the request's 'model' field; the first is reported. Default: the model's "
        "directory or id name.", metavar="NAME", example="--served-model-name glm-4v gpt-4o")
    device: str = option("auto", "Where the model runs; 'auto' picks cuda, then mps, then cpu.",
                         choices=("auto", "cpu", "cuda", "mps"), example="--device cuda")
    dtype: str = option("auto", "Weight and activation dtype; 'auto' is bfloat16 on CUDA and float32 elsewhere.",
                        choices=("auto", "float32", "bfloat16", "float16"), example="--dtype bfloat16")
    trust_remote_code: bool = option(
        False, "Allow running Python code shipped inside the model repository. Only for repositories you trust: "
        "that code runs with this server's permissions.", example="--trust-remote-code")
    max_model_len: int | None = option(
        None, "Context window in tokens (prompt, image tokens included, plus output). Default: the model's own.",
        metavar="TOKENS", example="--max-model-len 8192")
    chat_template: str | None = option(
        None, "A Jinja chat template file that replaces the model's own.", metavar="FILE",
        example="--chat-template ./template.jinja")
    load_format: str = option(
        "auto", "'dummy' fills the weights with random values instead of reading them (config.json, tokenizer and "
        "processor files are still read): benchmarks of architectures too large to write to disk. Only with "
        "--tensor-parallel-size > 1.", choices=("auto", "dummy"), example="--load-format dummy")
    revision: str | None = option(None, "Model revision (branch, tag or commit) for hub downloads.",
                                  metavar="REV", example="--revision main")
    tool_call_parser: str = option(
        "auto", "How tool calls are read from the model's output: 'auto' picks the format of the model's family "
        "(hermes for Qwen-VL, glm45 for GLM-4.5V/4.6V, glm4 for GLM-4V-9B, mistral, llama3_json); 'none' "
        "refuses tools.", choices=("auto", "none", "hermes", "glm45", "glm4", "llama3_json", "mistral"),
        example="--tool-call-parser hermes")
    reasoning_parser: str = option(
        "auto", "How a thinking model's <think> block is split into reasoning_content: 'auto' by family "
        "(think for Qwen3-VL, glm4v for GLM-4.1V/4.5V/4.6V); 'none' leaves it in the content.",
        choices=("auto", "none", "think", "glm4v"), example="--reasoning-parser none")

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ConfigError("--max-model-len must be at least 16 tokens")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ConfigError(f"--chat-template: no such file: {self.chat_template}")

    @property
    def is_demo(self) -> bool:
        return self.model is None

    def default_served_names(self) -> tuple[str, ...]:
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return (DEMO_MODEL_NAME,)
        return (self.model.rstrip("/").split(":", 1)[-1].rsplit("/", 1)[-1],)


@dataclass(frozen=True)
class EngineConfig:
    """How requests are scheduled and run."""

    engine: str = option(
        "auto", "Engine: 'paged' (continuous batching over a paged KV cache), 'generate' (batched "
        "model.generate, the fallback) or 'auto' (paged where the architecture supports it).",
        choices=("auto", "paged", "generate"), example="--engine generate")
    max_num_seqs: int = option(64, "Most sequences running at once.", metavar="N", example="--max-num-seqs 128")
    max_num_batched_tokens: int = option(
        2048, "Token budget of one engine step (prefill chunks plus decode tokens).", metavar="TOKENS",
        example="--max-num-batched-tokens 4096")
    max_waiting_requests: int = option(
        256, "Requests that may wait for a slot; beyond this the server answers 429 with Retry-After.",
        metavar="N", example="--max-waiting-requests 1024")
    block_size: int = option(16, "Tokens per KV-cache block.", metavar="TOKENS", example="--block-size 32")
    num_kv_blocks: int | None = option(
        None, "KV-cache blocks to allocate. Default: from --kv-cache-memory-fraction on GPU, 4096 on CPU.",
        metavar="N", example="--num-kv-blocks 2048")
    kv_cache_memory_fraction: float = option(
        0.85, "On GPU, the fraction of total device memory the weights, activations and KV cache may use.",
        metavar="FRACTION", example="--kv-cache-memory-fraction 0.9")
    enable_prefix_caching: bool = option(
        True, "Reuse KV blocks of identical prompt prefixes (image content hashes included).",
        example="--no-enable-prefix-caching")
    image_cache_bytes: int = option(
        512 * 2**20, "Bytes of image embeddings kept, keyed by image content hash.", metavar="BYTES",
        example="--image-cache-bytes 1073741824")
    enable_cuda_graphs: bool = option(True, "Capture decode steps in CUDA graphs (GPU only).",
                                      example="--no-enable-cuda-graphs")
    # NOTE: off by default until a GPU run has checked it (the CPU stand-in tests pass; see bench/RESULTS.md).
    enable_vision_graphs: bool = option(
        False, "Replay the vision tower from CUDA graphs, one per set of image sizes (Qwen2-VL, Qwen2.5-VL; GPU "
        "only, with --enable-cuda-graphs).", example="--enable-vision-graphs")
    compile_decoder: bool = option(
        False, "torch.compile the decoder before capturing decode graphs (GPU only): fuses its norm, rotary and "
        "SiLU kernels; adds about a minute to start-up.", example="--compile-decoder")
    enable_paged_self_check: bool = option(
        True, "At load, check that the paged engine reproduces the model's own generate on a short image prompt "
        "(logprobs within a dtype-aware tolerance); on a mismatch the model is served by the generate engine.",
        example="--no-enable-paged-self-check")
    tensor_parallel_size: int = option(
        1, "Shard the decoder over this many processes (GPUs) of one host with torch.distributed: attention heads "
        "and MLP columns split, one all-reduce after each attention and MLP block; the scheduler and the vision "
        "tower run on rank 0. The paged engine only; transformers families with standard projection names and "
        "GLM-4V-9B.", metavar="N", example="--tensor-parallel-size 2")
    max_generate_batch: int = option(8, "Largest batch the generate engine runs in one call.", metavar="N",
                                     example="--max-generate-batch 16")

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_generate_batch",
                     "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_waiting_requests < 0:
            raise ConfigError("--max-waiting-requests must not be negative")
        if self.tensor_parallel_size > 1 and self.engine == "generate":
            raise ConfigError("--tensor-parallel-size > 1 runs on the paged engine only; drop --engine generate")
        if not 0.05 <= self.kv_cache_memory_fraction <= 0.99:
            raise ConfigError("--kv-cache-memory-fraction must be between 0.05 and 0.99")


@dataclass(frozen=True)
class MediaConfig:
    """Where images may come from and how large they may be."""

    allowed_media_hosts: tuple[str, ...] = option(
        (), "Hosts image URLs may name even when they resolve to loopback, private or link-local addresses "
        "(otherwise refused). Exact host names or IP addresses.", metavar="HOST",
        example="--allowed-media-hosts images.internal 10.0.0.7")
    allowed_local_media_path: str | None = option(
        None, "A directory whose files requests may name as file:// URLs or paths. Off by default.",
        metavar="DIR", example="--allowed-local-media-path /srv/images")
    max_image_bytes: int = option(20 * 2**20, "Largest encoded image accepted, in bytes.", metavar="BYTES",
                                  example="--max-image-bytes 10485760")
    max_image_pixels: int = option(40_000_000, "Largest decoded image accepted, in pixels (width x height), "
                                   "checked from the header before decoding.", metavar="PIXELS",
                                   example="--max-image-pixels 20000000")
    max_image_aspect_ratio: float = option(
        200.0, "Longest side over shortest side, at most; checked from the header before decoding (vision processors "
        "refuse more anyway, after the decoding cost).", metavar="RATIO", example="--max-image-aspect-ratio 50")
    max_image_decode_bytes: int = option(
        256 * 2**20, "Memory one image's decoding may need, estimated from the header: pixels times the bytes per "
        "pixel of its stored format plus the RGB copy, and the format's own tile and strip buffers.",
        metavar="BYTES", example="--max-image-decode-bytes 134217728")
    max_images_per_request: int = option(16, "Most images one request may carry.", metavar="N",
                                         example="--max-images-per-request 4")
    fetch_timeout_s: float = option(10.0, "Deadline for fetching one image URL, redirects included.",
                                    metavar="SECONDS", example="--fetch-timeout-s 5")
    max_redirects: int = option(3, "Redirects followed per image URL (each target re-checked).", metavar="N",
                                example="--max-redirects 0")
    low_detail_pixels: int = option(512 * 512, "Pixel budget of an image sent with detail='low'.",
                                    metavar="PIXELS", example="--low-detail-pixels 262144")
    high_detail_pixels: int = option(2048 * 2048, "Pixel budget of an image sent with detail='high' or 'auto'.",
                                     metavar="PIXELS", example="--high-detail-pixels 4194304")
    num_media_workers: int = option(4, "Threads that fetch, decode and preprocess images off the event loop.",
                                    metavar="N", example="--num-media-workers 8")
    max_video_bytes: int = option(64 * 2**20, "Largest encoded video accepted (video_url parts), in bytes.",
                                  metavar="BYTES", example="--max-video-bytes 33554432")
    max_video_duration_s: float = option(600.0, "Longest video accepted, in seconds (from its container header "
                                         "and, while decoding, from the frames' timestamps).", metavar="SECONDS",
                                         example="--max-video-duration-s 60")
    video_fps: float = option(2.0, "Frames per second sampled from a video; a request may ask for another rate "
                              "with mm_processor_kwargs.fps.", metavar="FPS", example="--video-fps 1")
    max_video_frames: int = option(64, "Most frames sampled from one video (the rate is lowered to fit); a request "
                                   "may ask for fewer with mm_processor_kwargs.max_frames.", metavar="N",
                                   example="--max-video-frames 32")
    max_video_pixels: int = option(
        64 * 448 * 448, "Pixel budget of one video: frames are downscaled so that frames x width x height stays "
        "under it.", metavar="PIXELS", example="--max-video-pixels 4000000")
    max_video_frame_pixels: int = option(
        8_300_000, "Largest video frame accepted, in pixels (width x height), checked from the stream header before "
        "decoding.", metavar="PIXELS", example="--max-video-frame-pixels 2073600")
    max_video_decode_pixels: int = option(
        16_000_000_000, "Pixels one video's decoding may produce (every frame is decoded to sample a few: about 4.5 "
        "minutes of 1080p at 30 fps); estimated from the header, then counted while decoding.", metavar="PIXELS",
        example="--max-video-decode-pixels 4000000000")
    max_videos_per_request: int = option(2, "Most videos one request may carry.", metavar="N",
                                         example="--max-videos-per-request 1")

    def __post_init__(self) -> None:
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ConfigError(f"--allowed-local-media-path: not a directory: {self.allowed_local_media_path}")
        for name in ("max_image_bytes", "max_image_pixels", "max_images_per_request", "num_media_workers",
                     "max_image_decode_bytes", "max_video_bytes", "max_video_frames", "max_video_pixels",
                     "max_video_frame_pixels", "max_videos_per_request", "max_video_decode_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.fetch_timeout_s <= 0:
            raise ConfigError("--fetch-timeout-s must be positive")
        if self.max_video_duration_s <= 0 or self.video_fps <= 0:
            raise ConfigError("--max-video-duration-s and --video-fps must be positive")
        if self.max_image_aspect_ratio < 1:
            raise ConfigError("--max-image-aspect-ratio must be at least 1")


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP side: address, keys and request limits."""

    host: str = option("127.0.0.1", "Address to listen on; 0.0.0.0 for every interface.", metavar="ADDR",
                       example="--host 0.0.0.0")
    port: int = option(8000, "TCP port to listen on.", metavar="PORT", example="--port 8888")
    api_key: tuple[str, ...] = option(
        (), "Keys clients must send as 'Authorization: Bearer KEY' (every route but /health and the playground "
        "page's files). Several may be given; also read from VLMSERVE_API_KEY (comma-separated).", metavar="KEY",
        example="--api-key sk-local")
    api_key_file: str | None = option(None, "A file with one accepted API key per line.", metavar="FILE",
                                      example="--api-key-file /etc/vlmserve/keys")
    allowed_origins: tuple[str, ...] = option((), "Origins allowed by CORS; CORS is off unless given.",
                                              metavar="ORIGIN", example="--allowed-origins https://app.example")
    max_request_bytes: int = option(64 * 2**20, "Largest request body, in bytes (413 beyond).", metavar="BYTES",
                                    example="--max-request-bytes 33554432")
    max_n: int = option(16, "Largest 'n' (choices per request).", metavar="N", example="--max-n 4")
    max_messages: int = option(512, "Most messages in one request.", metavar="N", example="--max-messages 64")
    max_stop_sequences: int = option(16, "Most stop strings in one request.", metavar="N",
                                     example="--max-stop-sequences 4")
    trust_request_chat_template: bool = option(
        False, "Accept a 'chat_template' sent inside a request (it still renders in a sandbox).",
        example="--trust-request-chat-template")
    shutdown_timeout_s: float = option(30.0, "On SIGTERM, how long in-flight requests may finish.",
                                       metavar="SECONDS", example="--shutdown-timeout-s 10")
    log_requests: bool = option(False, "Log prompts (never keys or image bytes).", example="--log-requests")
    responses_store_max_entries: int = option(
        1000, "Most responses kept for previous_response_id and GET /v1/responses/{id} (store: true); the least "
        "recently used go first. 0 keeps none.", metavar="N", example="--responses-store-max-entries 10000")
    responses_store_max_bytes: int = option(
        256 * 2**20, "Most bytes (JSON size, inline images included) the kept responses may hold.",
        metavar="BYTES", example="--responses-store-max-bytes 1073741824")
    responses_store_ttl_s: float = option(3600.0, "How long a kept response stays retrievable.",
                                          metavar="SECONDS", example="--responses-store-ttl-s 86400")
    enable_docs: bool = option(True, "Serve Swagger UI at /docs (assets bundled, no outside network).",
                               example="--no-docs", flag="--docs")
    allowed_hosts: tuple[str, ...] = option(
        (), "Host header values accepted (a guard against DNS rebinding), as NAME or NAME:PORT; '*' accepts any. "
        "Default: when --host is a loopback address, only localhost, 127.0.0.1 and [::1] (on --port); otherwise any.",
        metavar="HOST", example="--allowed-hosts llm.internal llm.internal:8000")
    header_timeout_s: float = option(
        10.0, "A connection must send a request's line and headers within this time, or it is closed.",
        metavar="SECONDS", example="--header-timeout-s 5")
    body_timeout_s: float = option(
        60.0, "A request's whole body must arrive within this time (408 beyond).", metavar="SECONDS",
        example="--body-timeout-s 30")
    keep_alive_timeout_s: float = option(5.0, "Idle keep-alive connections are closed after this time.",
                                         metavar="SECONDS", example="--keep-alive-timeout-s 15")
    max_connections: int = option(
        1024, "Open client connections at most; beyond it new connections get 503 and are closed.", metavar="N",
        example="--max-connections 4096")
    enable_cache_salt: bool = option(
        True, "Isolate the prefix cache per API key (salted block hashes), so no client can learn from cached_tokens "
        "or timing what another key sent. Only has an effect when API keys are configured.",
        example="--no-enable-cache-salt")
    report_cached_tokens: bool = option(
        True, "Report usage.prompt_tokens_details.cached_tokens (otherwise always 0).",
        example="--no-report-cached-tokens")
    max_sequences_per_client: int | None = option(
        None, "Sequences (n counts each) one API key, or one client address without keys, may have running or "
        "waiting; 429 beyond. Default: the server's capacity (--max-num-seqs + --max-waiting-requests) divided by "
        "the number of API keys; no limit without keys.", metavar="N", example="--max-sequences-per-client 32")
    max_tokens_per_client: int | None = option(
        None, "Tokens (prompt plus max_tokens, times n) one API key or client address may have in flight; 429 beyond. "
        "Default: no limit.", metavar="TOKENS", example="--max-tokens-per-client 200000")
    max_preparing_bytes: int = option(
        2 * 2**30, "Memory that requests still being prepared or waiting for their prefill may hold, counted as "
        "decoded image and image-tensor bytes; beyond it new requests get 429 with Retry-After.", metavar="BYTES",
        example="--max-preparing-bytes 1073741824")
    enable_playground: bool = option(
        True, "Serve the chat playground page at /playground (and redirect / to it). The page itself is public; "
        "its API calls need a key when --api-key is set.", example="--no-playground", flag="--playground")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("--port must be between 0 and 65535")
        if self.max_n < 1:
            raise ConfigError("--max-n must be at least 1")
        if self.responses_store_max_entries < 0 or self.responses_store_max_bytes < 0:
            raise ConfigError("--responses-store-max-entries and --responses-store-max-bytes must not be negative")
        if self.responses_store_ttl_s <= 0:
            raise ConfigError("--responses-store-ttl-s must be positive")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        for name in ("max_connections", "max_sequences_per_client", "max_tokens_per_client", "max_preparing_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")

    def resolved_allowed_hosts(self) -> tuple[str, ...]:
        """The Host allow-list in force: the configured one, else the loopback names when listening on loopback,
        else () meaning any host."""
        if self.allowed_hosts:
            return () if "*" in self.allowed_hosts else self.allowed_hosts
        if self.host in ("127.0.0.1", "::1", "localhost") or self.host.startswith("127."):
            return ("localhost", "127.0.0.1", "[::1]")
        return ()

    def resolved_api_keys(self) -> tuple[str, ...]:
        """Keys from --api-key, VLMSERVE_API_KEY and --api-key-file, in that order."""
        keys = list(self.api_key) + list(_env_api_keys())
        if self.api_key_file:
            try:
                text = Path(self.api_key_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"--api-key-file: cannot read {self.api_key_file}") from exc
            keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return tuple(dict.fromkeys(keys))

    def reported_cached_tokens(self, cached_tokens: int) -> int:
        """What usage says of prompt tokens served from the prefix cache (--no-report-cached-tokens: 0)."""
        return cached_tokens if self.report_cached_tokens else 0


@dataclass(frozen=True)
class RayConfig:
    """Scale-out on Ray Serve (needs `pip install 'vlmserve[ray]'`): engine replicas behind one ingress."""

    ray: bool = option(False, "Serve with Ray Serve: --replicas engine replicas (one GPU each on GPU machines) "
                       "behind one OpenAI ingress, routed by image-aware prefix affinity.", example="--ray --replicas 4")
    replicas: int = option(1, "Engine replicas to start with (--ray).", metavar="N", example="--replicas 2")
    min_replicas: int = option(1, "Fewest replicas autoscaling keeps (with --max-replicas).", metavar="N",
                               example="--min-replicas 2")
    max_replicas: int | None = option(
        None, "Autoscale between --min-replicas and this many replicas on queue depth (--ray). Default: a fixed "
        "--replicas.", metavar="N", example="--max-replicas 8")
    target_ongoing_requests: int = option(
        16, "Autoscaling target: ongoing requests per replica.", metavar="N", example="--target-ongoing-requests 32")
    ray_address: str | None = option(
        None, "Join this Ray cluster instead of starting a local one.", metavar="ADDRESS",
        example="--ray-address ray://head:10001")
    ray_num_cpus: int | None = option(None, "CPUs of the local Ray instance (default: all).", metavar="N",
                                      example="--ray-num-cpus 8")
    num_gpus_per_replica: float | None = option(
        None, "GPUs per engine replica (default: 1 when the model runs on CUDA, else 0).", metavar="N",
        example="--num-gpus-per-replica 1")
    num_cpus_per_replica: float = option(1.0, "CPUs Ray reserves per engine replica.", metavar="N",
                                         example="--num-cpus-per-replica 4")
    router: str = option(
        "image-aware", "How the ingress picks a replica: 'image-aware' (prefix affinity on token and image hashes, "
        "then least load) or 'power-of-two' (Ray Serve's default: the less loaded of two random replicas).",
        choices=("image-aware", "power-of-two"), example="--router power-of-two")
    affinity_imbalance_threshold: int = option(
        8, "Prefix affinity gives way once the affine replica has this many more queued requests than the least "
        "loaded one.", metavar="N", example="--affinity-imbalance-threshold 16")

    def __post_init__(self) -> None:
        for name in ("replicas", "min_replicas", "target_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_replicas is not None and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ConfigError("--replicas must lie between --min-replicas and --max-replicas")


@dataclass(frozen=True)
class Config:
    """Everything `vlmserve serve` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ray: RayConfig = field(default_factory=RayConfig)


SECTIONS: dict[str, type] = {"model": ModelConfig, "engine": EngineConfig, "media": MediaConfig,
                             "server": ServerConfig, "ray": RayConfig}


def field_default(cls: type, name: str) -> Any:
    for f in fields(cls):
        if f.name == name:
            return None if f.default is MISSING else f.default
    raise KeyError(name)


def client_api_key() -> str | None:
    """The key `vlmserve chat` sends when --api-key is not given: the first of VLMSERVE_API_KEY."""
    keys = _env_api_keys()
    return keys[0] if keys else None
