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
from vlmserve.demo.data import (
    ConversationBatches,
    PixelCodec,
    VisionBatches,
    batch_pixel_values,
    load_demo_processor,
)
from vlmserve.demo.vision_labels import IGNORE, LABEL_CLASSES, LABEL_GROUPS

#: answer types logged: 0 (no image), the seven question types, the tool call, the summary after it, JSON
NUM_TYPES = 11

PROCESSOR_FILES = ("chat_template.jinja", "chat_template.json", "preprocessor_config.json", "tokenizer.json",
                   "tokenizer_config.json")

# NOTE: transformers runs the vision tower's attention one image at a time unless the attention implementation's
# name contains "flash", in which case it makes one call with the packed sequence lengths. This implementation
# pads the images into one batch and runs SDPA with a key mask: the same numbers, one call per layer, which
# matters with hundreds of images per training batch. Training only; the saved model uses plain "sdpa".
PADDED_VISION_ATTENTION = "padded_flash_demo"
#: the probe's name inside the `--archive` tar (outside it, it lives beside the checkpoint: `probe_path`)
ARCHIVED_PROBE = "vision_probe.pt"


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
    """Training-only linear probe on the vision tower's output: each token's `vision_labels.LABEL_CLASSES`.

    See `vlmserve.demo.vision_labels`. It reads the merger's output through a forward hook, so the model runs its
    ordinary forward; it is not part of the saved model (training keeps it beside the checkpoint, `probe_path`).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(model.config.text_config.hidden_size, sum(LABEL_CLASSES.values()))
        self._features: list[torch.Tensor] = []
        model.model.visual.merger.register_forward_hook(lambda module, args, output: self._features.append(output))

    def loss(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The summed cross-entropy of every label column; accuracies per column in `self.accuracy`."""
        features, self._features = self._features, []
        if labels is None or not features:
            return None
        # Normalised first: the probe starts with logits of unit scale whatever the features' scale.
        hidden = features[-1].float()
        logits = self.proj(F.layer_norm(hidden, hidden.shape[-1:]))
        columns = logits.split(list(LABEL_CLASSES.values()), dim=-1)
        losses, accuracy = [], []
        for column, part in enumerate(columns):
            if column == 0:
                # Most tokens are background, which is learnt at once; averaged over all tokens, the shapes'
                # tokens would weigh little beside the other columns (which count shape tokens only) and the
                # shape (circle, square, triangle) stayed at chance. Background and shapes count as much.
                shape = labels[:, 0] > 0
                losses.append(_cross_entropy(part, torch.where(shape, IGNORE, labels[:, 0])) + 2 * _cross_entropy(
                    part, torch.where(shape, labels[:, 0], IGNORE)))
            else:
                losses.append(_cross_entropy(part, labels[:, column]))
            # the object column's accuracy over the shapes' tokens only (the background is learnt at once)
            valid = labels[:, column] > 0 if column == 0 else labels[:, column] != IGNORE
            right = (part.argmax(-1) == labels[:, column]) & valid
            accuracy.append(right.sum().float() / valid.sum().clamp(min=1))
        total = logits.new_zeros(())
        group_accuracy = []
        for members in LABEL_GROUPS.values():
            total = total + torch.stack([losses[i] for i in members]).mean()
            group_accuracy.append(torch.stack([accuracy[i] for i in members]).mean())
        self.accuracy = torch.stack(group_accuracy).detach()
        return total

    def load_compatible(self, state: dict[str, torch.Tensor]) -> None:
        """Load a probe saved with fewer label columns: the columns it has, in the same order."""
        with torch.no_grad():
            for name, value in state.items():
                target = getattr(self.proj, name.removeprefix("proj."))
                target[: len(value)] = value


def probe_path(out: str | Path) -> Path:
    """Where training keeps the probe: beside the checkpoint folder, never inside it."""
    return Path(f"{Path(out).resolve()}.probe.pt")


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
        if args.init_vision:
            load_vision(model, args.init_vision)
    model.save_pretrained(out)  # the data workers read config and processor files from here
    return model


def load_vision(model: Any, source: str | Path) -> None:
    """The vision tower and merger of the checkpoint `source` into a new model whose language model may be wider.

    The merger's last layer writes the language model's width: where that grew, the old rows fill the first
    outputs and the new ones keep their fresh initialisation (the language model is new anyway).
    """
    from safetensors.torch import load_file

    state = {k.removeprefix("model.").removeprefix("visual."): v for k, v in
             load_file(str(Path(source, "model.safetensors"))).items() if k.removeprefix("model.").startswith("visual.")}
    own = model.model.visual.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            target = own[name]
            if target.shape == value.shape:
                target.copy_(value)
            elif target.shape[1:] == value.shape[1:] and target.shape[0] >= value.shape[0]:
                target[: value.shape[0]] = value
            else:
                raise ValueError(f"{source}: vision weight {name} {tuple(value.shape)} does not fit "
                                 f"{tuple(target.shape)}")
    missing = set(own) - set(state)
    if missing:
        raise ValueError(f"{source}: no vision weights for {sorted(missing)[:3]}")
    print(f"vision tower and merger loaded from {source}", flush=True)


