"""Training batches for the demo model, made on the fly through the real processor and chat template.

Each conversation is rendered by the model's own chat template and encoded by its own processor, exactly as the
server does it, so the model trains on the very token ids and pixel values it will be served. Batches are
deterministic by (seed, batch index), whatever the number of DataLoader workers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from vlmserve.demo.conversations import Conversation, conversation_group
from vlmserve.demo.tools import render_like_server
from vlmserve.demo.vision_labels import token_labels

IGNORE_INDEX = -100


def load_demo_processor(model_dir: str | Path) -> Any:
    """The model's processor with the Pillow image processor, the one used where torchvision is absent.

    NOTE: where torchvision is installed, transformers picks its torchvision image processor, whose resizing
    differs slightly; training and evaluation always use the Pillow one, which the CPU server uses.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmserve.models.hf_processor import load_processor

    processor = load_processor(model_dir)
    if not isinstance(processor.image_processor, Qwen2VLImageProcessorPil):
        processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    return processor


class ConversationEncoder:
    """Conversations -> model inputs, with labels on the assistant answers (and their end-of-turn token) only."""

    def __init__(self, processor: Any, config: Any) -> None:
        self.processor = processor
        tokenizer = processor.tokenizer
        self.im_start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.im_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.assistant_header = tokenizer.encode("assistant\n", add_special_tokens=False)
        self._rope = _RopeIndexer(config)

    def render(self, conv: Conversation) -> str:
        """The conversation as the server renders a request (tools included), see `tools.render_like_server`."""
        return render_like_server(self.processor.chat_template, conv.messages, conv.tools)

    def encode(self, conv: Conversation) -> dict[str, torch.Tensor]:
        """One conversation through the processor's own `__call__`, exactly as the server encodes a prompt."""
        images = [conv.image] if conv.image is not None else None
        enc = self.processor(text=[self.render(conv)], images=images, return_tensors="pt")
        return self._item(enc["input_ids"][0], enc.get("pixel_values"), enc.get("image_grid_thw"))

    def encode_group(self, convs: list[Conversation]) -> list[dict[str, torch.Tensor]]:
        """Conversations that share one image (or have none), processing that image once.

        Does what `processor(text=[...], images=[image])` does for each, but runs the image processor once: its
        image half is the processor's own image processor, its text half the processor's own placeholder expansion
        (`replace_image_token`) and tokenizer. `tests/unit/demo` checks that both give identical inputs.
        """
        image = convs[0].image
        texts = [self.render(conv) for conv in convs]
        if image is None:
            ids = self.processor.tokenizer(texts)["input_ids"]
            items = [self._item(torch.tensor(row), None, None) for row in ids]
            for item, conv in zip(items, convs, strict=True):
                item["answer_types"] = answer_types(item["labels"], conv.qtypes)
            return items
        image_inputs = self.processor.image_processor(images=[image], return_tensors="pt")
        placeholder = self.processor.replace_image_token(image_inputs, 0)
        token = self.processor.image_token
        ids = self.processor.tokenizer([text.replace(token, placeholder) for text in texts])["input_ids"]
        items = [self._item(torch.tensor(row), image_inputs["pixel_values"], image_inputs["image_grid_thw"])
                 for row in ids]
        for item, conv in zip(items, convs, strict=True):
            item["answer_types"] = answer_types(item["labels"], conv.qtypes)
        scene = convs[0].scene
        if scene is not None:
            labels = token_labels(scene, image_inputs["image_grid_thw"], self.processor.image_processor.merge_size)
            for item in items:
                item["vision_labels"] = labels
        return items

    def _item(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, grid_thw: torch.Tensor | None
              ) -> dict[str, torch.Tensor]:
        item = {"input_ids": input_ids, "labels": self.labels(input_ids)}
        if pixel_values is not None and grid_thw is not None:
            item["pixel_values"] = pixel_values
            item["image_grid_thw"] = grid_thw
            mm_token_type_ids = (input_ids == self.processor.image_token_id).int()
            item["position_ids"] = self._rope.positions(input_ids, mm_token_type_ids, grid_thw)
        else:
            item["position_ids"] = torch.arange(len(input_ids)).expand(3, -1)
        return item

    def labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.tolist()
        labels = [IGNORE_INDEX] * len(ids)
        header = [self.im_start_id, *self.assistant_header]
        i = 0
        while i < len(ids):
            if ids[i: i + len(header)] == header:
                j = i + len(header)
                while j < len(ids) and ids[j] != self.im_end_id:
                    labels[j] = ids[j]
                    j += 1
                if j < len(ids):
                    labels[j] = ids[j]  # the end-of-turn token ends generation: it is learnt too
                i = j
            i += 1
        return torch.tensor(labels, dtype=torch.long)


