"""http(s) image fetching against a canary server on 127.0.0.1: SSRF refusals, caps, redirects, deadlines.

Every refused case asserts the canary saw zero requests. Host names are resolved by a fake resolver, so nothing
here reaches a real DNS server or the internet; where a public address must be "contacted", an httpx mock
transport stands in for the network.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
import pytest

from vlmserve.config import MediaConfig
from vlmserve.errors import MediaError, MediaFetchError
from vlmserve.multimodal.loader import MediaLoader

from .canary import Canary, colour_of, png_of
from .helpers import PARAM, FakeResolver, load, load_error, ref

URL_PARAM = f"{PARAM}.url"


def canary_resolver() -> FakeResolver:
    return FakeResolver({
        "canary.test": ["127.0.0.1"],  # the allowed name of both test servers
        "evil.test": ["127.0.0.1"],  # a name an attacker points at loopback
        "localhost": ["127.0.0.1", "::1"],
        "mixed.test": ["93.184.216.34", "127.0.0.1"],  # one public and one loopback answer
        "meta.test": ["169.254.169.254"],
    })


def assert_refused(exc: BaseException, *fragments: str) -> None:
    assert isinstance(exc, MediaFetchError), repr(exc)
    assert exc.param == URL_PARAM
    for fragment in fragments:
        assert fragment in exc.message


# --- SSRF -------------------------------------------------------------------------------------------------------


def test_loopback_is_refused_without_a_request(canary: Canary) -> None:
    exc = load_error(MediaConfig(), [ref(canary.url("/image"))], resolver=canary_resolver())
    assert_refused(exc, "--allowed-media-hosts")
    assert canary.num_hits == 0


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1", "127.1", "127.0.0.1.",
                                  "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::1]", "[::127.0.0.1]",
                                  "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "0"])
def test_numeric_spellings_of_loopback_are_refused(canary: Canary, host: str) -> None:
    # 127.0.0.1 itself is allowed here, so only the spelling checks stand between these URLs and the canary.
    resolver = canary_resolver()
    config = MediaConfig(allowed_media_hosts=("127.0.0.1",))
    exc = load_error(config, [ref(canary.url("/image", host=host))], resolver=resolver)
    assert isinstance(exc, MediaFetchError) and exc.param == URL_PARAM
    assert resolver.calls == []
    assert canary.num_hits == 0


@pytest.mark.parametrize("host", ["evil.test", "localhost", "mixed.test", "meta.test"])
def test_names_resolving_to_non_public_addresses_are_refused(canary: Canary, host: str) -> None:
    resolver = canary_resolver()
    exc = load_error(MediaConfig(), [ref(canary.url("/image", host=host))], resolver=resolver)
    assert_refused(exc, "non-public", "--allowed-media-hosts")
    assert resolver.calls == [host]
    assert canary.num_hits == 0


def test_redirect_from_an_allowed_host_to_a_refused_one(canary: Canary, redirector: Canary) -> None:
    target = canary.url("/image?name=secret")
    url = redirector.url(f"/redirect?to={quote(target, safe='')}", host="canary.test")
    config = MediaConfig(allowed_media_hosts=("canary.test",))
    exc = load_error(config, [ref(url)], resolver=canary_resolver())
    assert_refused(exc, "--allowed-media-hosts")
    assert redirector.num_hits == 1
    assert canary.num_hits == 0


@pytest.mark.parametrize(("location", "message"), [
    ("file:///etc/passwd", "not an http(s) URL"),
    ("ftp://canary.test/x", "not an http(s) URL"),
    ("gopher://canary.test:70/", "not an http(s) URL"),
    # httpx itself fails to build its (unused) next request for this one, so the message is the generic one.
    ("data:image/png;base64,AAAA", "could not fetch the image URL"),
])
def test_redirect_to_another_scheme_is_refused(redirector: Canary, location: str, message: str) -> None:
    url = redirector.url(f"/redirect?to={quote(location, safe='')}", host="canary.test")
    exc = load_error(MediaConfig(allowed_media_hosts=("canary.test",)), [ref(url)], resolver=canary_resolver())
    assert_refused(exc, message)
    assert redirector.num_hits == 1


def test_allowed_host_is_fetched_at_the_checked_address(canary: Canary) -> None:
    # canary.test exists only in the fake resolver: the fetch succeeding proves no second (system) lookup.
    resolver = canary_resolver()
    config = MediaConfig(allowed_media_hosts=("canary.test",))
    [part] = load(config, [ref(canary.url("/image?name=a", host="canary.test"))], resolver=resolver)
    assert part.image.mode == "RGB" and part.image.getpixel((0, 0)) == colour_of("a")
    assert resolver.calls == ["canary.test"]
    [visit] = canary.visits
    assert visit.host == f"canary.test:{canary.port}"  # the original Host header, not the IP


def test_allowed_ip_is_fetched(canary: Canary) -> None:
    [part] = load(MediaConfig(allowed_media_hosts=("127.0.0.1",)), [ref(canary.url("/image?name=b"))])
    assert part.image.getpixel((0, 0)) == colour_of("b")
    assert canary.hits["/image?name=b"] == 1


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://127.0.0.1/", "javascript:alert(1)",
                                 "example.com/a.png", "//example.com/a.png", "http://", "http://[::1/",
                                 "HTTP://user:pw@example.com/a.png", "file://remote.host/etc/passwd",
                                 "ws://example.com/"])
def test_other_schemes_and_malformed_urls_are_refused(url: str) -> None:
    resolver = canary_resolver()
    exc = load_error(MediaConfig(), [ref(url)], resolver=resolver)
    assert isinstance(exc, MediaFetchError) and exc.param == URL_PARAM
    assert resolver.calls == []


def _mock() -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def respond(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=png_of("mock"))

    return httpx.MockTransport(respond), seen


def test_https_connects_to_the_checked_ip_with_sni_and_host() -> None:
    transport, seen = _mock()
    resolver = FakeResolver({"images.example": ["93.184.216.34"]})
    load(MediaConfig(), [ref("https://images.example/cat.png?size=large")], transport=transport, resolver=resolver)
    [request] = seen
    assert str(request.url) == "https://93.184.216.34/cat.png?size=large"
    assert request.headers["host"] == "images.example"
    assert request.extensions["sni_hostname"] == "images.example"
    assert request.headers["accept-encoding"] == "identity"


def test_dns_rebinding_cannot_swap_the_address() -> None:
    """The host is resolved once per hop; a second, different answer is never asked for nor used."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])

    class Rebinding(FakeResolver):
        async def __call__(self, host: str) -> list[str]:
            self.calls.append(host)
            return next(answers)

    resolver = Rebinding()
    transport, seen = _mock()
    load(MediaConfig(), [ref("http://rebind.example:8080/x.png")], transport=transport, resolver=resolver)
    assert resolver.calls == ["rebind.example"]
    assert [str(r.url) for r in seen] == ["http://93.184.216.34:8080/x.png"]