def make_optimizer(model: Any, probe: torch.nn.Module, args: argparse.Namespace, device: torch.device
                   ) -> torch.optim.Optimizer:
    """AdamW; the vision tower and merger at `lr * vision_lr_scale`; only they and the probe with `vision_only`."""
    visual = list(model.model.visual.parameters())
    visual_ids = {id(p) for p in visual}
    rest = [] if args.vision_only else [p for p in model.parameters() if id(p) not in visual_ids]
    groups = []
    for params, scale in ((visual, args.vision_lr_scale), (rest, 1.0), (list(probe.parameters()), 1.0)):
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "weight_decay": args.weight_decay if decay else 0.0,
                               "lr_scale": scale})
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8, fused=device.type == "cuda")


def save(model: Any, args: argparse.Namespace, probe: torch.nn.Module | None = None) -> None:
    use_padded_vision_attention(model, enable=False)
    model.save_pretrained(args.out)
    use_padded_vision_attention(model)
    if probe is not None:
        torch.save(probe.state_dict(), probe_path(args.out))
    if args.archive:
        tmp = f"{args.archive}.tmp"
        with tarfile.open(tmp, "w") as tar:
            for file in sorted(Path(args.out).iterdir()):
                tar.add(file, arcname=file.name)
            if probe is not None:  # so that a resumed run (gpu_run.sh RESUME=) continues with its probe
                tar.add(probe_path(args.out), arcname=ARCHIVED_PROBE)
        os.replace(tmp, args.archive)


def to_device(batch: dict[str, torch.Tensor], device: torch.device, codec: PixelCodec | None
              ) -> dict[str, torch.Tensor]:
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    inputs: dict[str, torch.Tensor] = {
        k: moved[k] for k in ("input_ids", "labels", "attention_mask", "position_ids", "answer_types") if k in moved}
    if "pixel_rows" in moved:
        inputs["pixel_values"] = batch_pixel_values(moved, codec)
        inputs["image_grid_thw"] = moved["image_grid_thw"]
    if "vision_labels" in moved:
        inputs["vision_labels"] = moved["vision_labels"]
    return inputs


def train_step(model: Any, probe: VisionProbe, optimizer: torch.optim.Optimizer, inputs: dict[str, torch.Tensor],
               lr: float, args: argparse.Namespace) -> torch.Tensor:
    """One optimiser step; returns `stats_vector` on the device."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    vision_labels = inputs.pop("vision_labels", None)
    types = inputs.pop("answer_types", None)
    with torch.autocast(args.device_type, dtype=torch.bfloat16, enabled=args.device_type == "cuda"):
        if args.vision_only:
            model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            answers = None
        else:
            answers = answer_logits(model, inputs)
        vision_loss = probe.loss(vision_labels)
    answer_loss = F.cross_entropy(answers[0].float(), answers[1]) if answers is not None else None
    loss = answer_loss if answer_loss is not None else vision_loss
    if answer_loss is not None and vision_loss is not None and args.vision_loss_weight:
        loss = loss + args.vision_loss_weight * vision_loss
    assert loss is not None, "a step has an answer loss, a vision loss, or both"
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(probe.parameters()), args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats_vector(answers, answer_loss, types, vision_loss, probe)


def answer_logits(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the answer positions only: the output layer runs on the few tokens that are learnt."""
    labels = inputs["labels"]
    hidden = model.model(**{k: v for k, v in inputs.items() if k != "labels"}).last_hidden_state
    valid = labels[:, 1:] != IGNORE
    return model.lm_head(hidden[:, :-1][valid]), labels[:, 1:][valid]


