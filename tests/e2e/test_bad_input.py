"""Bad input gets the right status and an OpenAI error body naming the field; the server keeps serving."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, data_uri, png_bytes
from tests.e2e.conftest import API_KEY, MODEL

GOOD_IMAGE = data_uri(png_bytes((10, 200, 30)))


def body(**overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model": MODEL, "max_tokens": 2, "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": GOOD_IMAGE}},
                                                   {"type": "text", "text": "Hi"}]}]}
    request.update(overrides)
    return request


def image_request(url: str) -> dict[str, Any]:
    return body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])


# (case id, raw body or JSON-able object, headers override, status, param, code)
CASES: list[tuple[str, Any, dict[str, str] | None, int, str | None, str | None]] = [
    ("malformed-json", b'{"model": "tiny-qwen", "messages": [', None, 400, None, "invalid_request"),
    ("non-object-body", [1, 2, 3], None, 400, None, "invalid_request"),
    ("missing-messages", {"model": MODEL}, None, 400, "messages", "invalid_request"),
    ("empty-messages", body(messages=[]), None, 400, "messages", "invalid_request"),
    ("unknown-part-type", body(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     None, 400, "messages[0].content[0].type", "invalid_request"),
    ("image-url-not-a-url", image_request("not a url at all"), None, 400, "messages[0].content[0].image_url.url",
     "invalid_image_url"),
    ("invalid-base64", image_request("data:image/png;base64,@@@not-base64@@@"), None, 400,
     "messages[0].content[0].image_url.url", "invalid_image_url"),
    ("loopback-not-allowed", image_request("http://127.0.0.2:9/secret.png"), None, 400,
     "messages[0].content[0].image_url.url", "invalid_image_url"),
    ("localhost-name-not-allowed", image_request("http://localhost:9/secret.png"), None, 400,
     "messages[0].content[0].image_url.url", "invalid_image_url"),
    ("not-an-image", image_request(data_uri(b"definitely not an image", "image/png")), None, 400,
     "messages[0].content[0].image_url", "invalid_image"),
    ("unknown-model", body(model="gpt-9"), None, 404, "model", "model_not_found"),
    ("negative-temperature", body(temperature=-1), None, 400, "temperature", "invalid_request"),
    ("absurd-n", body(n=1_000_000), None, 400, "n", "invalid_request"),
    ("zero-max-tokens", body(max_tokens=0), None, 400, "max_tokens", "invalid_request"),
    ("max-tokens-beyond-context", body(max_tokens=10**7), None, 400, "max_tokens", "context_length_exceeded"),
    ("top-logprobs-without-logprobs", body(top_logprobs=3), None, 400, None, "invalid_request"),
    ("request-chat-template-refused", body(chat_template="{{ messages }}"), None, 400, "chat_template",
     "invalid_request"),
    # the tiny Qwen2-VL serves Qwen2-VL's template, which has no tools section (Qwen2.5-VL's tokenizer one has)
    ("tools-template-cannot-render", body(tools=[{"type": "function", "function": {"name": "f"}}]), None, 400,
     "tools", "unsupported"),
    ("legacy-functions-not-ignored", body(functions=[{"name": "f"}]), None, 400, "tools", "unsupported"),
    ("tool-choice-without-tools", body(tool_choice="required"), None, 400, "tool_choice", "invalid_request"),
    ("wrong-api-key", body(), {"Authorization": "Bearer sk-wrong"}, 401, None, "invalid_api_key"),
    ("missing-api-key", body(), {}, 401, None, "invalid_api_key"),
]


def post(server: ServerProcess, payload: Any, headers: dict[str, str] | None) -> httpx.Response:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    sent_headers = {"Authorization": f"Bearer {API_KEY}"} if headers is None else headers
    return httpx.post(f"{server.base_url}/v1/chat/completions", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **sent_headers})


def assert_openai_error(response: httpx.Response, status: int, param: str | None, code: str | None) -> None:
    assert response.status_code == status, response.text
    data = response.json()
    assert set(data) == {"error"}, data
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param, error
    assert error["code"] == code, error
    assert "Traceback" not in response.text and "0x" not in error["message"]


@pytest.mark.parametrize(("payload", "headers", "status", "param", "code"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_then_next_request_works(server: ServerProcess, payload: Any, headers: dict[str, str] | None,
                                           status: int, param: str | None, code: str | None) -> None:
    assert_openai_error(post(server, payload, headers), status, param, code)
    follow_up = post(server, body(), None)
    assert follow_up.status_code == 200, follow_up.text
    assert follow_up.json()["choices"][0]["message"]["role"] == "assistant"


def test_unknown_route_is_openai_404(server: ServerProcess) -> None:
    response = httpx.get(f"{server.base_url}/v1/nope", headers={"Authorization": f"Bearer {API_KEY}"})
    assert_openai_error(response, 404, None, "not_found")


def test_health_needs_no_key_and_version_does(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.base_url}/version").status_code == 401
    version = httpx.get(f"{server.base_url}/version", headers={"Authorization": f"Bearer {API_KEY}"})
    assert version.status_code == 200 and version.json()["version"]
