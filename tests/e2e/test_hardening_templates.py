"""Chat templates (issue 6): a request's template is refused unless --trust-request-chat-template; a trusted one
still renders in the sandbox with bounded output; nothing a template or a message does can take the engine down."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.e2e.conftest import API_KEY
from tests.e2e.conftest import MODEL as DEFAULT_MODEL
from tests.e2e.hardening_support import (
    assert_openai_error,
    assert_serves,
    chat_body,
    hardened_server,
    post_chat,
    small_image,
)

DEFAULT_HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def trusting(start_server: type[ServerProcess], tiny_qwen2_vl: Path,
             tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    return hardened_server(start_server, tiny_qwen2_vl, tmp_path_factory.mktemp("keys"))


def test_request_template_refused_by_default(server: ServerProcess) -> None:
    body = chat_body(chat_template="{{ messages[0]['content'] }}", model=DEFAULT_MODEL)
    error = assert_openai_error(post_chat(server, body, DEFAULT_HEADERS), 400, param="chat_template")
    assert "--trust-request-chat-template" in error["message"]
    assert_serves(server, DEFAULT_HEADERS, model=DEFAULT_MODEL)


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__['__builtins__'] }}",
    "{{ messages.pop() }}",  # the immutable sandbox forbids mutating what it was given
    "{% set x = messages.append(1) %}x",
    "{{ (messages|first).update({'role': 'system'}) }}",
    "{{ self.__init__.__globals__ }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_escapes_are_a_clean_400(trusting: ServerProcess, template: str) -> None:
    response = post_chat(trusting, chat_body(chat_template=template))
    error = assert_openai_error(response, 400, param="chat_template", code="invalid_chat_template")
    assert "sandbox" in error["message"]
    assert "uid=" not in response.text
    assert_serves(trusting)


@pytest.mark.parametrize(("template", "param"), [
    # blocked attributes used to render as nothing; the sandbox now refuses them outright
    ("{{ messages.__class__ }}", "chat_template"), ("{{ self._TemplateReference__context }}", "chat_template"),
    ("{{ raise_exception.__globals__ }}", "chat_template"),
    # an empty prompt used to reach the model runner and kill the loop
    ("{% if false %}x{% endif %}", "messages")])
def test_a_template_that_renders_nothing_is_a_400_not_a_dead_engine(trusting: ServerProcess, template: str,
                                                                     param: str) -> None:
    assert_openai_error(post_chat(trusting, chat_body(chat_template=template)), 400, param=param)
    assert httpx.get(f"{trusting.base_url}/health").status_code == 200
    assert_serves(trusting)


@pytest.mark.parametrize(("template", "says"), [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{{ messages }}{% endfor %}{% endfor %}", "loops"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "loops"),
    ("{% for m in messages * 1000 %}{{ m.content * 100000 }}{% endfor %}", "characters"),
    ("{{ 'x' * 10000000 }}", "repeats"),
    ("{{ 'x' * 10**9 }}", "repeats"),
])
def test_gigantic_work_is_a_clean_400_quickly(trusting: ServerProcess, template: str, says: str) -> None:
    started = time.monotonic()
    response = post_chat(trusting, chat_body(chat_template=template))
    assert time.monotonic() - started < 10
    error = assert_openai_error(response, 400, param="chat_template", code="invalid_chat_template")
    assert says in error["message"]
    assert_serves(trusting)


def test_template_syntax_error_names_the_line(trusting: ServerProcess) -> None:
    error = assert_openai_error(post_chat(trusting, chat_body(chat_template="ok\n{% for %}")), 400,
                                param="chat_template", code="invalid_chat_template")
    assert "line 2" in error["message"]
    assert_serves(trusting)


def test_a_valid_request_template_is_used(trusting: ServerProcess) -> None:
    plain = post_chat(trusting, chat_body("Hello"))
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'][0]['text'] if m['content'] is not string "
                "else m['content'] }}\n{% endfor %}assistant:")
    custom = post_chat(trusting, chat_body("Hello", chat_template=template))
    assert plain.status_code == custom.status_code == 200, custom.text
    # the custom template has no system prompt: it is shorter than the model's own
    assert custom.json()["usage"]["prompt_tokens"] < plain.json()["usage"]["prompt_tokens"]


def test_a_trusted_template_must_still_place_every_image(trusting: ServerProcess) -> None:
    body = chat_body("look", image=small_image(), chat_template="no placeholder here")
    assert_openai_error(post_chat(trusting, body), 400, param="messages")
    extra = "<|vision_start|><|image_pad|><|vision_end|>" * 2  # two placeholders for one image
    assert_openai_error(post_chat(trusting, chat_body("look", image=small_image(), chat_template=extra)), 400,
                        param="messages")
    assert_serves(trusting)


@pytest.mark.parametrize("text", ["<|image_pad|> what is this?", "<|video_pad|>", "a <|image_pad|><|image_pad|> b"])
def test_placeholder_tokens_typed_into_a_message_stay_text(server: ServerProcess, text: str) -> None:
    # Default configuration: typed special tokens used to become real placeholder ids, whose forward failed inside
    # the engine thread (issue 6: then refused with a 400). Since issue 11 they are defused into plain text before
    # tokenising, so the request is simply served and the engine never sees a stray placeholder.
    for body in (chat_body(text, model=DEFAULT_MODEL), chat_body(text, image=small_image(), model=DEFAULT_MODEL)):
        response = post_chat(server, body, DEFAULT_HEADERS)
        assert response.status_code == 200, response.text
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert_serves(server, DEFAULT_HEADERS, model=DEFAULT_MODEL)
