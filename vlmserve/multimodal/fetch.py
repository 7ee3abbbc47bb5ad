"""Image sources → encoded bytes: data URIs, http(s) URLs and files inside an allowed folder.

Every limit of `MediaConfig` that concerns the encoded bytes is enforced here: the byte cap (before base64
decoding, and while streaming a response), the fetch deadline (redirects included), the redirect count, the
schemes and the network addresses (`vlmserve.multimodal.addresses`).

Errors are `MediaFetchError` whose `param` is `<ref param>.url` — the field the client must fix — for every
problem with the source itself (scheme, address, HTTP status, size, base64, local path). Messages are written
here and never carry text from httpx or the OS.

Blocking work (base64 decoding, reading files) runs on the executor the caller passes; only network I/O, which is
asynchronous, runs on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from vlmserve.config import MediaConfig
from vlmserve.errors import MediaFetchError, VideoFetchError
from vlmserve.multimodal.addresses import AddressRefused, HostPolicy, IPAddress, check_host_syntax, parse_ip

logger = logging.getLogger(__name__)
# NOTE: httpx logs every request's full URL at INFO; image URLs are often signed (their query string is a
# credential), so its request lines stay out of the server log.
logging.getLogger("httpx").setLevel(logging.WARNING)

Resolver = Callable[[str], Awaitable[list[str]]]

_USER_AGENT = "vlmserve-media-fetch/0.1"
_HTTP_SCHEMES = ("http", "https")


async def system_resolver(host: str) -> list[str]:
    """Resolve `host` to address strings with the system resolver, off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """One certificate-verifying TLS context for every loader: building one reads the whole CA bundle."""
    return httpx.create_ssl_context()  # certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR when set


@dataclass(frozen=True)
class MediaKind:
    """What is being fetched: its name in messages, the media type data URIs must declare, the byte cap's flag and
    the content part that carries it."""

    noun: str  # "image" | "video"
    bytes_flag: str  # the flag raising the byte cap
    part: str  # the content part type carrying it, e.g. "image_url"
    error: type[MediaFetchError]  # what a refused source raises (its code names the kind)


IMAGE = MediaKind("image", "--max-image-bytes", "image_url", MediaFetchError)
VIDEO = MediaKind("video", "--max-video-bytes", "video_url", VideoFetchError)
_OTHER_PART = {"image": VIDEO, "video": IMAGE}


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def too_large(max_bytes: int, param: str, kind: MediaKind = IMAGE) -> MediaFetchError:
    return kind.error(f"{kind.noun} is larger than {max_bytes} bytes ({kind.bytes_flag})", param=param)


# --- data URIs ------------------------------------------------------------------------------------------------