def stats_vector(answers: tuple[torch.Tensor, torch.Tensor] | None, answer_loss: torch.Tensor | None,
                 types: torch.Tensor | None, vision_loss: torch.Tensor | None, probe: VisionProbe) -> torch.Tensor:
    """[answer loss, vision loss, probe accuracy per label column..., right answers per type..., answers per type...].

    An answer is right when every one of its tokens (and its end-of-turn token) is the argmax under teacher forcing,
    which is exactly when greedy decoding would have produced it.
    """
    with torch.no_grad():
        device = probe.proj.weight.device
        vision = vision_loss.detach().float() if vision_loss is not None else torch.zeros((), device=device)
        accuracy = getattr(probe, "accuracy", torch.zeros(len(LABEL_GROUPS), device=device))
        right = torch.zeros(NUM_TYPES, device=device)
        total = torch.zeros(NUM_TYPES, device=device)
        loss = answer_loss.detach().float() if answer_loss is not None else torch.zeros((), device=device)
        if answers is not None and types is not None:
            logits, target = answers
            full = types[:, 1:].flatten()
            kinds = full[full >= 0]  # the answer positions, in the order of `answers`
            starts = torch.ones_like(kinds, dtype=torch.bool)
            positions = torch.nonzero(full >= 0).flatten()
            starts[1:] = positions[1:] != positions[:-1] + 1
            span = torch.cumsum(starts.long(), 0) - 1
            wrong = torch.zeros(int(starts.sum()), device=device).index_add_(
                0, span, (logits.argmax(-1) != target).float())
            total = torch.bincount(kinds[starts], minlength=NUM_TYPES).float()
            right = torch.bincount(kinds[starts], weights=(wrong == 0).float(), minlength=NUM_TYPES).float()
        return torch.cat([loss[None], vision[None], accuracy, right, total])


def make_loader(args: argparse.Namespace, device: torch.device) -> torch.utils.data.DataLoader:
    dataset: torch.utils.data.IterableDataset
    if args.vision_only:
        dataset = VisionBatches(args.out, args.seed, args.batch_size)
    else:
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


def log_line(step: int, progress: float, lr: float, sums: list[float], window: int, args: argparse.Namespace,
             elapsed: float, data_wait: float) -> str:
    """One progress line: losses, the probe's accuracy per label column, right answers per question type."""
    num_columns = len(LABEL_GROUPS)
    loss, vision_loss = sums[0] / window, sums[1] / window
    probe = " ".join(f"{name} {v / window:.3f}" for name, v in zip(LABEL_GROUPS, sums[2: 2 + num_columns],
                                                                   strict=True))
    right, total = sums[2 + num_columns: 2 + num_columns + NUM_TYPES], sums[2 + num_columns + NUM_TYPES:]
    answers = " ".join(f"{t}:{right[t] / total[t]:.3f}" if total[t] else f"{t}:-" for t in range(NUM_TYPES))
    unit = "images" if args.vision_only else "conv"
    return (f"step {step:5d}  progress {progress:6.1%}  loss {loss:.4f}  vision loss {vision_loss:.4f}  "
            f"probe [{probe}]  right answers by type [{answers}] of {int(sum(total))}  lr {lr:.2e}  "
            f"{step * args.batch_size / max(elapsed, 1e-9):.1f} {unit}/s  "
            f"waiting for data {data_wait / max(elapsed, 1e-9):.0%}  {elapsed:.0f}s")


def train(args: argparse.Namespace) -> list[float]:
    """Train and save; returns the mean loss (the vision loss with `vision_only`) of each logging window."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.device_type = device.type
    model = make_model(args).to(device).train()
    card = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}{card}", flush=True)
    use_padded_vision_attention(model)
    probe = VisionProbe(model).to(device)
    if args.init and probe_path(args.init).is_file():
        probe.load_compatible(torch.load(probe_path(args.init), map_location=device))
    optimizer = make_optimizer(model, probe, args, device)
    codec = PixelCodec.of(load_demo_processor(args.out).image_processor)
    start = last_save = tick = time.monotonic()
    totals = torch.zeros(2 + len(LABEL_GROUPS) + 2 * NUM_TYPES, device=device)  # summed on the device
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
            sums = totals.tolist()
            losses.append(sums[1 if args.vision_only else 0] / window)
            print(log_line(step, progress, lr, sums, window, args, elapsed, data_wait), flush=True)
            totals.zero_()
            window = 0
        if args.save_every and time.monotonic() - last_save > args.save_every:
            save(model, args, probe)
            last_save = time.monotonic()
        if progress >= 1:
            break
        tick = time.monotonic()
    save(model, args, probe)
    print(f"trained {step} steps of {args.batch_size} {'images' if args.vision_only else 'conversations'} in "
          f"{time.monotonic() - start:.0f}s; saved to {args.out}", flush=True)
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
    parser.add_argument("--init-vision", default="",
                        help="a new model, but its vision tower and merger from this checkpoint (the language "
                             "model may be wider: the merger's new outputs start fresh)")
    parser.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints (0: end only)")
    parser.add_argument("--archive", default="", help="also write the checkpoint as this .tar after each save")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--vision-only", action="store_true",
                        help="train only the vision tower, merger and probe on images with per-token labels "
                             "(--batch-size counts images)")
    parser.add_argument("--vision-lr-scale", type=float, default=1.0,
                        help="the vision tower's and merger's learning rate relative to --lr")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the trainer (0: torch's default)")
    parser.add_argument("--tiny", action="store_true", help="a miniature model, for smoke tests of this script")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
