"""API keys and CORS (issue 6): every route but GET/HEAD /health needs a key; no spelling of a path, method or
header gets around it; CORS is off unless --allowed-origins, and then serves that origin only."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.e2e.hardening_support import (
    FILE_KEY,
    KEYS,
    ORIGIN,
    assert_no_leak,
    assert_openai_error,
    assert_serves,
    chat_body,
    hardened_server,
    parse_raw,
    post_chat,
    raw_http,
    raw_request,
)

GOOD = f"Authorization: Bearer {KEYS[0]}"


@pytest.fixture(scope="module")
def hardened(start_server: type[ServerProcess], tiny_qwen2_vl: Path,
             tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    return hardened_server(start_server, tiny_qwen2_vl, tmp_path_factory.mktemp("keys"))


def assert_refused(server: ServerProcess, method: str, path: str, headers: tuple[str, ...] = ()) -> None:
    status, response_headers, body = parse_raw(raw_http(server, raw_request(method, path, headers)))
    assert status == 401, (method, path, headers, status, body[:300])
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert response_headers["content-type"] == "application/json"


@pytest.mark.parametrize("key", [*KEYS, FILE_KEY], ids=["first-key", "second-key", "key-file"])
def test_every_configured_key_is_accepted(hardened: ServerProcess, key: str) -> None:
    response = post_chat(hardened, chat_body(), {"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    models = httpx.get(f"{hardened.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert models.status_code == 200


def test_every_route_but_health_needs_a_key(hardened: ServerProcess) -> None:
    document = httpx.get(f"{hardened.base_url}/openapi.json", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()
    operations = [(method.upper(), path.replace("{model_id}", "tiny"))
                  for path, methods in document["paths"].items() for method in methods]
    assert ("POST", "/v1/chat/completions") in operations and len(operations) >= 6
    extra = [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/docs/oauth2-redirect"),
             ("GET", "/no/such/route")]
    for method, path in operations + extra:
        if path == "/health":
            continue
        for headers in [(), ("Authorization: Bearer sk-wrong",)]:
            assert_refused(hardened, method, path, headers)
    for method in ("GET", "HEAD"):
        status, _, _ = parse_raw(raw_http(hardened, raw_request(method, "/health")))
        assert status == 200
    assert_serves(hardened)


@pytest.mark.parametrize("path", ["//v1/models", "/v1//models", "/v1/models/", "/V1/MODELS", "/%761/models",
                                  "/v1%2Fmodels", "/v1/./models", "/v1/../v1/models", "/health/", "//health",
                                  "/HEALTH", "/health%2F", "/health/../v1/models", "/health%2F..%2Fstats",
                                  "/v1/models/..%2F..%2Fstats", "/stats?/health", "/stats#/health"])
def test_no_path_spelling_skips_authentication(hardened: ServerProcess, path: str) -> None:
    assert_refused(hardened, "GET", path)


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "TRACE", "PROPFIND", "get"])
def test_no_method_skips_authentication(hardened: ServerProcess, method: str) -> None:
    for path in ("/v1/models", "/v1/chat/completions", "/stats"):
        status, _, _ = parse_raw(raw_http(hardened, raw_request(method, path)))
        assert status in (400, 401), (method, path, status)  # 400: h11 refuses a lower-case method itself


@pytest.mark.parametrize(("headers", "accepted"), [
    ((f"Authorization: bearer {KEYS[0]}",), True),  # the scheme is case-insensitive (RFC 9110)
    ((f"Authorization: BEARER {KEYS[0]}",), True),
    ((f"authorization: Bearer {KEYS[0]}",), True),  # header names are case-insensitive
    ((f"Authorization:    Bearer {KEYS[0]}   ",), True),  # optional whitespace around the value
    ((f"Authorization: Bearer  {KEYS[0]}",), True),
    ((f"Authorization: Bearer {KEYS[0]}x",), False),
    ((f"Authorization: Bearer {KEYS[0][:-1]}",), False),
    ((f"Authorization: Bearer {KEYS[0].upper()}",), False),  # keys themselves are case-sensitive
    ((f"Authorization: Bearer {KEYS[0]},{KEYS[1]}",), False),
    ((f"Authorization: {KEYS[0]}",), False),
    ((f"Authorization: Basic {KEYS[0]}",), False),
    (("Authorization: Bearer",), False),
    (("Authorization: Bearer ",), False),
    ((f"X-Api-Key: {KEYS[0]}",), False),
    ((f"Authorization: Bearer {KEYS[0]}", "Authorization: Bearer sk-wrong"), False),  # two headers: ambiguous
    (("Authorization: Bearer sk-wrong", f"Authorization: Bearer {KEYS[0]}"), False),
    ((f"Authorization: Bearer {KEYS[0]}", f"Authorization: Bearer {KEYS[1]}"), False),
])
def test_authorization_header_spellings(hardened: ServerProcess, headers: tuple[str, ...], accepted: bool) -> None:
    if accepted:
        status, _, body = parse_raw(raw_http(hardened, raw_request("GET", "/v1/models", headers)))
        assert status == 200, body
    else:
        assert_refused(hardened, "GET", "/v1/models", headers)


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmserve.api import middleware

    compared: list[tuple[bytes, bytes]] = []
    real = middleware.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    guard = middleware.APIKeyMiddleware(app=None, keys=("key-a", "key-b", "key-c"))  # type: ignore[arg-type]
    assert guard._match(b"Bearer key-a") == 0
    assert compared == [(b"key-a", b"key-a"), (b"key-a", b"key-b"), (b"key-a", b"key-c")]  # no early exit
    compared.clear()
    assert guard._match(b"Bearer nope") is None
    assert len(compared) == 3


def test_refusals_leak_nothing_and_the_server_keeps_serving(hardened: ServerProcess) -> None:
    response = post_chat(hardened, chat_body(), {"Authorization": "Bearer sk-wrong"})
    error = assert_openai_error(response, 401, code="invalid_api_key")
    assert all(key not in response.text for key in (*KEYS, FILE_KEY, "sk-wrong"))
    assert "--api-key" in error["message"]
    assert_serves(hardened)


# --- CORS ---------------------------------------------------------------------------------------------------------


def preflight(server: ServerProcess, origin: str) -> tuple[int, dict[str, str], bytes]:
    return parse_raw(raw_http(server, raw_request("OPTIONS", "/v1/chat/completions", (
        f"Origin: {origin}", "Access-Control-Request-Method: POST",
        "Access-Control-Request-Headers: authorization, content-type"))))


def test_cors_is_off_without_allowed_origins(server: ServerProcess) -> None:
    # `server` is the default-configuration e2e server (no --allowed-origins)
    from tests.e2e.conftest import API_KEY

    status, headers, _ = preflight(server, ORIGIN)
    assert status == 401 and "access-control-allow-origin" not in headers  # a preflight is just an OPTIONS
    simple = httpx.get(f"{server.base_url}/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {API_KEY}"})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_cors_preflight_and_simple_requests_for_the_allowed_origin_only(hardened: ServerProcess) -> None:
    status, headers, _ = preflight(hardened, ORIGIN)
    assert status == 200
    assert headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"].lower()

    status, headers, body = preflight(hardened, "https://evil.example")
    assert status == 400 and "access-control-allow-origin" not in headers
    error = json.loads(body)["error"]
    assert error["code"] == "cors_not_allowed" and set(error) == {"message", "type", "param", "code"}
    assert_no_leak(body.decode())

    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    allowed = httpx.get(f"{hardened.base_url}/v1/models", headers={**auth, "Origin": ORIGIN})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{hardened.base_url}/v1/models", headers={**auth, "Origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    # the browser of the allowed origin can read why it was refused; the key is still required
    refused = httpx.get(f"{hardened.base_url}/v1/models", headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    assert_serves(hardened)
