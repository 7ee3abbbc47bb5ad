"""Shared helpers for the media-intake tests: running the loader, fake resolvers, encoded images."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from PIL import Image

from vlmserve.config import MediaConfig
from vlmserve.multimodal.loader import ImageRef, MediaLoader
from vlmserve.types import ImagePart

T = TypeVar("T")

PARAM = "messages[0].content[1].image_url"


class FakeResolver:
    """Maps host names to address lists and records every lookup; unknown names fail like a DNS miss."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = dict(table or {})
        self.calls: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.table[host])


def refuse_all_resolver() -> FakeResolver:
    return FakeResolver({})


def load(config: MediaConfig, refs: list[ImageRef], *, transport: httpx.AsyncBaseTransport | None = None,
         resolver: Callable[[str], Awaitable[list[str]]] | None = None) -> list[ImagePart]:
    """Run `MediaLoader.load` on a fresh event loop (tests stay free of pytest-asyncio)."""

    async def main() -> list[ImagePart]:
        loader = MediaLoader(config, transport=transport, resolver=resolver or refuse_all_resolver())
        try:
            return await loader.load(refs)
        finally:
            await loader.aclose()

    return asyncio.run(main())


def load_error(config: MediaConfig, refs: list[ImageRef], **kwargs: Any) -> BaseException:
    """The exception `load` raises (the test fails if it raises none)."""
    try:
        load(config, refs, **kwargs)
    except Exception as exc:
        return exc
    raise AssertionError("load() succeeded but an error was expected")


def ref(url: str, detail: str = "auto", param: str = PARAM) -> ImageRef:
    return ImageRef(url=url, param=param, detail=detail)


def encode(image: Image.Image, fmt: str, **save_args: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"