def decode_data_uri(url: str, max_bytes: int, param: str, kind: MediaKind = IMAGE) -> bytes:
    """The bytes of a `data:<kind>/<type>;base64,<payload>` URI, size-checked before any decoding.

    Base64 is decoded strictly (standard alphabet, padding required, no whitespace). The declared subtype is
    not trusted: the decoder sniffs the real format from the bytes.
    """
    noun = kind.noun
    comma = url.find(",")
    if comma < 0:
        raise kind.error(f"a data URI must look like data:{noun}/<type>;base64,<data>", param=param)
    media_type, *params = url[len("data:"):comma].split(";")
    declared = media_type.strip().lower()
    if not declared.startswith(f"{noun}/"):
        other = _OTHER_PART[noun]
        hint = (f"; send {_article(other.noun)} {other.noun} as a {{\"type\": \"{other.part}\"}} content part"
                if declared.startswith(f"{other.noun}/") else "")
        raise kind.error(f"a data URI must have {_article(noun)} {noun} media type, e.g. data:{noun}/"
                              f"{'png' if noun == 'image' else 'mp4'};base64,...{hint}", param=param)
    if not params or params[-1].strip().lower() != "base64":
        raise kind.error(f"a data URI {noun} must be base64-encoded (data:{noun}/<type>;base64,<data>)",
                              param=param)
    payload_len = len(url) - comma - 1
    # 4 base64 characters carry 3 bytes: refuse from the length alone, before spending time and memory decoding.
    if payload_len > 4 * -(-max_bytes // 3):
        raise too_large(max_bytes, param, kind)
    try:
        data = base64.b64decode(url[comma + 1:], validate=True)
    except ValueError:  # binascii.Error is a ValueError, and non-ASCII text raises a plain one
        raise kind.error("the data URI's base64 payload is invalid (standard alphabet with padding, "
                              "no whitespace)", param=param) from None
    if len(data) > max_bytes:
        raise too_large(max_bytes, param, kind)
    if not data:
        raise kind.error(f"the data URI holds no {noun} data", param=param)
    return data


# --- local files ------------------------------------------------------------------------------------------------


def is_local_source(url: str) -> bool:
    return (url.startswith("/") and not url.startswith("//")) or url[:5].lower() == "file:"


def read_local_file(url: str, root: Path | None, max_bytes: int, param: str, kind: MediaKind = IMAGE) -> bytes:
    """The bytes of a `file://` URL or absolute path that lies inside `root` once symlinks are resolved.

    Whatever the reason (no such file, outside the folder, a symlink leading out, a directory, a device, no
    permission) the client gets the same message, so requests cannot probe the file system.
    """
    if root is None:
        raise kind.error(f"local {kind.noun} files are not allowed; the server operator can allow a folder "
                              "with --allowed-local-media-path", param=param)
    refused = kind.error(f"the {kind.noun} path is not a readable file inside the folder allowed by "
                              "--allowed-local-media-path", param=param)
    path = url
    if url[:5].lower() == "file:":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise refused
        path = unquote(parts.path)
    if not Path(path).is_absolute():
        raise refused
    try:
        resolved = Path(path).resolve(strict=True)
        if not resolved.is_relative_to(root):
            raise refused
        # O_NOFOLLOW: the last component cannot be swapped for a symlink after the check above;
        # O_NONBLOCK: opening a FIFO must not hang a worker.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(resolved, flags)
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise refused
            if info.st_size > max_bytes:
                raise too_large(max_bytes, param, kind)
            data = handle.read(max_bytes + 1)
    except (OSError, RuntimeError, ValueError):  # missing, loops, NUL bytes, permissions: all look the same
        raise refused from None
    if len(data) > max_bytes:
        raise too_large(max_bytes, param, kind)
    return data


# --- http(s) ------------------------------------------------------------------------------------------------


class MediaFetcher:
    """Turns an image URL (data, http(s) or allowed local file) into its encoded bytes, under `MediaConfig`.

    `transport` and `resolver` are seams for tests: an httpx transport instead of real sockets, and a coroutine
    mapping a host name to address strings instead of the system resolver.
    """

    def __init__(self, config: MediaConfig, *, executor: Executor,
                 transport: httpx.AsyncBaseTransport | None = None, resolver: Resolver | None = None) -> None:
        self._config = config
        self._executor = executor
        self._resolver = resolver or system_resolver
        self._policy = HostPolicy(config.allowed_media_hosts)
        self._local_root = (Path(config.allowed_local_media_path).resolve()
                            if config.allowed_local_media_path else None)
        # NOTE: no keep-alive. httpcore pools connections by (scheme, IP, port); since we connect to IPs, a pooled
        # TLS connection made for one host name could otherwise carry a request for another name on that IP,
        # whose certificate was never checked. trust_env=False: a proxy from the environment would do its own
        # DNS lookup, undoing the address check.
        self._client = httpx.AsyncClient(
            transport=transport, verify=_tls_context(), follow_redirects=False, trust_env=False,
            timeout=httpx.Timeout(config.fetch_timeout_s),
            limits=httpx.Limits(max_keepalive_connections=0))

    async def aclose(self) -> None:
        await self._client.aclose()

    def _max_bytes(self, kind: MediaKind) -> int:
        return self._config.max_video_bytes if kind is VIDEO else self._config.max_image_bytes

    async def fetch(self, url: str, param: str, kind: MediaKind = IMAGE) -> bytes:
        """The encoded bytes behind `url`; `param` is the request field of the URL, used in errors."""
        loop = asyncio.get_running_loop()
        max_bytes = self._max_bytes(kind)
        if url[:5].lower() == "data:":
            return await loop.run_in_executor(self._executor, decode_data_uri, url, max_bytes, param, kind)
        if is_local_source(url):
            return await loop.run_in_executor(self._executor, read_local_file, url, self._local_root, max_bytes,
                                              param, kind)
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError):
            parsed = None
        if parsed is None or parsed.scheme not in _HTTP_SCHEMES:
            raise kind.error(f"{kind.part} must be an http(s) URL or a data:{kind.noun}/...;base64 URI",
                                  param=param)
        timeout = self._config.fetch_timeout_s
        try:
            return await asyncio.wait_for(self._fetch_http(parsed, param, kind), timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise kind.error(f"fetching the {kind.noun} took longer than {timeout:g} s (--fetch-timeout-s)",
                                  param=param) from None

    async def _fetch_http(self, url: httpx.URL, param: str, kind: MediaKind) -> bytes:
        """Fetch with redirects followed by hand, each target checked like the first URL."""
        for _ in range(self._config.max_redirects + 1):
            target, headers, extensions = await self._pin(url, param, kind)
            try:
                async with self._client.stream("GET", target, headers=headers, extensions=extensions) as response:
                    if response.has_redirect_location:
                        url = self._redirect_target(url, response.headers["location"], param, kind)
                        continue
                    if not response.is_success:
                        raise kind.error(f"the {kind.noun} URL answered HTTP {response.status_code}", param=param)
                    return await self._read_capped(response, param, kind)
            except httpx.TimeoutException:
                raise
            except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
                logger.debug("media fetch failed: %s", type(exc).__name__)
                raise kind.error(f"could not fetch the {kind.noun} URL (connection failed or the server's answer was "
                                      "not valid HTTP)", param=param) from None
        raise kind.error(f"the {kind.noun} URL redirected more than {self._config.max_redirects} times "
                              "(--max-redirects)", param=param)

    async def _pin(self, url: httpx.URL, param: str, kind: MediaKind) -> tuple[httpx.URL, dict[str, str], dict[str, object]]:
        """Check `url`, resolve its host once, and build a request to the checked address itself."""
        if url.userinfo:
            raise kind.error(f"{kind.noun} URLs must not carry a user name or password", param=param)
        host = url.raw_host.decode("ascii")  # the IDNA (ASCII) form, as resolvers and TLS see it
        try:
            literal = check_host_syntax(host)
            if literal is not None:
                addresses = [literal]
            else:
                addresses = await self._resolve(host, param, kind)
            address = self._policy.check(host, addresses)
        except AddressRefused as exc:
            raise kind.error(exc.reason, param=param) from None
        headers = {"Host": url.netloc.decode("ascii"), "Accept": f"{kind.noun}/*", "Accept-Encoding": "identity",
                   "User-Agent": _USER_AGENT, "Connection": "close"}
        extensions: dict[str, object] = {}
        if literal is None and url.scheme == "https":
            extensions["sni_hostname"] = host  # TLS still verifies the certificate against the name
        return url.copy_with(host=str(address)), headers, extensions

    async def _resolve(self, host: str, param: str, kind: MediaKind) -> list[IPAddress]:
        try:
            answers = await self._resolver(host)
        except (OSError, UnicodeError, ValueError):
            raise kind.error(f"the {kind.noun} URL's host name could not be resolved", param=param) from None
        addresses = [parse_ip(answer) for answer in answers]
        if any(address is None for address in addresses):
            raise kind.error(f"the {kind.noun} URL's host name could not be resolved", param=param)
        return [address for address in addresses if address is not None]

    def _redirect_target(self, url: httpx.URL, location: str, param: str, kind: MediaKind) -> httpx.URL:
        try:
            target = url.join(location)
        except (httpx.InvalidURL, ValueError, TypeError):
            target = None
        if target is None or target.scheme not in _HTTP_SCHEMES:
            raise kind.error(f"the {kind.noun} URL redirected to a location that is not an http(s) URL", param=param)
        return target

    async def _read_capped(self, response: httpx.Response, param: str, kind: MediaKind) -> bytes:
        """Read the body, stopping as soon as it passes the byte cap, whatever Content-Length said."""
        max_bytes = self._max_bytes(kind)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise too_large(max_bytes, param, kind)
        # We asked for Accept-Encoding: identity. A server that compresses anyway (one layer or several, e.g.
        # "gzip, gzip") is refused rather than decoded: decompression is how a few KB become GBs, and the cap must
        # hold for the bytes we keep, so only an uncompressed body is ever read.
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise kind.error(f"the {kind.noun} URL answered with a Content-Encoding (compression) that was not "
                                  f"asked for; serve the {kind.noun} uncompressed", param=param)
        body = bytearray()
        async for chunk in response.aiter_bytes():  # no decoder runs: only identity gets here
            body += chunk
            if len(body) > max_bytes:
                raise too_large(max_bytes, param, kind)
        if not body:
            raise kind.error(f"the {kind.noun} URL answered with an empty body", param=param)
        return bytes(body)