# --- limits -------------------------------------------------------------------------------------------------


ALLOW = MediaConfig(allowed_media_hosts=("127.0.0.1",), max_image_bytes=100_000)


@pytest.mark.parametrize("route", ["/length?size=300000", "/nolength?size=3000000", "/chunked?size=3000000"])
def test_byte_cap_while_streaming(canary: Canary, route: str) -> None:
    started = time.monotonic()
    exc = load_error(ALLOW, [ref(canary.url(route))])
    assert_refused(exc, "larger than 100000 bytes", "--max-image-bytes")
    assert time.monotonic() - started < 5


def test_byte_cap_ignores_a_lying_content_length() -> None:
    """The body is counted as it arrives: a small Content-Length does not let a huge body through."""
    consumed = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal consumed
        for _ in range(10_000):
            consumed += 1
            yield b"x" * 10_000

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": "10"}, content=body())

    resolver = FakeResolver({"liar.example": ["93.184.216.34"]})
    exc = load_error(ALLOW, [ref("http://liar.example/x")], transport=httpx.MockTransport(respond),
                     resolver=resolver)
    assert_refused(exc, "--max-image-bytes")
    assert consumed <= 11  # stopped right after the cap, not after 100 MB


@pytest.mark.parametrize("encoding", ["gzip", "gzip, gzip", "br", "deflate, identity", "x-custom"])
def test_an_encoding_we_did_not_ask_for_is_refused_unread(encoding: str) -> None:
    """Issue 11: nested compression used to be decoded on the event loop and past the byte cap."""
    import gzip

    bomb = gzip.compress(gzip.compress(b"\0" * 20_000_000))  # ~20 KB that would decode to 20 MB
    consumed = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal consumed
        for start in range(0, len(bomb), 1024):
            consumed += 1
            yield bomb[start:start + 1024]

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": encoding}, content=body())

    resolver = FakeResolver({"zip.example": ["93.184.216.34"]})
    exc = load_error(ALLOW, [ref("http://zip.example/x.png")], transport=httpx.MockTransport(respond),
                     resolver=resolver)
    assert_refused(exc, "Content-Encoding")
    assert consumed == 0


