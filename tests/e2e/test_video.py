"""video_url parts through a real server and the official openai client: answers, limits, errors, cache reuse."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import ImageHTTPServer, ServerProcess
from tests.e2e.conftest import MODEL
from tests.fixtures.videos import data_uri, make_video

pytest.importorskip("av")

CLIP = make_video(10, (64, 64), fps=5, seed=0)  # 2 s: 4 frames at the default 2 fps


def video_turn(*urls: str, text: str = "What happens in the video?") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "video_url", "video_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def ask(client: openai.OpenAI, messages: list[dict[str, Any]], **extra: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,  # type: ignore[arg-type]
                                          extra_body=extra or None)


def refused(client: openai.OpenAI, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, messages, **extra)
    assert caught.value.status_code == 400
    body = caught.value.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return dict(body)


def test_video_answers_and_is_reused_from_the_prefix_cache(client: openai.OpenAI) -> None:
    text_only = ask(client, [{"role": "user", "content": "What happens in the video?"}])
    first = ask(client, video_turn(data_uri(CLIP)))
    assert first.choices[0].finish_reason == "length"
    # 4 frames of 56x56 → 2 temporal groups x 4 merged patches = 8 video tokens (+ vision start/end)
    assert first.usage.prompt_tokens == text_only.usage.prompt_tokens + 8 + 2
    again = ask(client, video_turn(data_uri(CLIP)))
    assert again.usage.prompt_tokens_details.cached_tokens >= 16  # the same video: its blocks were reused
    assert again.choices[0].message.content == first.choices[0].message.content
    fewer = ask(client, video_turn(data_uri(CLIP)), mm_processor_kwargs={"fps": 1})  # 2 frames: one group
    assert fewer.usage.prompt_tokens == first.usage.prompt_tokens - 4


def test_video_from_an_http_url(client: openai.OpenAI, image_server: ImageHTTPServer) -> None:
    image_server.images["clip.mp4"] = CLIP
    answer = ask(client, video_turn(image_server.url("clip.mp4")))
    assert answer.usage.prompt_tokens > 10
    assert "/clip.mp4" in image_server.hits


def test_bad_videos_and_options_are_400s(client: openai.OpenAI) -> None:
    error = refused(client, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(CLIP)}}]}])["error"]
    assert error["param"] == "messages[0].content[0].image_url.url" and error["code"] == "invalid_image_url"
    assert 'send a video as a {"type": "video_url"} content part' in error["message"]
    error = refused(client, video_turn(data_uri(b"\0" * 64)))["error"]
    assert error["param"] == "messages[0].content[0].video_url" and error["code"] == "invalid_video"
    error = refused(client, video_turn(data_uri(CLIP)), mm_processor_kwargs={"max_frames": 1000})["error"]
    assert error["param"] == "mm_processor_kwargs.max_frames" and "--max-video-frames" in error["message"]
    error = refused(client, video_turn(data_uri(CLIP)), mm_processor_kwargs={"num_crops": 4})["error"]
    assert error["param"].startswith("mm_processor_kwargs")
    assert ask(client, video_turn(data_uri(CLIP))).usage.prompt_tokens > 0  # and the server keeps serving


@pytest.fixture(scope="module")
def tight_client(tiny_qwen2_vl: Path, start_server: type[ServerProcess]) -> Iterator[openai.OpenAI]:
    server = start_server([str(tiny_qwen2_vl), "--served-model-name", MODEL, "--max-video-bytes", "20000",
                           "--max-video-duration-s", "3", "--max-videos-per-request", "1",
                           "--max-video-frames", "2"])
    yield openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    server.stop()


def test_server_limits_name_their_flags(tight_client: openai.OpenAI, image_server: ImageHTTPServer) -> None:
    checks = [
        (video_turn(data_uri(CLIP + b"\0" * 20_000)), "--max-video-bytes",
         "messages[0].content[0].video_url.url"),
        (video_turn(data_uri(make_video(20, (32, 32), fps=5))), "--max-video-duration-s",
         "messages[0].content[0].video_url"),
        (video_turn(data_uri(CLIP), data_uri(CLIP)), "--max-videos-per-request", "messages"),
        # no --allowed-media-hosts here: a loopback URL is refused before any connection
        (video_turn(image_server.url("clip.mp4")), None, "messages[0].content[0].video_url.url"),
    ]
    for messages, flag, param in checks:
        error = refused(tight_client, messages)["error"]
        assert error["param"] == param, error
        assert flag is None or flag in error["message"], error
    capped = ask(tight_client, video_turn(data_uri(CLIP)))  # 2 frames (--max-video-frames 2): one temporal group
    assert capped.usage.prompt_tokens == ask(tight_client, video_turn(data_uri(CLIP)),
                                             mm_processor_kwargs={"fps": 1}).usage.prompt_tokens


def test_without_pyav_the_server_starts_and_refuses_videos(tiny_qwen2_vl: Path, start_server: type[ServerProcess],
                                                           tmp_path: Path) -> None:
    blocker = tmp_path / "no_av" / "av"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('PyAV is blocked in this test')\n")
    path = os.pathsep.join(p for p in (str(blocker.parent), os.environ.get("PYTHONPATH", "")) if p)
    server = start_server([str(tiny_qwen2_vl), "--served-model-name", MODEL], env={"PYTHONPATH": path})
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    error = refused(client, video_turn(data_uri(CLIP)))["error"]
    assert "pip install 'vlmserve[video]'" in error["message"] and error["code"] == "unsupported"
    assert ask(client, [{"role": "user", "content": "still serving?"}]).usage.prompt_tokens > 0
    server.stop()
