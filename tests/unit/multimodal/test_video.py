"""The video decoder and sampler (vlmserve.multimodal.video) on tiny videos made with PyAV in the test."""

from __future__ import annotations

import sys

import pytest

from tests.fixtures.videos import make_video
from vlmserve.errors import MediaFetchError, UnsupportedFeatureError, VideoError, VideoFetchError
from vlmserve.multimodal.fetch import VIDEO, decode_data_uri
from vlmserve.multimodal.video import VideoLimits, decode_video, sample_times, sniff_container

pytest.importorskip("av")

LIMITS = VideoLimits(max_duration_s=60, max_frames=64, max_pixels=10**7, max_frame_pixels=10**7)


def decode(data: bytes, limits: VideoLimits = LIMITS, *, fps: float = 2, max_frames: int = 64):
    return decode_video(data, limits, fps=fps, max_frames=max_frames, param="messages[0].content[0].video_url")


def test_sample_times_follow_fps_then_spread_when_capped() -> None:
    assert sample_times(2.0, 2, 64) == [0.0, 0.5, 1.0, 1.5]
    assert sample_times(10.0, 2, 4) == [0.0, 2.5, 5.0, 7.5]  # the cap binds: 4 frames over the whole video
    assert sample_times(0.2, 2, 64) == [0.0]  # shorter than one interval: still its first frame


@pytest.mark.parametrize("codec, container", [("mpeg4", "mp4"), ("libvpx", "webm")])
def test_ten_frames_at_5fps_sampled_at_2fps(codec: str, container: str) -> None:
    video = decode(make_video(10, (64, 64), fps=5, codec=codec, container=container))
    assert len(video.frames) == 4 and video.duration_s == pytest.approx(2.0)
    assert video.timestamps == pytest.approx((0.0, 0.6, 1.0, 1.6))  # the first frame at or after 0, 0.5, 1, 1.5
    assert video.frame_indices == (0, 3, 5, 8) and video.source_fps == 5
    assert video.sampled_fps == pytest.approx(2.0)
    assert all(frame.mode == "RGB" and frame.size == (64, 64) for frame in video.frames)
    assert len({frame.tobytes() for frame in video.frames}) == 4  # four different frames, not one repeated


def test_hash_is_the_content() -> None:
    data = make_video(10, seed=0)
    assert decode(data).hash == decode(data).hash
    assert decode(data).hash != decode(make_video(10, seed=1)).hash
    assert decode(data).hash != decode(data, fps=1).hash  # other frames sampled, another video for the model


def test_max_frames_and_pixel_budget() -> None:
    video = decode(make_video(10, (64, 48), fps=5), VideoLimits(60, 3, 3 * 16 * 12, 10**7), max_frames=64)
    assert len(video.frames) == 3  # the server's cap beats the requested 64
    assert all(frame.width * frame.height <= 16 * 12 for frame in video.frames)  # frames x pixels within budget
    assert decode(make_video(10, fps=5), max_frames=2).timestamps == pytest.approx((0.0, 1.0))


def test_limits_name_their_flags() -> None:
    with pytest.raises(VideoError, match=r"lasts 2.0 s, more than 1 s \(--max-video-duration-s\)") as caught:
        decode(make_video(10, fps=5), VideoLimits(1, 64, 10**7, 10**7))
    assert caught.value.param == "messages[0].content[0].video_url"
    with pytest.raises(VideoError, match=r"64x64 = 4096 pixels, more than 4000 \(--max-video-frame-pixels\)"):
        decode(make_video(4), VideoLimits(60, 64, 10**7, 4000))
    with pytest.raises(VideoError, match=r"more than 40000 pixels \(--max-video-decode-pixels\)"):
        decode(make_video(10), VideoLimits(60, 64, 10**7, 10**7, max_decode_pixels=40_000))  # 10 x 4096 decoded


def test_bad_bytes_are_clean_video_errors() -> None:
    data = make_video(10)
    with pytest.raises(VideoError, match="not a video in a supported container"):
        decode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(VideoError, match="not a video in a supported container"):
        decode(b"#EXTM3U\n#EXT-X-VERSION:3\nhttp://127.0.0.1/x.ts\n")  # a playlist is never opened
    with pytest.raises(VideoError, match=r"could not be decoded|no decodable frames"):
        decode(data[: len(data) // 3])
    assert sniff_container(data) == "mp4" and sniff_container(make_video(2, container="webm", codec="libvpx")) \
        == "matroska"


def test_missing_pyav_is_a_400_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_video(2)
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    with pytest.raises(UnsupportedFeatureError, match=r"pip install 'vlmserve\[video\]'"):
        decode(data)


def test_data_uris_of_the_wrong_kind_say_which_part_to_use() -> None:
    video_uri = "data:video/mp4;base64,AAAA"
    with pytest.raises(MediaFetchError, match=r'send a video as a \{"type": "video_url"\} content part') as caught:
        decode_data_uri(video_uri, 1000, "messages[0].content[0].image_url.url")  # an image_url part, as today
    assert caught.value.code == "invalid_image_url"
    assert decode_data_uri(video_uri, 1000, "p", VIDEO) == b"\0\0\0"
    with pytest.raises(VideoFetchError, match=r'send an image as a \{"type": "image_url"\}'):
        decode_data_uri("data:image/png;base64,AAAA", 1000, "p", VIDEO)
    with pytest.raises(VideoFetchError, match=r"video is larger than 2 bytes \(--max-video-bytes\)"):
        decode_data_uri(video_uri, 2, "p", VIDEO)
