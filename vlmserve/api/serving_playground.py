"""GET /playground: a chat page made of static files shipped in the package (no CDN, no build step).

The page is public even when the server has API keys (the browser cannot send a key before the page that asks for
it has loaded); every API call it makes still needs the key. Only the exact paths in `public_paths()` are public.
Every response of the page carries a strict Content-Security-Policy: scripts, styles and requests from this origin
only, no inline script, images only from this origin or the data:/blob: URLs the page makes from the user's files.
"""

from __future__ import annotations

import io
from importlib import resources

from fastapi import FastAPI, Query
from fastapi.responses import RedirectResponse, Response

from vlmserve.errors import NotFoundError

PAGE_PATH = "/playground"
SAMPLE_PATH = f"{PAGE_PATH}/sample.png"
MAX_SAMPLE_SEED = 2**31 - 1

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data: blob:",
    "connect-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"))
_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


def load_assets() -> dict[str, tuple[bytes, str]]:
    """The page's files by name, read once: name → (bytes, media type)."""
    assets: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("vlmserve.api").joinpath("playground").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in _MEDIA_TYPES:
            assets[entry.name] = (entry.read_bytes(), _MEDIA_TYPES[suffix])
    if "index.html" not in assets:
        raise RuntimeError("the playground's index.html is missing from the vlmserve package")
    return assets


def public_paths(assets: dict[str, tuple[bytes, str]]) -> frozenset[str]:
    """The exact paths served without an API key: the index redirect, the page, its files and the sample."""
    return frozenset({"/", PAGE_PATH, SAMPLE_PATH, *(f"{PAGE_PATH}/{name}" for name in assets)})


def install_playground(app: FastAPI, assets: dict[str, tuple[bytes, str]]) -> None:
    """Add `/` (a redirect to the page), the page, its files and the demo's sample image to `app`."""

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return RedirectResponse(PAGE_PATH.lstrip("/"), status_code=307)  # relative: works under a path prefix

    @app.get(PAGE_PATH, include_in_schema=False)
    async def page() -> Response:
        body, media_type = assets["index.html"]
        return Response(body, media_type=media_type, headers=_HEADERS)

    # A sync route: FastAPI runs it in its thread pool, so drawing never blocks the event loop.
    @app.get(SAMPLE_PATH, include_in_schema=False)
    def sample(seed: int = Query(0, ge=0, le=MAX_SAMPLE_SEED)) -> Response:
        return Response(sample_png(seed), media_type="image/png", headers=_HEADERS)

    @app.get(PAGE_PATH + "/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:
            raise NotFoundError(f"the playground has no file {name!r}")
        body, media_type = assets[name]
        return Response(body, media_type=media_type, headers=_HEADERS)


def sample_png(seed: int) -> bytes:
    """The demo task's sample picture for `seed` (what `vlmserve chat --sample-image --seed SEED` sends), as PNG."""
    from vlmserve.demo.shapes import draw_sample_image

    buffer = io.BytesIO()
    draw_sample_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = ["CONTENT_SECURITY_POLICY", "PAGE_PATH", "install_playground", "load_assets", "public_paths", "sample_png"]