def answer_types(labels: torch.Tensor, qtypes: list[int]) -> torch.Tensor:
    """The question type (0: no image) at each labelled position, -1 elsewhere: one answer span per entry of qtypes.

    Training uses it to log how many answers of each type it would have generated right (greedy, teacher-forced).
    """
    valid = labels != IGNORE_INDEX
    starts = valid & ~torch.cat([torch.zeros(1, dtype=torch.bool), valid[:-1]])
    span = torch.cumsum(starts.long(), 0) - 1
    assert int(starts.sum()) == len(qtypes), "one labelled span per assistant turn"
    types = torch.tensor([*qtypes, -1], dtype=torch.long)
    return torch.where(valid, types[span.clamp(min=0)], torch.full_like(span, -1))


class _RopeIndexer:
    """Runs Qwen2-VL's own `get_rope_index` on one sample, off the GPU (it loops in Python over the batch)."""

    def __init__(self, config: Any) -> None:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

        # Unbound methods called with a stand-in for the model: typed as what they are used as.
        self._get_rope_index: Any = Qwen2VLModel.get_rope_index
        self.config = config
        vision_position_ids: Any = Qwen2VLModel.get_vision_position_ids
        self.get_vision_position_ids = lambda *a, **k: vision_position_ids(None, *a, **k)

    def positions(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, grid_thw: torch.Tensor
                  ) -> torch.Tensor:
        owner = SimpleNamespace(config=self.config, get_vision_position_ids=self.get_vision_position_ids)
        positions, _ = self._get_rope_index(owner, input_ids[None], mm_token_type_ids[None], image_grid_thw=grid_thw)
        return positions[:, 0]


@dataclass(frozen=True)
class PixelCodec:
    """Pixel values <-> the 8-bit pixels they were computed from, for compact transport between processes.

    The Pillow image processor resizes 8-bit images, then computes `(pixel / 255 - mean) / std` per channel, and
    Qwen2-VL repeats a still image over two temporal frames; one 8-bit frame therefore carries all of it.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    temporal_patch_size: int = 2

    @classmethod
    def of(cls, image_processor: Any) -> PixelCodec:
        return cls(tuple(image_processor.image_mean), tuple(image_processor.image_std),
                   image_processor.temporal_patch_size)

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return mean, std

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(patches, 3 * T * p * p) float32 -> (patches, 3 * p * p) uint8."""
        mean, std = self._stats(pixel_values.device)
        frame = pixel_values.view(len(pixel_values), 3, self.temporal_patch_size, -1)[:, :, :1]
        return ((frame * std + mean) * 255).round_().clamp_(0, 255).to(torch.uint8).reshape(len(pixel_values), -1)

    def decode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(patches, 3 * p * p) uint8 -> (patches, 3 * T * p * p) float32, as the image processor makes them."""
        mean, std = self._stats(pixels.device)
        frame = (pixels.view(len(pixels), 3, 1, -1).float() * (1 / 255) - mean) / std
        return frame.expand(-1, -1, self.temporal_patch_size, -1).reshape(len(pixels), -1)


def collate(items: list[dict[str, torch.Tensor]], pad_id: int, codec: PixelCodec | None = None) -> dict[str, Any]:
    """Right-padded batch; images concatenated in sample order (the order of their tokens in the batch).

    Items whose `pixel_values` are the same tensor object share it: it travels once, with `pixel_index` mapping
    each patch of the batch to its row. With a `codec` the pixels travel as 8 bits (see `PixelCodec`).
    `batch_pixel_values` rebuilds the model's `pixel_values` on the device.
    """
    length = max(len(item["input_ids"]) for item in items)
    batch = len(items)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    position_ids = torch.zeros((3, batch, length), dtype=torch.long)
    types = torch.full((batch, length), -1, dtype=torch.long)
    for row, item in enumerate(items):
        if "answer_types" in item:
            types[row, : len(item["answer_types"])] = item["answer_types"]
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
        attention_mask[row, :n] = 1
        position_ids[:, row, :n] = item["position_ids"]
    out: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                           "position_ids": position_ids, "answer_types": types}
    with_images = [item for item in items if "pixel_values" in item]
    if with_images:
        unique: dict[int, tuple[int, torch.Tensor]] = {}
        index = []
        for item in with_images:
            pixels = item["pixel_values"]
            if id(pixels) not in unique:
                unique[id(pixels)] = (sum(len(p) for _, p in unique.values()), pixels)
            start = unique[id(pixels)][0]
            index.append(torch.arange(start, start + len(pixels)))
        rows = [codec.encode(pixels) if codec else pixels for _, pixels in unique.values()]
        out["pixel_rows"] = torch.cat(rows)
        out["pixel_index"] = torch.cat(index)
        out["image_grid_thw"] = torch.cat([item["image_grid_thw"] for item in with_images])
        if all("vision_labels" in item for item in with_images):
            out["vision_labels"] = torch.cat([item["vision_labels"] for item in with_images])
    return out


def batch_pixel_values(batch: dict[str, Any], codec: PixelCodec | None = None) -> torch.Tensor:
    """The model's `pixel_values` (float32, every temporal frame) from a collated batch."""
    rows = batch["pixel_rows"]
    if rows.dtype == torch.uint8:
        assert codec is not None, "8-bit pixels need the codec that encoded them"
        rows = codec.decode(rows)
    return rows[batch["pixel_index"]]


