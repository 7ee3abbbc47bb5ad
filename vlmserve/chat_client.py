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
from vlmserve.grounding import GROUNDING_FORMATS, GroundingFormat, draw_boxes, parse_boxes


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
    parser.add_argument("--draw-boxes", default=None, metavar="OUT.png",
                        help="save the first image with the answer's boxes drawn on it (grounding models). "
                        "Example: --draw-boxes boxes.png")
    parser.add_argument("--grounding-format", default=None, choices=GROUNDING_FORMATS,
                        help="how the model writes boxes, for --draw-boxes (default: what the server reports "
                        "for the model). Example: --grounding-format qwen2.5-vl")


class ChatClientError(RuntimeError):
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
            cards = _model_cards(client)
            model = args.model or cards[0]["id"]
            if args.draw_boxes:
                args.grounding_format = args.grounding_format or _reported_format(cards, model)
            return _converse(client, model, images, prompt, args)
    except (httpx.HTTPError, RuntimeError) as exc:
        print(f"vlmserve chat: {exc}", file=sys.stderr)
        return 1


def _model_cards(client: httpx.Client) -> list[dict[str, Any]]:
    response = client.get("/v1/models")
    if response.status_code != 200:
        raise ChatClientError(_error_message(response))
    return list(response.json()["data"])


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
        first_image = _first_image(messages)
        if args.draw_boxes and first_image is not None:
            save_boxes(client, first_image, answer, args.grounding_format, args.draw_boxes)
        if not args.interactive:
            return 0
        prompt = None


# --- --draw-boxes ----------------------------------------------------------------------------------------------

def _reported_format(cards: list[dict[str, Any]], model: str) -> str:
    for card in cards:
        if card.get("id") == model and card.get("grounding_format"):
            return str(card["grounding_format"])
    raise RuntimeError(f"the server does not say how {model!r} writes boxes; pass --grounding-format "
                       f"({', '.join(GROUNDING_FORMATS)})")


def _first_image(messages: list[dict[str, Any]]) -> str | None:
    for message in messages:
        for part in message["content"] if isinstance(message["content"], list) else ():
            if part.get("type") == "image_url":
                return str(part["image_url"]["url"])
    return None


def save_boxes(client: httpx.Client, image_url: str, answer: str, fmt: GroundingFormat, out_path: str) -> None:
    """Draw the boxes of `answer` on the image at `image_url` and save it as `out_path`."""
    from PIL import Image

    if image_url.startswith("data:"):
        data = base64.b64decode(image_url.split(",", 1)[1])
    else:
        data = client.get(image_url).raise_for_status().content
    image = Image.open(io.BytesIO(data))
    boxes = parse_boxes(answer, fmt, image.size)
    draw_boxes(image, boxes).save(out_path)
    print(f"({len(boxes)} box{'es' if len(boxes) != 1 else ''} drawn in {out_path})", file=sys.stderr)
