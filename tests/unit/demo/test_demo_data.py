"""Training inputs: the same as the real processor's, labels on answers only, compact pixels, packed attention."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from vlmserve.demo.build import save_processor_files
from vlmserve.demo.conversations import conversation_group, image_conversations, no_image_conversation
from vlmserve.demo.data import (
    IGNORE_INDEX,
    ConversationBatches,
    ConversationEncoder,
    PixelCodec,
    VisionBatches,
    batch_pixel_values,
    collate,
    load_demo_processor,
)
from vlmserve.demo.shapes import NO_IMAGE_ANSWER


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmserve.demo.build import QWEN_SPECIAL_TOKENS, model_config

    out = tmp_path_factory.mktemp("demo")
    tokenizer = save_processor_files(out)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIAL_TOKENS}
    model_config(ids, len(tokenizer)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def encoder(model_dir: Path) -> ConversationEncoder:
    from transformers import AutoConfig

    return ConversationEncoder(load_demo_processor(model_dir), AutoConfig.from_pretrained(model_dir))


def test_grouped_encoding_equals_the_processor(encoder: ConversationEncoder) -> None:
    for seed in (0, 1, 2, 31):  # 31 holds no image
        convs = conversation_group(random.Random(seed), 3)
        for conv, fast in zip(convs, encoder.encode_group(convs), strict=True):
            ref = encoder.encode(conv)
            assert torch.equal(ref["input_ids"], fast["input_ids"])
            assert torch.equal(ref["position_ids"], fast["position_ids"])
            assert ("pixel_values" in ref) == ("pixel_values" in fast)
            if "pixel_values" in ref:
                assert torch.equal(ref["pixel_values"], fast["pixel_values"])
                assert torch.equal(ref["image_grid_thw"], fast["image_grid_thw"])


def test_labels_cover_the_answers_and_their_end_of_turn_only(encoder: ConversationEncoder) -> None:
    tokenizer = encoder.processor.tokenizer
    for seed in range(3):
        [conv] = image_conversations(random.Random(seed), 1)
        item = encoder.encode(conv)
        labelled = [t for t in item["labels"].tolist() if t != IGNORE_INDEX]
        answers = [m["content"] for m in conv.messages if m["role"] == "assistant"]
        assert tokenizer.decode(labelled) == "".join(f"{a}<|im_end|>" for a in answers)
    item = encoder.encode(no_image_conversation(random.Random(0)))
    assert tokenizer.decode([t for t in item["labels"].tolist() if t != IGNORE_INDEX]).startswith(NO_IMAGE_ANSWER)
    assert "pixel_values" not in item


def test_answer_types_mark_each_answer_with_its_question_type(encoder: ConversationEncoder) -> None:
    for seed in range(6):
        convs = conversation_group(random.Random(seed), 2)
        for conv, item in zip(convs, encoder.encode_group(convs), strict=True):
            types = item["answer_types"]
            assert torch.equal(types >= 0, item["labels"] != IGNORE_INDEX)
            spans = [int(t) for i, t in enumerate(types.tolist()) if t >= 0 and (i == 0 or types[i - 1] < 0)]
            assert spans == conv.qtypes


def test_vision_batches_hold_pixels_and_one_label_row_per_token(model_dir: Path) -> None:
    dataset = VisionBatches(model_dir, seed=0, batch_size=3)
    processor = load_demo_processor(model_dir)
    batch = dataset.batch(processor, 0)
    tokens = int((batch["image_grid_thw"].prod(1) // 4).sum())
    assert batch["vision_labels"].shape[0] == tokens
    assert len(batch["pixel_rows"]) == int(batch["image_grid_thw"].prod(1).sum())
    assert torch.equal(dataset.batch(processor, 0)["pixel_rows"], batch["pixel_rows"])


def test_first_turn_puts_the_image_before_or_after_the_question(encoder: ConversationEncoder) -> None:
    orders = set()
    for seed in range(40):
        [conv] = image_conversations(random.Random(seed), 1)
        first_user = next(m for m in conv.messages if m["role"] == "user" and isinstance(m["content"], list))
        orders.add(first_user["content"][0]["type"])
    assert orders == {"image", "text"}


def test_pixel_codec_round_trip(encoder: ConversationEncoder) -> None:
    codec = PixelCodec.of(encoder.processor.image_processor)
    [conv] = image_conversations(random.Random(5), 1)
    pixels = encoder.encode(conv)["pixel_values"]
    packed = codec.encode(pixels)
    assert packed.dtype == torch.uint8 and packed.shape[1] * 2 == pixels.shape[1]
    assert torch.allclose(codec.decode(packed), pixels, atol=1e-5)


def test_collate_shares_images_and_pads(encoder: ConversationEncoder) -> None:
    codec = PixelCodec.of(encoder.processor.image_processor)
    items = encoder.encode_group(image_conversations(random.Random(2), 3))
    items += encoder.encode_group([no_image_conversation(random.Random(3))])
    batch = collate(items, encoder.pad_id, codec)
    assert batch["input_ids"].shape[0] == 4
    assert batch["image_grid_thw"].shape[0] == 3
    assert len(batch["pixel_rows"]) == len(items[0]["pixel_values"])  # travelled once for three samples
    pixels = batch_pixel_values(batch, codec)
    assert torch.allclose(pixels, torch.cat([item["pixel_values"] for item in items[:3]]), atol=1e-5)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(item["input_ids"]) for item in items]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_batches_depend_on_seed_and_index_only(model_dir: Path) -> None:
    dataset = ConversationBatches(model_dir, seed=3, batch_size=4, group_size=2)
    encoder = dataset.make_encoder()
    a, b = dataset.batch(encoder, 5), dataset.batch(encoder, 5)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_rows"], b["pixel_rows"])
    assert not torch.equal(dataset.batch(encoder, 6)["input_ids"][:, :20], a["input_ids"][:, :20])


def test_padded_vision_attention_matches_per_image_attention() -> None:
    import torch.nn.functional as F

    from vlmserve.demo.train import padded_vision_attention

    torch.manual_seed(0)
    lengths = [5, 9, 3]
    q, k, v = (torch.randn(1, 2, sum(lengths), 8) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out, _ = padded_vision_attention(None, q, k, v, scaling=0.5, cu_seq_lens_q=cu, max_length_q=max(lengths))
    expected = torch.cat([
        F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=0.5).transpose(1, 2)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
    ], dim=1)
    assert out.shape == (1, sum(lengths), 2, 8)
    assert torch.allclose(out, expected, atol=1e-6)