def conversation_rng(seed: int, batch_index: int, group: int) -> random.Random:
    # String seeds: these streams never meet `shapes.sample_qa`'s ("qa:...") nor evaluation's.
    return random.Random(f"train:{seed}:{batch_index}:{group}")


class ConversationBatches(torch.utils.data.IterableDataset):
    """An endless stream of training batches; batch k is the same for a given seed whatever the workers.

    Each batch holds `batch_size` conversations in groups of `group_size` that share one image.
    """

    def __init__(self, model_dir: str | Path, seed: int, batch_size: int, group_size: int = 4,
                 start_batch: int = 0, compact_pixels: bool = True) -> None:
        super().__init__()
        self.model_dir = str(model_dir)
        self.seed = seed
        self.batch_size = batch_size
        self.group_size = group_size
        self.start_batch = start_batch
        self.compact_pixels = compact_pixels

    def make_encoder(self) -> ConversationEncoder:
        from transformers import AutoConfig

        return ConversationEncoder(load_demo_processor(self.model_dir), AutoConfig.from_pretrained(self.model_dir))

    def batch(self, encoder: ConversationEncoder, batch_index: int) -> dict[str, Any]:
        items: list[dict[str, torch.Tensor]] = []
        group = 0
        while len(items) < self.batch_size:
            rng = conversation_rng(self.seed, batch_index, group)
            count = min(self.group_size, self.batch_size - len(items))
            items.extend(encoder.encode_group(conversation_group(rng, count)))
            group += 1
        codec = PixelCodec.of(encoder.processor.image_processor) if self.compact_pixels else None
        return collate(items, encoder.pad_id, codec)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)  # many workers share the machine's cores
        encoder = self.make_encoder()
        batch_index = self.start_batch + worker
        while True:
            yield self.batch(encoder, batch_index)
            batch_index += num_workers


class VisionBatches(torch.utils.data.IterableDataset):
    """An endless stream of image-only batches (pixels and per-token vision labels) for pre-training the vision tower.

    Batch k holds `batch_size` random scenes, deterministic by (seed, k) whatever the number of workers.
    """

    def __init__(self, model_dir: str | Path, seed: int, batch_size: int) -> None:
        super().__init__()
        self.model_dir = str(model_dir)
        self.seed = seed
        self.batch_size = batch_size

    def batch(self, processor: Any, batch_index: int) -> dict[str, Any]:
        from vlmserve.demo.shapes import random_scene, render

        image_processor = processor.image_processor
        codec = PixelCodec.of(image_processor)
        rows, grids, labels = [], [], []
        for i in range(self.batch_size):
            scene = random_scene(random.Random(f"vision:{self.seed}:{batch_index}:{i}"))
            inputs = image_processor(images=[render(scene)], return_tensors="pt")
            rows.append(codec.encode(inputs["pixel_values"]))
            grids.append(inputs["image_grid_thw"])
            labels.append(token_labels(scene, inputs["image_grid_thw"], image_processor.merge_size))
        pixel_rows = torch.cat(rows)
        return {"pixel_rows": pixel_rows, "pixel_index": torch.arange(len(pixel_rows)),
                "image_grid_thw": torch.cat(grids), "vision_labels": torch.cat(labels)}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        processor = load_demo_processor(self.model_dir)
        batch_index = worker
        while True:
            yield self.batch(processor, batch_index)
            batch_index += num_workers
