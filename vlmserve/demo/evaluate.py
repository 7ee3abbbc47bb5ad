"""Evaluate the demo model on fresh samples with plain transformers `generate` (greedy).

    python -m vlmserve.demo.evaluate DIR --num-samples 2000 --seed 1

Prints the accuracy per question type (and overall) on `--num-samples` single-turn questions from
`shapes.sample_qa`, plus two extra rows: a question in a later turn of a conversation about the image, and questions
without an image. Exits with status 1 if any row is below `--min-accuracy` (0.97).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlmserve.demo.conversations import JSON_QTYPE, OTHER_PROMPTS, TOOL_CALL_QTYPE, TOOL_SUMMARY_QTYPE, vary
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
from vlmserve.demo.tools import (
    JSON_REQUESTS,
    JSON_SUFFIX,
    REPORT_REQUESTS,
    REPORT_SHAPES_TOOL,
    TOOL_NAME,
    TOOL_RESULTS,
    json_answer,
    parse_tool_call,
    render_like_server,
    summary,
    tool_call_arguments,
    tool_call_text,
    validate_shapes,
)

MULTI_TURN_ROW = "later turn"
NO_IMAGE_ROW = "no image"
TOOLS_PLAIN_ROW = "tool offered, a plain question"
EXTRA_ROWS = {TOOL_CALL_QTYPE: "report_shapes call (tool offered, report request)",
              TOOL_SUMMARY_QTYPE: "summary after the tool's result", JSON_QTYPE: "Answer in JSON."}


@dataclass
class Case:
    """One prompt to answer: the messages so far, the image of the first user turn, the expected answer."""

    row: str
    messages: list[dict]
    image: Image.Image | None
    expected: str
    qtype: int
    tools: list[dict] | None = None


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


def tool_cases(seed: int, num: int) -> list[Case]:
    """Per new type `num` cases: the report_shapes call, the summary once its result is back, a JSON answer (half
    of them with the tool offered), and one of the seven questions with the tool offered (a plain answer)."""
    cases = []
    for i in range(num):
        rng = random.Random(f"eval-tools:{seed}:{i}")
        scene = random_scene(rng)
        image = render(scene)
        tools = [REPORT_SHAPES_TOOL]
        request = [{"type": "image"}, {"type": "text", "text": rng.choice(REPORT_REQUESTS)}]
        call = {"id": "call_0", "type": "function",
                "function": {"name": TOOL_NAME, "arguments": tool_call_arguments(scene)}}
        cases.append(Case(str(TOOL_CALL_QTYPE), [{"role": "user", "content": request}], image,
                          tool_call_text(scene), TOOL_CALL_QTYPE, tools))
        followed: list[dict] = [{"role": "user", "content": request},
                                 {"role": "assistant", "content": "", "tool_calls": [call]},
                                 {"role": "tool", "content": rng.choice(TOOL_RESULTS), "tool_call_id": "call_0"}]
        cases.append(Case(str(TOOL_SUMMARY_QTYPE), followed, image, summary(scene), TOOL_SUMMARY_QTYPE, tools))
        text = f"{rng.choice(JSON_REQUESTS)} {JSON_SUFFIX}"
        cases.append(Case(str(JSON_QTYPE), [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                          image, json_answer(scene), JSON_QTYPE, tools if i % 2 else None))
        question, answer, qtype = random_question(scene, rng)
        cases.append(Case(TOOLS_PLAIN_ROW, [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                          "text": question}]}], image, answer, qtype, tools))
    return cases


def is_right(case: Case, answer: str) -> bool:
    """Exact answers; a call must parse, name report_shapes and carry schema-valid arguments equal to the truth."""
    if case.qtype == TOOL_CALL_QTYPE:
        parsed = parse_tool_call(answer)
        expected = parse_tool_call(case.expected)
        return parsed is not None and parsed[0] == TOOL_NAME and validate_shapes(parsed[1]) and parsed == expected
    if case.qtype == JSON_QTYPE:
        try:
            value = json.loads(answer)
        except json.JSONDecodeError:
            return False
        return validate_shapes(value) and value == json.loads(case.expected)
    if case.qtype == TOOL_SUMMARY_QTYPE:
        return answer.strip() == case.expected
    return is_correct(answer, case.expected, case.qtype)


@torch.no_grad()
def answer_cases(model: Any, processor: Any, cases: list[Case], batch_size: int, max_new_tokens: int = 128
                 ) -> list[str]:
    """Greedy answers, in batches of cases that all have an image or all have none."""
    answers: list[str] = [""] * len(cases)
    for has_image in (True, False):
        indices = [i for i, case in enumerate(cases) if (case.image is not None) == has_image]
        for start in range(0, len(indices), batch_size):
            chunk = [cases[i] for i in indices[start: start + batch_size]]
            texts = [render_like_server(processor.chat_template, c.messages, c.tools, add_generation_prompt=True)
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
        ok = is_right(case, answer)
        right[case.row] += ok
        total[case.row] += 1
        if not ok and len(misses) < 20:
            misses.append(f"  [{case.row}] {str(case.messages[-1]['content'])[-80:]!r}: expected {case.expected[:100]!r}, "
                          f"got {answer[:100]!r}")
    print("| question | samples | accuracy |\n| --- | ---: | ---: |")
    passed = True
    typed = [row for row in total if row.isdigit() and int(row) in QUESTION_TYPES]
    for row in sorted((r for r in total if r.isdigit()), key=int) + [row for row in total if not row.isdigit()]:
        accuracy = right[row] / total[row]
        passed &= accuracy >= min_accuracy
        label = row if not row.isdigit() else (
            f"{row}. {QUESTION_TYPES[int(row)]}" if int(row) in QUESTION_TYPES else f"{row}. {EXTRA_ROWS[int(row)]}")
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
    parser.add_argument("--num-tool", type=int, default=300,
                        help="cases of each tool/JSON row (call, summary, JSON, a plain question with the tool)")
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
             + no_image_cases(args.seed, args.num_extra) + tool_cases(args.seed, args.num_tool))
    answers = answer_cases(model, processor, cases, args.batch_size)
    passed = report(cases, answers, args.min_accuracy)
    print(f"evaluated {len(cases)} questions on {device} in {time.monotonic() - start:.0f}s (seed {args.seed}); "
          f"{'PASS' if passed else 'FAIL'} at {args.min_accuracy:.0%} per row")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
