"""Grounding answers → boxes in the original image's pixels, for each family's markup and coordinate space."""

from __future__ import annotations

import pytest
from PIL import Image

from vlmserve.grounding import Box, draw_boxes, format_for_family, parse_boxes, qwen25_model_size


def close(box: Box, expected: tuple[float, float, float, float], tol: float = 1.0) -> bool:
    return all(abs(a - b) <= tol for a, b in zip((box.x1, box.y1, box.x2, box.y2), expected, strict=True))


@pytest.mark.parametrize(("fmt", "answer"), [
    ("qwen-vl", "<ref>the cat</ref><box>(100,200),(500,1000)</box>"),
    ("qwen2-vl", "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,200),(500,1000)<|box_end|>"),
    ("internvl", "<ref>the cat</ref><box>[[100, 200, 500, 1000]]</box>"),
    ("qwen3-vl", '```json\n[{"bbox_2d": [100, 200, 500, 1000], "label": "the cat"}]\n```'),
])
def test_normalised_formats_map_0_1000_onto_the_image(fmt: str, answer: str) -> None:
    [box] = parse_boxes(answer, fmt, (640, 480))  # type: ignore[arg-type]
    assert box.label == "the cat"
    assert close(box, (64, 96, 320, 480))


def test_glm_boxes_have_no_label_and_may_be_double_bracketed() -> None:
    boxes = parse_boxes("Here <|begin_of_box|>[[0,0,500,500]]<|end_of_box|> and "
                        "<|begin_of_box|>[500,500,1000,1000]<|end_of_box|>", "glm", (200, 100))
    assert [b.label for b in boxes] == [None, None]
    assert close(boxes[0], (0, 0, 100, 50)) and close(boxes[1], (100, 50, 200, 100))


def test_one_tag_may_hold_several_boxes_for_one_reference() -> None:
    boxes = parse_boxes("<ref>cats</ref><box>(0,0),(100,100)</box><box>(200,200),(300,300)</box>"
                        "<box>(400,400),(500,500)(600,600),(700,700)</box>", "qwen-vl", (1000, 1000))
    assert [b.label for b in boxes] == ["cats", None, None, None]
    assert close(boxes[3], (600, 600, 700, 700))


def test_qwen25_absolute_pixels_of_an_image_the_processor_did_not_resize_much() -> None:
    # 1000x500 → sides rounded to multiples of 28: 1008 x 504, within Qwen2.5-VL's pixel bounds
    assert qwen25_model_size(1000, 500) == (1008, 504)
    [box] = parse_boxes('[{"bbox_2d": [504, 252, 1008, 504], "label": "dog"}]', "qwen2.5-vl", (1000, 500))
    assert box.label == "dog" and close(box, (500, 250, 1000, 500))


def test_qwen25_coordinates_of_an_image_the_server_downscaled_first() -> None:
    # 3000x1500 = 4.5 MP is over the 2048² default detail budget: the server fits it to ~2896x1448, then the
    # processor rounds the sides to multiples of 28 (2884 x 1456); the answer's pixels live in that space.
    seen = qwen25_model_size(3000, 1500)
    assert seen[0] % 28 == 0 and seen[1] % 28 == 0 and abs(seen[0] - 2884) <= 28 and abs(seen[1] - 1456) <= 28
    [box] = parse_boxes(f"<|box_start|>({seen[0] // 2},{seen[1] // 2}),({seen[0]},{seen[1]})<|box_end|>",
                        "qwen2.5-vl", (3000, 1500))
    assert close(box, (1500, 750, 3000, 1500), tol=2)


def test_malformed_boxes_are_skipped_not_fatal() -> None:
    text = '<|box_start|>(1,2)<|box_end|> {"bbox_2d": [1, 2, "x", 4]} {"bbox_2d": [1,2,3,4], broken'
    assert parse_boxes(text, "qwen2-vl", (100, 100)) == []


def test_families_name_their_format() -> None:
    assert format_for_family("qwen_vl_chat") == "qwen-vl"
    assert format_for_family("qwen2_5_vl") == "qwen2.5-vl"
    assert format_for_family("glm4v") == "glm"
    assert format_for_family("llava") is None


def test_drawn_boxes_land_on_the_right_pixels() -> None:
    image = Image.new("RGB", (200, 100), "white")
    out = draw_boxes(image, [Box("cat", 20, 30, 120, 80)])
    assert out.size == image.size and image.getpixel((20, 55)) == (255, 255, 255)  # the input is untouched
    for edge in ((20, 55), (120, 55), (70, 80)):
        assert out.getpixel(edge) != (255, 255, 255), edge
    for outside in ((70, 55), (10, 55), (130, 55), (70, 90)):
        assert out.getpixel(outside) == (255, 255, 255), outside
