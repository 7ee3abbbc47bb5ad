"""The seed-style baseline: a naive FastAPI server around `model.generate`, one request at a time.

Deliberately faithful to the common tutorial pattern (FastAPI + transformers Auto classes + `generate`), with
only what the benchmark needs on top: images as data URIs in OpenAI chat messages, SSE streaming through
transformers' `AsyncTextIteratorStreamer` (so TTFT is measured like every other server's), `ignore_eos` (as
`min_new_tokens`) and usage counts. A lock serialises requests, as the tutorial's blocking handler does.

    python3 -m bench.seed_server /tmp/qwen25vl7b --port 8001 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from transformers import StoppingCriteria


class ChatCompletionRequest(BaseModel):
    """The OpenAI request fields the naive server reads; others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float = 1.0
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False


class SeedModel:
    """Model + processor loaded through the Auto classes; `generate` under one lock."""

    def __init__(self, path: str, *, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForImageTextToText

        self.path = path
        self.processor = _load_processor(path)
        # device_map needs accelerate (present on the GPU machine); plain CPU loading does not.
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=getattr(torch, dtype), device_map=None if device == "cpu" else device).eval()
        self.lock = asyncio.Lock()

    def prepare(self, messages: list[dict[str, Any]]) -> Any:
        hf_messages, images = _to_hf_messages(messages)
        text = self.processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt")
        return inputs.to(self.model.device)

    def generation_kwargs(self, request: ChatCompletionRequest) -> dict[str, Any]:
        max_new_tokens = request.max_tokens or 512
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens}
        if request.temperature > 0:
            kwargs.update(do_sample=True, temperature=request.temperature)
        else:
            kwargs.update(do_sample=False)
        if request.ignore_eos:
            kwargs["min_new_tokens"] = max_new_tokens
        return kwargs


class _StopWhen(StoppingCriteria):
    """A stopping criterion that ends generation once `event` is set (the client disconnected)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _load_processor(path: str) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError as exc:
        # NOTE: only on machines without torchvision (this project's CPU venv); the GPU machine has it.
        if "torchvision" not in str(exc).lower():
            raise
        from vlmserve.models.hf_processor import load_processor

        return load_processor(path)


def _load_image(url: str) -> Any:
    from PIL import Image

    if url.startswith("data:"):
        data = base64.b64decode(url.split(",", 1)[1])
        return Image.open(io.BytesIO(data)).convert("RGB")
    if url.startswith("file://") or Path(url).is_file():
        return Image.open(url.removeprefix("file://")).convert("RGB")
    raise HTTPException(status_code=400, detail="the seed server reads images from data URIs and local files only")


def _to_hf_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    hf_messages: list[dict[str, Any]] = []
    images: list[Any] = []
    for message in messages:
        content = message.get("content") or ""
        if isinstance(content, str):
            hf_messages.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                images.append(_load_image(url))
                parts.append({"type": "image"})
            elif part.get("type") == "text":
                parts.append({"type": "text", "text": part["text"]})
        hf_messages.append({"role": message["role"], "content": parts})
    return hf_messages, images


def _chunk(request_id: str, model: str, delta: dict[str, Any], finish_reason: str | None = None,
           usage: dict[str, int] | None = None) -> str:
    body: dict[str, Any] = {
        "id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if usage is None else [],
    }
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finish(request: ChatCompletionRequest, completion_len: int) -> str:
    return "length" if completion_len >= (request.max_tokens or 512) else "stop"


def build_app(seed: SeedModel, served_model_name: str) -> FastAPI:
    """The FastAPI app: /v1/chat/completions (streaming or not), /v1/models, /health."""
    from transformers import AsyncTextIteratorStreamer, StoppingCriteriaList

    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: ChatCompletionRequest) -> StreamingResponse | JSONResponse:
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if not request.stream:
            async with seed.lock:
                inputs = seed.prepare(request.messages)
                output = await asyncio.to_thread(seed.model.generate, **inputs, **seed.generation_kwargs(request))
            prompt_len = inputs["input_ids"].shape[1]
            completion_len = output.shape[1] - prompt_len
            text = seed.processor.batch_decode(output[:, prompt_len:], skip_special_tokens=True)[0]
            message = {"role": "assistant", "content": text}
            return JSONResponse({
                "id": request_id, "object": "chat.completion", "created": int(time.time()),
                "model": served_model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": _finish(request, completion_len)}],
                "usage": _usage(prompt_len, completion_len),
            })

        async def stream() -> AsyncIterator[str]:
            async with seed.lock:
                inputs = seed.prepare(request.messages)
                # transformers' asyncio flavour of TextIteratorStreamer (same word-boundary text): the generate
                # thread hands text straight to the event loop, with no extra thread per chunk.
                streamer = AsyncTextIteratorStreamer(seed.processor.tokenizer, skip_prompt=True,
                                                     skip_special_tokens=True)
                disconnected = threading.Event()
                result: dict[str, Any] = {}

                def run() -> None:
                    try:
                        result["output"] = seed.model.generate(
                            **inputs, **seed.generation_kwargs(request), streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([_StopWhen(disconnected)]))
                    except Exception as exc:
                        result["error"] = repr(exc)
                        with contextlib.suppress(RuntimeError):  # the event loop may be gone at shutdown
                            streamer.end()  # unblock the reader

                worker = threading.Thread(target=run, daemon=True)
                worker.start()
                try:
                    yield _chunk(request_id, served_model_name, {"role": "assistant", "content": ""})
                    async for piece in streamer:
                        if piece:
                            yield _chunk(request_id, served_model_name, {"content": piece})
                    await asyncio.to_thread(worker.join)
                finally:
                    # A client that went away stops its generation at the next step (as transformers serve
                    # does), so a cancelled benchmark request does not keep the GPU busy afterwards.
                    disconnected.set()
            if "output" not in result:
                yield f"data: {json.dumps({'error': result.get('error', 'generation failed')})}\n\n"
                return
            prompt_len = inputs["input_ids"].shape[1]
            completion_len = result["output"].shape[1] - prompt_len
            yield _chunk(request_id, served_model_name, {}, finish_reason=_finish(request, completion_len))
            if (request.stream_options or {}).get("include_usage"):
                yield _chunk(request_id, served_model_name, {}, usage=_usage(prompt_len, completion_len))
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--served-model-name", default=None)
    args = parser.parse_args(argv)
    seed = SeedModel(args.model, device=args.device, dtype=args.dtype)
    app = build_app(seed, args.served_model_name or args.model)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
