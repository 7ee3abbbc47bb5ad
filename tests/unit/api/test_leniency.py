"""The leniency policy of `vlmserve.api.schemas`: known client extras are dropped (logged once), others refused."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from vlmserve.api import schemas


def request(part: dict[str, object], **extra: object) -> schemas.ChatCompletionRequest:
    return schemas.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [part]}], **extra})


def test_known_extras_are_accepted_ignored_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    schemas._logged_ignored.discard("ImageURL.format")
    with caplog.at_level(logging.DEBUG, logger="vlmserve.api.schemas"):
        for _ in range(3):
            parsed = request({"type": "image_url", "image_url": {"url": "http://x/a.png", "format": "image/png"},
                              "cache_control": {"type": "ephemeral"}},
                             stream=True, stream_options={"include_usage": True, "include_obfuscation": True,
                                                          "continuous_usage_stats": True})
    part = parsed.messages[0].content[0]  # type: ignore[index]
    assert part.image_url is not None and part.image_url.url == "http://x/a.png"  # type: ignore[union-attr]
    assert parsed.stream_options is not None and parsed.stream_options.include_usage
    assert sum("ImageURL.format" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.parametrize("part", [{"type": "text", "text": "x", "bogus": 1},
                                  {"type": "image_url", "image_url": {"url": "http://x/a.png", "colour": "red"}},
                                  {"type": "input_audio", "input_audio": {}}])
def test_unknown_nested_fields_and_part_types_are_refused(part: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        request(part)