def test_redirects_are_bounded(canary: Canary) -> None:
    config = MediaConfig(allowed_media_hosts=("127.0.0.1",), max_redirects=3)
    [part] = load(config, [ref(canary.url("/chain/3"))])
    assert part.image.getpixel((0, 0)) == colour_of("chain")
    visits_before = canary.num_hits
    exc = load_error(config, [ref(canary.url("/chain/4"))])
    assert_refused(exc, "more than 3 times", "--max-redirects")
    assert canary.num_hits - visits_before == 4  # /chain/4 .. /chain/1; the image at /chain/0 never requested
    assert canary.hits["/chain/0"] == 1


def test_no_redirects_when_max_redirects_is_zero(canary: Canary) -> None:
    config = MediaConfig(allowed_media_hosts=("127.0.0.1",), max_redirects=0)
    assert_refused(load_error(config, [ref(canary.url("/chain/1"))]), "--max-redirects")
    assert canary.hits["/chain/0"] == 0


@pytest.mark.parametrize("route", ["/slow?delay=5", "/trickle?seconds=5"])
def test_total_deadline(canary: Canary, route: str) -> None:
    """A server that answers late, or trickles bytes fast enough to dodge a per-read timeout, still hits it."""
    config = MediaConfig(allowed_media_hosts=("127.0.0.1",), fetch_timeout_s=0.5)
    started = time.monotonic()
    exc = load_error(config, [ref(canary.url(route))])
    elapsed = time.monotonic() - started
    assert_refused(exc, "longer than 0.5 s", "--fetch-timeout-s")
    assert 0.4 < elapsed < 3


def test_deadline_covers_redirects() -> None:
    async def respond(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.15)
        return httpx.Response(302, headers={"Location": f"/hop{len(request.url.path)}"})

    config = MediaConfig(fetch_timeout_s=0.4, max_redirects=10)
    resolver = FakeResolver({"slow.example": ["93.184.216.34"]})
    exc = load_error(config, [ref("http://slow.example/")], transport=httpx.MockTransport(respond),
                     resolver=resolver)
    assert_refused(exc, "--fetch-timeout-s")


@pytest.mark.parametrize("code", [404, 500, 204, 304])
def test_non_success_status(canary: Canary, code: int) -> None:
    exc = load_error(ALLOW, [ref(canary.url(f"/status?code={code}"))])
    assert isinstance(exc, MediaFetchError) and exc.param == URL_PARAM
    assert str(code) in exc.message or "empty body" in exc.message


def test_connection_refused_is_a_clean_error() -> None:
    with Canary() as closed:
        port = closed.port
    exc = load_error(ALLOW, [ref(f"http://127.0.0.1:{port}/image")])
    assert_refused(exc, "could not fetch")
    assert "Errno" not in exc.message and "127.0.0.1" not in exc.message


def test_a_body_that_is_not_an_image(canary: Canary) -> None:
    exc = load_error(ALLOW, [ref(canary.url("/text"))])
    assert type(exc) is MediaError
    assert exc.param == PARAM and "not an image" in exc.message


def test_aclose_releases_the_loader() -> None:
    async def main() -> None:
        loader = MediaLoader(MediaConfig())
        await loader.aclose()

    asyncio.run(main())


def test_system_resolver_is_checked_too(canary: Canary) -> None:
    """With the default resolver (getaddrinfo off the loop; 'localhost' comes from the hosts file)."""

    async def main() -> BaseException:
        loader = MediaLoader(MediaConfig())
        try:
            await loader.load([ref(canary.url("/image", host="localhost"))])
        except MediaFetchError as exc:
            return exc
        finally:
            await loader.aclose()
        raise AssertionError("localhost was fetched")

    assert_refused(asyncio.run(main()), "non-public")
    assert canary.num_hits == 0
