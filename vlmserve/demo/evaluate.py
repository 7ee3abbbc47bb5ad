"""Evaluate the demo model on fresh samples with plain transformers `generate` (greedy).

    python -m vlmserve.demo.evaluate DIR --num-samples 2000 --seed 1

Prints the accuracy per question type (and overall) on `--num-samples` single-turn questions from
`shapes.sample_qa`, plus two extra rows: a question in a later turn of a conversation about the image, and questions
without an image. Exits with status 1 if any row is below `--min-accuracy` (0.97).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlmserve.demo.conversations import OTHER_PROMPTS, vary
from vlmserve.demo.data import load_demo_processor
from vlmserve.demo.shapes import (
    COLORS,
    NO_IMAGE_ANSWER,
    NO_IMAGE_QTYPE,
    QUESTION_TYPES,
    SHAPES,
    is_correct,
    random_question,
    random_scene,
    render,
    sample_qa,
)

MULTI_TURN_ROW = "later turn"
NO_IMAGE_ROW = "no image"


@dataclass
class Case:
    """One prompt to answer: the messages so far, the image of the first user turn, the expected answer."""

    row: str
    messages: list[dict]
    image: Image.Image | None
    expected: str
    qtype: int


def single_turn_cases(seed: int, num: int) -> list[Case]:
    cases = []
    for i in range(num):
        image, question, answer, qtype = sample_qa(seed * 1_000_000 + i)
        content = [{"type": "image"}, {"type": "text", "text": question}]
        cases.append(Case(str(qtype), [{"role": "user", "content": content}], image, answer, qtype))
    return cases


def later_turn_cases(seed: int, num: int) -> list[Case]:
    cases = []
    for i in range(num):
        rng = random.Random(f"eval-later:{seed}:{i}")
        scene = random_scene(rng)
        messages: list[dict] = []
        for turn in range(rng.randint(2, 3)):
            question, answer, qtype = random_question(scene, rng)
            content: Any = [{"type": "image"}, {"type": "text", "text": question}] if turn == 0 else question
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": answer})
        cases.append(Case(MULTI_TURN_ROW, messages[:-1], render(scene), answer, qtype))
    return cases


def no_image_cases(seed: int, num: int) -> list[Case]:
    cases = []
    for i in range(num):
        rng = random.Random(f"eval-noimage:{seed}:{i}")
        if rng.random() < 0.5:
            template = rng.choice(list(QUESTION_TYPES.values()))
            text = vary(template.format(color=rng.choice(COLORS), shape=rng.choice(SHAPES)), rng)
        else:
            text = rng.choice(OTHER_PROMPTS)
        cases.append(Case(NO_IMAGE_ROW, [{"role": "user", "content": text}], None, NO_IMAGE_ANSWER, NO_IMAGE_QTYPE))
    return cases


@torch.no_grad()
def answer_cases(model: Any, processor: Any, cases: list[Case], batch_size: int, max_new_tokens: int = 48
                 ) -> list[str]:
    """Greedy answers, in batches of cases that all have an image or all have none."""
    answers: list[str] = [""] * len(cases)
    for has_image in (True, False):
        indices = [i for i, case in enumerate(cases) if (case.image is not None) == has_image]
        for start in range(0, len(indices), batch_size):
            chunk = [cases[i] for i in indices[start: start + batch_size]]
            texts = [processor.apply_chat_template(c.messages, tokenize=False, add_generation_prompt=True)
                     for c in chunk]
            images = [c.image for c in chunk] if has_image else None
            inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
            inputs = inputs.to(model.device)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            decoded = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(indices[start: start + batch_size], decoded, strict=True):
                answers[i] = text.strip()
    return answers


def report(cases: list[Case], answers: list[str], min_accuracy: float) -> bool:
    """Print the accuracy table; True when every row reaches `min_accuracy`."""
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    misses: list[str] = []
    for case, answer in zip(cases, answers, strict=True):
        ok = is_correct(answer, case.expected, case.qtype)
        right[case.row] += ok
        total[case.row] += 1
        if not ok and len(misses) < 20:
            misses.append(f"  [{case.row}] {case.messages[-1]['content']!r}: expected {case.expected!r}, "
                          f"got {answer!r}")
    print("| question | samples | accuracy |\n| --- | ---: | ---: |")
    passed = True
    typed = [row for row in total if row.isdigit()]
    for row in sorted(typed, key=int) + [row for row in total if not row.isdigit()]:
        accuracy = right[row] / total[row]
        passed &= accuracy >= min_accuracy
        label = f"{row}. {QUESTION_TYPES[int(row)]}" if row.isdigit() else row
        print(f"| {label} | {total[row]} | {accuracy:.2%} |")
    overall = sum(right[r] for r in typed) / max(1, sum(total[r] for r in typed))
    print(f"| all seven types | {sum(total[r] for r in typed)} | {overall:.2%} |")
    if misses:
        print("some misses:\n" + "\n".join(misses))
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Accuracy of the demo model per question type.")
    parser.add_argument("model_dir")
    parser.add_argument("--num-samples", type=int, default=2000, help="single-turn questions of the seven types")
    parser.add_argument("--num-extra", type=int, default=200, help="later-turn and no-image questions, each")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--min-accuracy", type=float, default=0.97)
    args = parser.parse_args(argv)
    from transformers import AutoModelForImageTextToText

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model: Any = AutoModelForImageTextToText.from_pretrained(args.model_dir, dtype=torch.float32)
    model = model.to(device).eval()
    processor = load_demo_processor(args.model_dir)
    start = time.monotonic()
    cases = (single_turn_cases(args.seed, args.num_samples) + later_turn_cases(args.seed, args.num_extra)
             + no_image_cases(args.seed, args.num_extra))
    answers = answer_cases(model, processor, cases, args.batch_size)
    passed = report(cases, answers, args.min_accuracy)
    print(f"evaluated {len(cases)} questions on {device} in {time.monotonic() - start:.0f}s (seed {args.seed}); "
          f"{'PASS' if passed else 'FAIL'} at {args.min_accuracy:.0%} per row")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
