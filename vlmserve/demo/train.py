"""Train the demo model on conversations generated on the fly.

    python -m vlmserve.demo.train --out DIR --seed 0 --steps 3000 [--time-budget SECONDS] ...

The model starts from `vlmserve.demo.build` (or `--init DIR`), learns from batches that `vlmserve.demo.data` makes
in DataLoader workers through the real processor and chat template, with the loss on the assistant's answers only,
and is saved in float32 with `save_pretrained` beside its tokenizer and processor files. It runs on CUDA (bf16
autocast) or, slowly, on the CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlmserve.demo.build import build
from vlmserve.demo.data import ConversationBatches, PixelCodec, batch_pixel_values, load_demo_processor
from vlmserve.demo.vision_labels import IGNORE, NUM_OBJECT_CLASSES, NUM_RANKS, NUM_SIDES

PROCESSOR_FILES = ("chat_template.jinja", "chat_template.json", "preprocessor_config.json", "tokenizer.json",
                   "tokenizer_config.json")

# NOTE: transformers runs the vision tower's attention one image at a time unless the attention implementation's
# name contains "flash", in which case it makes one call with the packed sequence lengths. This implementation
# pads the images into one batch and runs SDPA with a key mask: the same numbers, one call per layer, which
# matters with hundreds of images per training batch. Training only; the saved model uses plain "sdpa".
PADDED_VISION_ATTENTION = "padded_flash_demo"


def padded_vision_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any = None, scaling: float | None = None, dropout: float = 0.0,
                            cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Bidirectional attention within each image of a packed (1, heads, tokens, dim) sequence."""
    assert cu_seq_lens_q is not None and max_length_q is not None
    _, heads, total, dim = query.shape
    lengths = cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    num_seqs, width = len(lengths), int(max_length_q)
    seq_ids = torch.repeat_interleave(torch.arange(num_seqs, device=query.device), lengths, output_size=total)
    pos = torch.arange(total, device=query.device) - cu_seq_lens_q[:-1][seq_ids]

    def padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(num_seqs, width, heads, dim)
        out[seq_ids, pos] = x[0].transpose(0, 1)
        return out.transpose(1, 2)

    mask = (torch.arange(width, device=query.device)[None, :] < lengths[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)[seq_ids, pos].unsqueeze(0), None


def use_padded_vision_attention(model: Any, enable: bool = True) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PADDED_VISION_ATTENTION, padded_vision_attention)
    model.model.visual.config._attn_implementation = PADDED_VISION_ATTENTION if enable else "sdpa"


class VisionProbe(torch.nn.Module):
    """Training-only linear probe on the vision tower's output: each token's object class, side and rank.

    See `vlmserve.demo.vision_labels`. It reads the merger's output through a forward hook, so the model runs its
    ordinary forward; it is not part of the saved model.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(model.config.text_config.hidden_size, NUM_OBJECT_CLASSES + NUM_SIDES + NUM_RANKS)
        self._features: list[torch.Tensor] = []
        model.model.visual.merger.register_forward_hook(lambda module, args, output: self._features.append(output))

    def loss(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        features, self._features = self._features, []
        if labels is None or not features:
            return None
        # Normalised first: the probe starts with logits of unit scale whatever the features' scale.
        hidden = features[-1].float()
        logits = self.proj(F.layer_norm(hidden, hidden.shape[-1:]))
        objects, sides, ranks = logits.split([NUM_OBJECT_CLASSES, NUM_SIDES, NUM_RANKS], dim=-1)
        return _cross_entropy(objects, labels[:, 0]) + _cross_entropy(sides, labels[:, 1]) + _cross_entropy(
            ranks, labels[:, 2])


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Zero rather than NaN when every target is ignored (a batch of background only).
    valid = target != IGNORE
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid], target[valid])


def learning_rate(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warm-up over `warmup_steps`, then a cosine from `lr` down to `lr * min_lr_ratio` as progress -> 1."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def make_model(args: argparse.Namespace) -> Any:
    out = Path(args.out)
    if args.init:
        from transformers import Qwen2VLForConditionalGeneration

        out.mkdir(parents=True, exist_ok=True)
        for name in PROCESSOR_FILES:
            if Path(args.init, name).resolve() != (out / name).resolve():
                shutil.copy(Path(args.init, name), out / name)
        model = Qwen2VLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    else:
        torch.manual_seed(args.seed)
        model = build(out, tiny=args.tiny)
    model.save_pretrained(out)  # the data workers read config and processor files from here
    return model


def make_optimizer(modules: list[torch.nn.Module], args: argparse.Namespace, device: torch.device
                   ) -> torch.optim.Optimizer:
    params = [p for module in modules for p in module.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8, fused=device.type == "cuda")


def save(model: Any, args: argparse.Namespace) -> None:
    use_padded_vision_attention(model, enable=False)
    model.save_pretrained(args.out)
    use_padded_vision_attention(model, enable=args.device_type == "cuda")
    if args.archive:
        tmp = f"{args.archive}.tmp"
        with tarfile.open(tmp, "w") as tar:
            for file in sorted(Path(args.out).iterdir()):
                tar.add(file, arcname=file.name)
        os.replace(tmp, args.archive)


def to_device(batch: dict[str, torch.Tensor], device: torch.device, codec: PixelCodec | None
              ) -> dict[str, torch.Tensor]:
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    inputs = {k: moved[k] for k in ("input_ids", "labels", "attention_mask", "position_ids")}
    if "pixel_rows" in moved:
        inputs["pixel_values"] = batch_pixel_values(moved, codec)
        inputs["image_grid_thw"] = moved["image_grid_thw"]
    if "vision_labels" in moved:
        inputs["vision_labels"] = moved["vision_labels"]
    return inputs


def train_step(model: Any, probe: VisionProbe, optimizer: torch.optim.Optimizer, inputs: dict[str, torch.Tensor],
               lr: float, args: argparse.Namespace) -> torch.Tensor:
    """One optimiser step; returns [answer loss, vision loss, right answer tokens, answer tokens] on the device."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    vision_labels = inputs.pop("vision_labels", None)
    with torch.autocast(args.device_type, dtype=torch.bfloat16, enabled=args.device_type == "cuda"):
        output = model(**inputs)
        vision_loss = probe.loss(vision_labels)
    loss = output.loss
    if vision_loss is not None and args.vision_loss_weight:
        loss = loss + args.vision_loss_weight * vision_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(probe.parameters()), args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        predicted = output.logits[:, :-1].argmax(-1)
        target = inputs["labels"][:, 1:]
        counted = target != -100
        correct = ((predicted == target) & counted).sum()
        vision = vision_loss.detach() if vision_loss is not None else torch.zeros((), device=loss.device)
    return torch.stack([output.loss.detach().float(), vision.float(), correct.float(), counted.sum().float()])


