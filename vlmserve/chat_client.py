"""`vlmserve chat`: a small streaming terminal client for any OpenAI-compatible chat server."""

from __future__ import annotations

import argparse
import base64
import io
import json
import mimetypes
import sys
from pathlib import Path
from typing import Any

import httpx

from vlmserve.config import client_api_key


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the question (read from the terminal with --interactive)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL, with or without /v1. "
                        "Example: --url http://10.0.0.5:8000/v1")
    parser.add_argument("--api-key", default=None, help="API key (default: VLMSERVE_API_KEY). Example: "
                        "--api-key sk-local")
    parser.add_argument("--model", default=None, help="model name (default: the server's first). Example: "
                        "--model glm-4v")
    parser.add_argument("--image", action="append", default=[], metavar="PATH|URL|-",
                        help="an image to send: a file, an http(s) URL, or - for stdin; repeatable. Example: "
                        "--image cat.jpg")
    parser.add_argument("--sample-image", action="store_true",
                        help="draw a sample picture of shapes (the demo model's world), save it as "
                        "vlmserve-sample.png and send it")
    parser.add_argument("--interactive", action="store_true", help="keep chatting: each line is a new turn")
    parser.add_argument("--max-tokens", type=int, default=512, help="answer length cap. Example: --max-tokens 64")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--seed", type=int, default=None, help="seed for --sample-image and sampling")


class ChatClientError(Exception):
    """A problem to report in one line (no traceback): unreadable image, server error, refused request."""


def base_url(url: str) -> str:
    """The server root: `http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all name the same."""
    url = url.rstrip("/")
    return url[:-len("/v1")] if url.endswith("/v1") else url


def image_to_url(source: str) -> str:
    """A URL the server accepts for `source`: URLs pass through, files and stdin become data URIs."""
    if source.startswith(("http://", "https://", "data:")):
        return source
    if source == "-":
        data, mime = sys.stdin.buffer.read(), "image/png"
    else:
        path = Path(source).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ChatClientError(f"cannot read the image {source!r}: {exc.strerror or type(exc).__name__}") \
                from None
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _sample_image_url(seed: int | None) -> str:
    from vlmserve.demo.shapes import draw_sample_image

    image = draw_sample_image(seed if seed is not None else 0)
    image.save("vlmserve-sample.png")
    print("(sample image saved as vlmserve-sample.png)", file=sys.stderr)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def stream_answer(client: httpx.Client, body: dict[str, Any], out: Any) -> str:
    """POST a streaming chat request and write the answer to `out` as it arrives; returns the whole text."""
    text = ""
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise ChatClientError(_error_message(response))
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise ChatClientError(event["error"].get("message", "server error"))
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                text += piece
                out.write(piece)
                out.flush()
    out.write("\n")
    return text


def _error_message(response: httpx.Response) -> str:
    try:
        return f"{response.status_code}: {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def run_chat(args: argparse.Namespace) -> int:
    key = args.api_key or client_api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    prompt = args.prompt or ("Describe the image." if args.sample_image and not args.interactive else None)
    try:
        images = [image_to_url(s) for s in args.image]
        if args.sample_image:
            images.append(_sample_image_url(args.seed))
        with httpx.Client(base_url=base_url(args.url), headers=headers,
                          timeout=httpx.Timeout(600.0, connect=10.0)) as client:
            model = args.model or _first_model(client)
            return _converse(client, model, images, prompt, args)
    except (httpx.HTTPError, ChatClientError) as exc:
        print(f"vlmserve chat: {exc}", file=sys.stderr)
        return 1


def _first_model(client: httpx.Client) -> str:
    response = client.get("/v1/models")
    if response.status_code != 200:
        raise ChatClientError(_error_message(response))
    return str(response.json()["data"][0]["id"])


def _converse(client: httpx.Client, model: str, images: list[str], prompt: str | None,
              args: argparse.Namespace) -> int:
    messages: list[dict[str, Any]] = []
    while True:
        if prompt is None:
            if not args.interactive:
                print("vlmserve chat: give a prompt, or use --interactive", file=sys.stderr)
                return 2
            try:
                prompt = input("> ")
            except EOFError:
                return 0
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in images]
        content.append({"type": "text", "text": prompt})
        messages.append({"role": "user", "content": content})
        images = []  # images belong to the turn they were given in
        body = {"model": model, "messages": messages, "stream": True, "max_tokens": args.max_tokens,
                "temperature": args.temperature}
        if args.seed is not None:
            body["seed"] = args.seed
        answer = stream_answer(client, body, sys.stdout)
        messages.append({"role": "assistant", "content": answer})
        if not args.interactive:
            return 0
        prompt = None
