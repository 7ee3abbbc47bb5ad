"""The playground's routes through the real app and middleware: public static files with a strict CSP, API calls
still keyed, exact public paths only, the demo's sample image, and --no-playground."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from vlmserve.api.app import build_app
from vlmserve.api.serving_playground import CONTENT_SECURITY_POLICY
from vlmserve.cli import build_parser, config_from_args
from vlmserve.config import Config, MediaConfig, ServerConfig
from vlmserve.demo.shapes import draw_sample_image
from vlmserve.multimodal.loader import MediaLoader
from vlmserve.types import EngineStats

KEY = "sk-playground"


class IdleEngine:
    """Enough of an EngineClient for routes that never generate."""

    max_model_len = 64
    is_dead = False

    def stats(self) -> EngineStats:
        return EngineStats()


def client_for(server: ServerConfig) -> Iterator[TestClient]:
    config = Config(media=MediaConfig(num_media_workers=1), server=server)
    app = build_app(IdleEngine(), None, MediaLoader(config.media), config,  # type: ignore[arg-type]
                    ("demo",))
    # a Host the loopback allow-list accepts (TestClient's default, "testserver", is refused like any other name)
    with TestClient(app, base_url=f"http://127.0.0.1:{server.port}", follow_redirects=False) as client:
        yield client


@pytest.fixture
def keyed() -> Iterator[TestClient]:
    yield from client_for(ServerConfig(api_key=(KEY,)))


def test_page_and_its_files_load_without_a_key_and_carry_the_csp(keyed: TestClient) -> None:
    page = keyed.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "script-src 'self'" in CONTENT_SECURITY_POLICY
    for name, kind in (("app.js", "text/javascript"), ("api.js", "text/javascript"),
                       ("playground.css", "text/css")):
        response = keyed.get(f"/playground/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind), name
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
    index = keyed.get("/")
    assert index.status_code == 307 and index.headers["location"] == "playground"


def test_the_page_holds_no_inline_script_and_no_outside_url(keyed: TestClient) -> None:
    html = keyed.get("/playground").text
    assert "<script>" not in html and "onclick" not in html.lower() and "style=" not in html
    for name in ("index.html", "app.js", "api.js", "attachments.js", "conversation.js", "panels.js", "playground.css"):
        text = keyed.get("/playground" if name == "index.html" else f"/playground/{name}").text
        assert "http://" not in text and "https://" not in text, name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "eval(" not in text, name


def test_api_calls_still_need_the_key(keyed: TestClient) -> None:
    assert keyed.get("/v1/models").status_code == 401
    assert keyed.get("/stats").status_code == 401
    assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    # only the exact static paths are public, and only for reading
    for path in ("/playground/../v1/models", "/playground/app.js/", "/PLAYGROUND", "/playground/missing.js"):
        assert keyed.get(path).status_code == 401, path
    assert keyed.post("/playground").status_code == 401


def test_unknown_files_are_an_openai_404(keyed: TestClient) -> None:
    response = keyed.get("/playground/missing.js", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_sample_image_is_the_demo_scene_of_its_seed(keyed: TestClient) -> None:
    response = keyed.get("/playground/sample.png", params={"seed": 42})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    served = Image.open(io.BytesIO(response.content)).convert("RGB")
    assert served.tobytes() == draw_sample_image(42).tobytes()
    bad = keyed.get("/playground/sample.png", params={"seed": -1})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_no_playground_flag_turns_every_route_off() -> None:
    config = config_from_args(build_parser().parse_args(["serve", "--no-playground"]))
    assert config.server.enable_playground is False
    assert config_from_args(build_parser().parse_args(["serve"])).server.enable_playground is True
    for client in client_for(config.server):
        for path in ("/", "/playground", "/playground/app.js", "/playground/sample.png"):
            response: Any = client.get(path)
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", path


def test_page_obeys_the_cors_settings() -> None:
    for client in client_for(ServerConfig(api_key=(KEY,), allowed_origins=("https://app.example",))):
        allowed = client.get("/playground/app.js", headers={"Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = client.get("/playground/app.js", headers={"Origin": "https://elsewhere.example"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
