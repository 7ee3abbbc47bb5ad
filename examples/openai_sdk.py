"""Ask vlmserve about an image with the official OpenAI Python SDK.

    vlmserve serve                      # in another terminal: the bundled demo model
    python examples/openai_sdk.py       # draws a picture of shapes and asks about it
    python examples/openai_sdk.py photo.jpg "What is in this picture?"
"""

from __future__ import annotations

import base64
import io
import sys

from openai import OpenAI


def image_data_uri(path: str | None) -> str:
    if path is None:
        from vlmserve.demo.shapes import draw_sample_image

        buffer = io.BytesIO()
        draw_sample_image(7).save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    else:
        with open(path, "rb") as handle:
            data = handle.read()
        mime = "image/jpeg" if path.lower().endswith((".jpg", ".jpeg")) else "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else None
    question = sys.argv[2] if len(sys.argv) > 2 else "Describe the image."
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="not-needed-unless---api-key")
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_uri(path)}},
            {"type": "text", "text": question}]}],
        max_tokens=128, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
