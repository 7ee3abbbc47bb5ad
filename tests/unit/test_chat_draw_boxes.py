"""`vlmserve chat --draw-boxes`: the answer's boxes drawn where they belong on the image that was sent.

The server here is a canned stand-in on 127.0.0.1 (the client is what is under test): it reports a grounding
format on /v1/models and streams a fixed grounding answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

ANSWER_PIECES = ["The cat: ", "<|object_ref_start|>cat<|object_ref_end|>", "<|box_start|>(100,200),",
                 "(500,800)<|box_end|>"]


@pytest.fixture
def canned_server() -> Iterator[tuple[str, list[dict]]]:
    bodies: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._send("application/json", json.dumps(
                {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x",
                                             "grounding_format": "qwen2-vl"}]}).encode())

        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            events = [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in ANSWER_PIECES]
            sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            self._send("text/event-stream", sse.encode())

        def _send(self, kind: str, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    server.shutdown()
    server.server_close()


def test_draw_boxes_saves_the_image_with_the_box_in_place(canned_server: tuple[str, list[dict]],
                                                          tmp_path: Path) -> None:
    url, bodies = canned_server
    picture = tmp_path / "in.png"
    Image.new("RGB", (400, 300), "white").save(picture)
    out = tmp_path / "boxes.png"
    done = subprocess.run([sys.executable, "-m", "vlmserve", "chat", "--url", url, "--image", str(picture),
                           "--draw-boxes", str(out), "where is the cat?"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "".join(ANSWER_PIECES) in done.stdout and "1 box drawn" in done.stderr
    assert bodies and bodies[0]["messages"][0]["content"][0]["type"] == "image_url"
    drawn = Image.open(out).convert("RGB")
    assert drawn.size == (400, 300)
    # (100,200),(500,800) in 0-1000 of a 400x300 image: x 40..200, y 60..240
    for edge in ((40, 150), (200, 150), (120, 240)):
        assert drawn.getpixel(edge) != (255, 255, 255), edge
    for outside in ((120, 150), (30, 150), (210, 150), (120, 250)):
        assert drawn.getpixel(outside) == (255, 255, 255), outside


def test_draw_boxes_needs_a_format_when_the_server_reports_none(canned_server: tuple[str, list[dict]],
                                                                tmp_path: Path) -> None:
    url, _ = canned_server
    picture = tmp_path / "in.png"
    Image.new("RGB", (40, 30), "white").save(picture)
    done = subprocess.run([sys.executable, "-m", "vlmserve", "chat", "--url", url, "--image", str(picture),
                           "--model", "other", "--draw-boxes", str(tmp_path / "o.png"), "where?"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "--grounding-format" in done.stderr and not (tmp_path / "o.png").exists()