def make_loader(args: argparse.Namespace, device: torch.device) -> torch.utils.data.DataLoader:
    dataset = ConversationBatches(args.out, args.seed, args.batch_size, group_size=args.group_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=args.workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None, persistent_workers=bool(args.workers))


def pick_device(name: str) -> torch.device:
    device = torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def train(args: argparse.Namespace) -> list[float]:
    """Train and save; returns the mean loss of each logging window."""
    device = pick_device(args.device)
    args.device_type = device.type
    model = make_model(args).to(device).train()
    card = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}{card}", flush=True)
    use_padded_vision_attention(model, enable=device.type == "cuda")
    probe = VisionProbe(model).to(device)
    optimizer = make_optimizer([model, probe], args, device)
    codec = PixelCodec.of(load_demo_processor(args.out).image_processor)
    start = last_save = tick = time.monotonic()
    totals = torch.zeros(4, device=device)  # summed on the device: see train_step
    window = step = 0
    losses: list[float] = []
    data_wait = 0.0
    for step, batch in enumerate(make_loader(args, device), start=1):
        data_wait += time.monotonic() - tick
        elapsed = time.monotonic() - start
        progress = max(step / args.steps, elapsed / args.time_budget if args.time_budget else 0.0)
        lr = learning_rate(step - 1, progress, args)
        totals += train_step(model, probe, optimizer, to_device(batch, device, codec), lr, args)
        window += 1
        if step % args.log_every == 0 or progress >= 1:
            sum_loss, sum_vision_loss, num_correct, num_counted = totals.tolist()
            losses.append(sum_loss / window)
            print(f"step {step:5d}  progress {progress:6.1%}  loss {losses[-1]:.4f}  "
                  f"vision loss {sum_vision_loss / window:.4f}  "
                  f"answer-token acc {num_correct / max(num_counted, 1):.4f}  lr {lr:.2e}  "
                  f"{step * args.batch_size / max(elapsed, 1e-9):.1f} conv/s  "
                  f"waiting for data {data_wait / max(elapsed, 1e-9):.0%}  {elapsed:.0f}s", flush=True)
            totals.zero_()
            window = 0
        if args.save_every and time.monotonic() - last_save > args.save_every:
            save(model, args)
            last_save = time.monotonic()
        if progress >= 1:
            break
        tick = time.monotonic()
    save(model, args)
    print(f"trained {step} steps of {args.batch_size} conversations in {time.monotonic() - start:.0f}s; "
          f"saved to {args.out}", flush=True)
    return losses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the vlmserve demo model (a tiny Qwen2-VL).")
    parser.add_argument("--out", required=True, help="checkpoint directory (written)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps (the schedule's length)")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="seconds; if set, training also ends then, the schedule compressed to fit")
    parser.add_argument("--batch-size", type=int, default=256, help="conversations per step")
    parser.add_argument("--group-size", type=int, default=4, help="conversations sharing one image")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.02)
    parser.add_argument("--warmup-steps", type=int, default=150)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--vision-loss-weight", type=float, default=0.5,
                        help="weight of the auxiliary per-token vision loss (0: off); see vision_labels.py")
    parser.add_argument("--workers", type=int, default=max(0, min(14, (os.cpu_count() or 1) - 2)),
                        help="DataLoader workers that make the batches (0: in the training process)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--init", default="", help="start from this checkpoint instead of a new model")
    parser.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints (0: end only)")
    parser.add_argument("--archive", default="", help="also write the checkpoint as this .tar after each save")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="a miniature model, for smoke tests of this script")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
