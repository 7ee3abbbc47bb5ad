"""`vlmserve chat` pieces that need no server: the base URL forms and an unreadable image."""

from __future__ import annotations

import pytest

from vlmserve.chat_client import ChatClientError, base_url, image_to_url
from vlmserve.cli import main


@pytest.mark.parametrize("url", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"])
def test_base_url_accepts_the_form_other_clients_use(url: str) -> None:
    assert base_url(url) == "http://h:8000"


def test_missing_image_is_one_clear_line_and_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ChatClientError, match=r"cannot read the image 'missing\.png'"):
        image_to_url("missing.png")
    assert main(["chat", "--url", "http://127.0.0.1:9", "--image", "missing.png", "Hi"]) == 1
    err = capsys.readouterr().err
    assert "cannot read the image" in err and "Traceback" not in err
