"""A few training steps on the CPU: the loss falls and the checkpoint loads like any Qwen2-VL."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmserve.demo.train import learning_rate, parse_args, train


def test_learning_rate_warms_up_then_decays() -> None:
    args = parse_args(["--out", "x", "--lr", "1e-3", "--warmup-steps", "10", "--min-lr-ratio", "0.1"])
    assert learning_rate(0, 0.0, args) == pytest.approx(1e-4)
    assert learning_rate(9, 0.0, args) == pytest.approx(1e-3)
    assert learning_rate(50, 0.5, args) == pytest.approx(0.55e-3)
    assert learning_rate(99, 1.0, args) == pytest.approx(1e-4)


def test_a_few_cpu_steps_lower_the_loss_and_save_a_loadable_checkpoint(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmserve.models.hf_processor import load_processor

    out = tmp_path / "model"
    args = parse_args(["--out", str(out), "--tiny", "--steps", "8", "--batch-size", "4", "--group-size", "2",
                       "--workers", "0", "--device", "cpu", "--warmup-steps", "2", "--log-every", "2",
                       "--lr", "3e-3", "--archive", str(tmp_path / "model.tar")])
    losses = train(args)
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.5, losses
    assert (tmp_path / "model.tar").stat().st_size > 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert next(model.parameters()).dtype == torch.float32
    processor = load_processor(out)
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
