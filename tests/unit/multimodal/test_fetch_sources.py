"""data: URIs and local files as image sources."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from PIL import Image

from vlmserve.config import MediaConfig
from vlmserve.errors import MediaError, MediaFetchError
from vlmserve.multimodal import fetch
from vlmserve.multimodal.fetch import decode_data_uri, read_local_file

from .helpers import PARAM, data_uri, encode, load, load_error, ref

URL_PARAM = f"{PARAM}.url"


# --- data URIs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "media_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"),
                                                 ("WEBP", "image/webp"), ("PNG", "IMAGE/PNG")])
def test_good_data_uris(fmt: str, media_type: str) -> None:
    data = encode(Image.new("RGB", (16, 12), (200, 30, 30)), fmt)
    [part] = load(MediaConfig(), [ref(data_uri(data, media_type))])
    assert part.image.mode == "RGB" and part.image.size == (16, 12)
    r, g, b = part.image.getpixel((8, 6))
    assert abs(r - 200) < 8 and g < 40 and b < 40


def test_declared_subtype_is_not_trusted() -> None:
    """A JPEG sent as image/png decodes by what the bytes are."""
    data = encode(Image.new("RGB", (4, 4), "blue"), "JPEG")
    [part] = load(MediaConfig(), [ref(data_uri(data, "image/png"))])
    assert part.image.size == (4, 4)


@pytest.mark.parametrize(("uri", "fragment"), [
    ("data:image/png;base64,!!!!", "invalid"),
    ("data:image/png;base64,iVBORw0KGgo", "invalid"),  # missing padding
    ("data:image/png;base64,iVBO Rw0K", "invalid"),  # whitespace
    ("data:image/png;base64,iVBORw0KGgo=\n", "invalid"),
    ("data:image/png;base64,ïVBORw0K", "invalid"),  # non-ASCII
    ("data:image/png;base64,", "no image data"),
    ("data:text/plain;base64,aGVsbG8=", "image media type"),
    ("data:;base64,aGVsbG8=", "image media type"),
    ("data:application/octet-stream;base64,aGVsbG8=", "image media type"),
    ("data:image/png,rawbytes", "base64"),
    ("data:image/png;charset=utf-8,abc", "base64"),
    ("data:image/png;base64", "data:image/<type>;base64,<data>"),
])
def test_bad_data_uris(uri: str, fragment: str) -> None:
    exc = load_error(MediaConfig(), [ref(uri)])
    assert isinstance(exc, MediaFetchError)
    assert exc.param == URL_PARAM and fragment in exc.message


def test_data_uri_that_is_not_an_image() -> None:
    exc = load_error(MediaConfig(), [ref(data_uri(b"%PDF-1.7 not an image"))])
    assert type(exc) is MediaError and exc.param == PARAM


def test_oversized_payload_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = base64.b64decode

    def spy(payload: str | bytes, *args: object, **kwargs: object) -> bytes:
        calls.append(len(payload))
        return real(payload, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fetch.base64, "b64decode", spy)
    huge = "data:image/png;base64," + "A" * 50_000_000
    exc = load_error(MediaConfig(max_image_bytes=1_000_000), [ref(huge)])
    assert isinstance(exc, MediaFetchError) and exc.param == URL_PARAM
    assert exc.message == "image is larger than 1000000 bytes (--max-image-bytes)"
    assert calls == []
    # The spy is live: a payload within the cap is decoded through it.
    small = data_uri(encode(Image.new("RGB", (2, 2)), "PNG"))
    load(MediaConfig(max_image_bytes=1_000_000), [ref(small)])
    assert len(calls) == 1


def test_data_uri_cap_is_exact() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    uri = data_uri(data)
    assert decode_data_uri(uri, 10240, "p") == data
    with pytest.raises(MediaFetchError, match="larger than 10239 bytes"):
        decode_data_uri(uri, 10239, "p")  # within the length bound, refused after decoding by the true size


# --- local files ------------------------------------------------------------------------------------------------


GENERIC = "the image path is not a readable file inside the folder allowed by --allowed-local-media-path"


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    png = encode(Image.new("RGB", (5, 3), (10, 200, 10)), "PNG")
    (allowed / "sub" / "ok.png").write_bytes(png)
    (allowed / "with space.png").write_bytes(png)
    (outside / "secret.png").write_bytes(png)
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    (allowed / "escape_dir").symlink_to(outside)
    (allowed / "inner_link.png").symlink_to(allowed / "sub" / "ok.png")
    os.mkfifo(allowed / "fifo.png")
    return allowed, outside


@pytest.mark.parametrize("name", ["sub/ok.png", "inner_link.png", "with space.png"])
def test_local_files_inside_the_folder(folders: tuple[Path, Path], name: str) -> None:
    allowed, _ = folders
    config = MediaConfig(allowed_local_media_path=str(allowed))
    path = str(allowed / name)
    file_url = "file://" + path.replace(" ", "%20")
    for url in (path, file_url, "file://localhost" + path.replace(" ", "%20")):
        [part] = load(config, [ref(url)])
        assert part.image.size == (5, 3) and part.image.getpixel((0, 0)) == (10, 200, 10)


def test_refusals_look_the_same_whatever_the_reason(folders: tuple[Path, Path]) -> None:
    allowed, outside = folders
    config = MediaConfig(allowed_local_media_path=str(allowed))
    urls = [
        str(outside / "secret.png"),  # exists, outside
        str(outside / "missing.png"),  # missing, outside
        str(allowed / "missing.png"),  # missing, inside
        str(allowed / "escape.png"),  # symlink leading out
        str(allowed / "escape_dir" / "secret.png"),  # through a symlinked directory
        str(allowed / ".." / "outside" / "secret.png"),  # dot-dot
        "file://" + str(allowed / "%2e%2e" / "outside" / "secret.png"),  # encoded dot-dot
        str(allowed / "sub"),  # a directory
        str(allowed / "fifo.png"),  # a FIFO: must not hang
        "/etc/passwd", "/proc/self/environ", "/dev/zero",
        "file://" + str(allowed / "sub" / "ok.png") + "%00.png",  # NUL byte
        "file://" + str(allowed / "sub" / "ok.png") + "?x=1",
        "file:sub/ok.png",  # relative
        "file://otherhost" + str(allowed / "sub" / "ok.png"),
    ]
    for url in urls:
        exc = load_error(config, [ref(url)])
        assert isinstance(exc, MediaFetchError), url
        assert (exc.message, exc.param) == (GENERIC, URL_PARAM), url


def test_local_files_are_off_by_default(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    for url in (str(allowed / "sub" / "ok.png"), "file://" + str(allowed / "sub" / "ok.png"), "/etc/passwd"):
        exc = load_error(MediaConfig(), [ref(url)])
        assert isinstance(exc, MediaFetchError) and "--allowed-local-media-path" in exc.message
        assert exc.message != GENERIC


def test_local_file_byte_cap(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    (allowed / "big.png").write_bytes(b"\0" * 5000)
    with pytest.raises(MediaFetchError, match=r"larger than 4999 bytes \(--max-image-bytes\)"):
        read_local_file(str(allowed / "big.png"), allowed.resolve(), 4999, "p")
    assert read_local_file(str(allowed / "big.png"), allowed.resolve(), 5000, "p") == b"\0" * 5000
