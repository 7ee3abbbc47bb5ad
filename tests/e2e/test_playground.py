"""The playground page in a real browser (Debian's Chromium driven by Playwright) against a real `vlmserve serve`.

One server: the demo model with an API key (the page must ask for it), started through a launcher
(tests/e2e/playground_launcher.py) whose sampler follows a script only when the user's turn holds a trigger word,
so an answer can hold markup or be long enough to stop; every other question is answered by the model itself, and
those answers are checked against the drawn scene's truth. Every test records the browser's requests: all go to the
server under test.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright import sync_api  # a test dependency: missing, it fails rather than skips

from tests.conftest import REPO, ServerProcess
from vlmserve.demo.shapes import (
    Scene,
    answer_question,
    draw_sample_image,
    encode,
    is_correct,
    random_scene,
    render,
)

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"needs Debian's Chromium at {CHROMIUM} (apt-get install chromium)")

API_KEY = "sk-playground-test"
MARKUP = "<img src=x onerror=\"document.title='pwned'\"> <b>bold</b> & <script>document.title='pwned'</script>"
LONG = "a long tail " * 600
SCRIPTS = {"[markup]": MARKUP, "[long]": LONG}  # trigger in the user's turn -> the answer the launcher scripts
EVIL_NAME = "<img src=y onerror=\"document.title='pwned'\">.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# NOTE: screenshots go to docs/ (the README shows them) only when asked for, so a test run leaves the tree as it
# was: VLMSERVE_UPDATE_SCREENSHOTS=1 python -m pytest tests/e2e/test_playground.py
DOCS = (REPO / "docs" if os.environ.get("VLMSERVE_UPDATE_SCREENSHOTS")
        else Path(tempfile.gettempdir()) / "vlmserve-playground-shots")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    DOCS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def demo(start_server: type[ServerProcess]) -> ServerProcess:
    return start_server(["--api-key", API_KEY],
                        program=[sys.executable, str(Path(__file__).with_name("playground_launcher.py"))],
                        env={"PYTHONPATH": str(REPO), "VLMSERVE_TEST_SCRIPTS": json.dumps(SCRIPTS)})


class Page:
    """A fresh browser context on the playground of `server`, recording every request and page error."""

    def __init__(self, browser: Any, server: ServerProcess) -> None:
        self.server = server
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.requests: list[Any] = []
        self.errors: list[str] = []
        self.context.on("request", lambda request: self.requests.append(request))
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        # A request the CSP blocks never shows as a request: the console is where it would show.
        self.page.on("console", lambda message: self.errors.append(message.text)
                     if "Content Security Policy" in message.text else None)
        self.page.goto(server.base_url + "/")  # the index redirects to the page

    def check_every_request_was_local(self) -> None:
        outside = [r.url for r in self.requests
                   if not r.url.startswith(("data:", "blob:")) and not r.url.startswith(self.server.base_url + "/")]
        assert not outside, outside
        assert not self.errors, self.errors

    def chat_bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.post_data) for r in self.requests if r.url.endswith("/v1/chat/completions")]

    def ask(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def answer(self, index: int, state: str = "done", timeout_ms: float = 60_000) -> Any:
        answer = self.page.locator(".msg.assistant").nth(index)
        sync_api.expect(answer).to_have_attribute("data-state", state, timeout=timeout_ms)
        return answer


    def enter_key(self) -> None:
        self.page.fill("#api-key", API_KEY)
        self.page.press("#api-key", "Enter")  # submits the key form
        sync_api.expect(self.page.locator("#model option")).to_have_text(["vlmserve-demo"])


@pytest.fixture
def demo_page(browser: Any, demo: ServerProcess) -> Iterator[Page]:
    page = Page(browser, demo)
    yield page
    page.context.close()


def counting_scene() -> Scene:
    # NOTE: a fixed scene, so the (greedy) answer is deterministic; the demo model counts 100 % right in its
    # evaluation, and the assertions compare with the scene's truth, not with a recorded answer.
    return random_scene(random.Random(17), num_shapes=3)


def png_file(name: str, scene: Scene) -> dict[str, Any]:
    return {"name": name, "mimeType": "image/png", "buffer": encode(render(scene))}


def test_keyed_server_asks_for_the_key_then_answers_an_uploaded_image_over_two_turns(demo_page: Page) -> None:
    page = demo_page.page
    sync_api.expect(page.locator("#key-panel")).to_be_visible()
    sync_api.expect(page.locator("#error")).to_contain_text("needs an API key")
    sync_api.expect(page.locator("#error")).to_contain_text("--api-key")  # the server's own message
    page.screenshot(path=str(DOCS / "playground-key.png"))
    demo_page.enter_key()
    sync_api.expect(page.locator("#error")).to_be_hidden()

    scene = counting_scene()
    page.set_input_files("#file-input", [png_file("three shapes.png", scene)])
    sync_api.expect(page.locator("#attachments figure")).to_have_count(1)
    demo_page.ask("How many shapes are there?")
    first = demo_page.answer(0)
    assert first.locator(".text").text_content() == answer_question(scene, "How many shapes are there?") == "3."
    sync_api.expect(page.locator(".msg.user .thumbs img")).to_have_count(1)
    stats = first.locator(".stats").text_content()
    image_tokens = chat_usage(demo_page.server, scene)["prompt_tokens_details"]["image_tokens"]
    assert image_tokens > 0 and f"({image_tokens} image," in stats and "first token" in stats, stats

    demo_page.ask("Describe the image.")  # no new image: the answer must come from the first turn's
    second = demo_page.answer(1)
    truth = answer_question(scene, "Describe the image.")
    assert is_correct(second.locator(".text").text_content(), truth, 7), (second.text_content(), truth)
    bodies = demo_page.chat_bodies()
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[1]["messages"][1]["content"] == "3." and bodies[1]["stream_options"] == {"include_usage": True}
    page.screenshot(path=str(DOCS / "playground.png"))

    page.fill("#max-tokens", "100000")  # beyond the context window: the server's message, readable
    demo_page.ask("How many shapes are there?")
    demo_page.answer(2, state="error")
    sync_api.expect(page.locator("#error")).to_contain_text("max_tokens")
    assert page.input_value("#prompt") == "How many shapes are there?"  # back in the composer to fix and resend
    demo_page.check_every_request_was_local()


def chat_usage(server: ServerProcess, scene: Scene) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(encode(render(scene))).decode()
    body = {"model": "vlmserve-demo", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url, "detail": "auto"}},
        {"type": "text", "text": "How many shapes are there?"}]}]}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    usage: dict[str, Any] = response.raise_for_status().json()["usage"]
    return usage


def test_sample_button_attaches_the_demo_scene_of_its_seed(demo_page: Page) -> None:
    page = demo_page.page
    demo_page.enter_key()
    page.click("#sample")
    thumb = page.locator("#attachments figure")
    sync_api.expect(thumb).to_have_count(1)
    name = thumb.locator("figcaption").text_content()
    assert name.startswith("sample-") and name.endswith(".png")
    seed = int(name[len("sample-"):-len(".png")])
    data_url = thumb.locator("img").get_attribute("src")
    assert data_url.startswith("data:image/png;base64,")
    from PIL import Image

    shown = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")
    assert shown.tobytes() == draw_sample_image(seed).tobytes()
    demo_page.check_every_request_was_local()


def test_markup_in_an_answer_or_a_file_name_renders_as_text(demo_page: Page) -> None:
    page = demo_page.page
    demo_page.enter_key()
    title = page.title()
    attach_three_ways(page)
    sync_api.expect(page.locator("#attachments figure")).to_have_count(3)
    demo_page.ask("Say something [markup]")
    answer = demo_page.answer(0)
    assert answer.locator(".text").text_content() == MARKUP
    assert "finish: stop" in answer.locator(".stats").text_content()
    assert answer.locator("img, b, script").count() == 0
    captions = page.locator(".msg.user figcaption").all_text_contents()
    assert captions == [EVIL_NAME, "dropped.png", "pasted.png"]
    assert page.locator("img[src='x'], img[src='y']").count() == 0 and page.title() == title
    body = demo_page.chat_bodies()[0]
    assert [part["type"] for part in body["messages"][0]["content"]] == ["image_url"] * 3 + ["text"]
    assert not [r.url for r in demo_page.requests if r.url.endswith(("/x", "/y"))]
    demo_page.check_every_request_was_local()


_DISPATCH_FILE = """([png, name, kind]) => {
    const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, { type: "image/png" }));
    const init = { bubbles: true, cancelable: true };
    const event = kind === "drop" ? new DragEvent("drop", { ...init, dataTransfer: transfer })
                                  : new ClipboardEvent("paste", { ...init, clipboardData: transfer });
    document.getElementById("prompt").dispatchEvent(event);
}"""


def attach_three_ways(page: Any) -> None:
    """One image through the file picker (with a name made of markup), one dropped, one pasted."""
    page.set_input_files("#file-input", [png_file(EVIL_NAME, counting_scene())])
    sync_api.expect(page.locator("#attachments figure")).to_have_count(1)
    png = base64.b64encode(encode(render(counting_scene()))).decode()
    page.evaluate(_DISPATCH_FILE, [png, "dropped.png", "drop"])
    sync_api.expect(page.locator("#attachments figure")).to_have_count(2)
    page.evaluate(_DISPATCH_FILE, [png, "pasted.png", "paste"])


def test_stop_aborts_the_request_in_the_engine(demo_page: Page) -> None:
    page = demo_page.page
    stats_url = f"{demo_page.server.base_url}/stats"
    key = {"Authorization": f"Bearer {API_KEY}"}
    before = httpx.get(stats_url, headers=key).json()
    demo_page.enter_key()
    page.fill("#max-tokens", "4000")  # the script is ~1,800 tokens at 20 ms a step: about a minute unless stopped
    demo_page.ask("Talk for a long time [long]")
    answer = demo_page.answer(0, state="streaming")
    sync_api.expect(answer.locator(".text")).to_contain_text("long tail")
    page.click("#stop")
    demo_page.answer(0, state="stopped", timeout_ms=10_000)
    shown = answer.locator(".text").text_content()
    assert LONG.startswith(shown) and len(shown) < len(LONG)
    after = wait_for_stats(stats_url, key,
                           lambda s: s["num_aborted"] > before["num_aborted"] and s["num_running"] == 0)
    assert after["num_aborted"] == before["num_aborted"] + 1 and after["num_finished"] == before["num_finished"]
    assert after["num_generated_tokens"] - before["num_generated_tokens"] < 1000

    page.click("#new-chat")  # the stopped turn stays behind: the next request starts a new conversation
    sync_api.expect(page.locator(".msg")).to_have_count(0)
    demo_page.ask("Once more [markup]")
    demo_page.answer(0)
    first_turn, next_turn = demo_page.chat_bodies()
    assert [m["role"] for m in first_turn["messages"]] == ["user"] == [m["role"] for m in next_turn["messages"]]
    demo_page.check_every_request_was_local()


def wait_for_stats(url: str, headers: dict[str, str], ready: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats: dict[str, Any] = httpx.get(url, headers=headers).json()
        if ready(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


COUNT_TOOL = [{"type": "function", "function": {"name": "count_shapes", "description": "Count shapes of a colour",
                                                "parameters": {"type": "object", "properties": {
                                                    "colour": {"type": "string", "enum": ["red", "green"]}},
                                                    "required": ["colour"], "additionalProperties": False}}}]


def test_tools_panel_streams_a_call_card_and_sends_the_result_back(demo_page: Page) -> None:
    """tool_choice naming the function: the server's grammar makes even the demo model call it, so the card's
    content is known in shape (a colour of the enum) whatever the weights say."""
    page = demo_page.page
    demo_page.enter_key()
    page.click("#tools-panel summary")
    page.fill("#tools-json", json.dumps(COUNT_TOOL))
    page.select_option("#tool-choice", "function:count_shapes")
    demo_page.ask("How many red shapes are there?")
    answer = demo_page.answer(0)
    card = answer.locator(".tool-call")
    sync_api.expect(card).to_have_count(1)
    assert card.locator(".tool-name").text_content() == "count_shapes"
    shown = card.locator(".tool-args").text_content()
    arguments = json.loads(shown)
    assert arguments["colour"] in ("red", "green") and shown == json.dumps(arguments, indent=2)  # pretty-printed
    assert "finish: tool_calls" in answer.locator(".stats").text_content()
    first = demo_page.chat_bodies()[0]
    assert first["tools"] == COUNT_TOOL
    assert first["tool_choice"] == {"type": "function", "function": {"name": "count_shapes"}}
    page.screenshot(path=str(DOCS / "playground-tools.png"))

    page.select_option("#tool-choice", "none")  # the model answers in words after the result
    answer.locator(".tool-result").fill("2")
    answer.locator(".send-tool-results").click()
    demo_page.answer(1)
    second = demo_page.chat_bodies()[1]
    user, assistant, tool = second["messages"]
    call = assistant["tool_calls"][0]
    assert user["role"] == "user" and assistant["role"] == "assistant" and assistant["content"] is None
    assert call["type"] == "function" and call["id"] and call["function"]["name"] == "count_shapes"
    assert json.loads(call["function"]["arguments"]) == arguments
    assert tool == {"role": "tool", "tool_call_id": call["id"], "content": "2"}
    assert second["tool_choice"] == "none"
    demo_page.check_every_request_was_local()


def test_json_schema_panel_gets_an_answer_that_parses_and_validates(demo_page: Page) -> None:
    import jsonschema

    schema = {"type": "object", "properties": {"shape": {"type": "string", "enum": ["circle", "square"]},
                                               "colour": {"type": "string", "enum": ["red", "blue"]}},
              "required": ["shape", "colour"], "additionalProperties": False}
    page = demo_page.page
    demo_page.enter_key()
    page.click("#format-panel summary")
    page.select_option("#format-kind", "json_schema")
    page.fill("#schema-json", json.dumps(schema))
    demo_page.ask("Which shape is it?")
    answer = demo_page.answer(0)
    sync_api.expect(answer).to_have_attribute("data-json", "valid")
    shown = answer.locator("pre.json").text_content()
    parsed = json.loads(shown)
    jsonschema.validate(parsed, schema)
    assert shown == json.dumps(parsed, indent=2)
    body = demo_page.chat_bodies()[0]
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "playground", "schema": schema, "strict": True}}
    demo_page.check_every_request_was_local()


@pytest.mark.parametrize(("panel", "text", "message"), [
    ("tools", '[{"type": "function", "function": {"name": "f"}', "Tools is not valid JSON"),
    ("tools", '{"type": "function"}', "Tools must be a non-empty JSON array"),
    ("tools", '[{"type": "function", "function": {"name": "bad name"}}]', "tools[0].function.name"),
    ("format", '{"type": "object",', "JSON schema is not valid JSON"),
    ("format", "[1, 2]", "JSON schema must be a JSON object"),
])
def test_invalid_json_in_a_panel_shows_an_error_and_sends_nothing(demo_page: Page, panel: str, text: str,
                                                                  message: str) -> None:
    page = demo_page.page
    demo_page.enter_key()
    if panel == "tools":
        page.click("#tools-panel summary")
        page.fill("#tools-json", text)
    else:
        page.click("#format-panel summary")
        page.select_option("#format-kind", "json_schema")
        page.fill("#schema-json", text)
    demo_page.ask("How many shapes are there?")
    sync_api.expect(page.locator(f"#{panel}-error")).to_contain_text(message)
    sync_api.expect(page.locator("#error")).to_contain_text(message)
    page.wait_for_timeout(300)  # a request the page wrongly made would have left by now
    assert demo_page.chat_bodies() == [] and page.locator(".msg").count() == 0
    assert page.input_value("#prompt") == "How many shapes are there?"  # kept, to send once fixed
    demo_page.check_every_request_was_local()
