"""Training conversations for the demo model: chat messages in the OpenAI-like shape the chat template reads.

A conversation is a list of messages `{"role": ..., "content": ...}`; user turns that carry the image hold
`[{"type": "image"}, {"type": "text", "text": ...}]` (either order), every other turn a plain string. The image
itself travels beside the messages, exactly as the server hands prompts to the processor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image

from vlmserve.demo.shapes import (
    COLORS,
    NO_IMAGE_ANSWER,
    QUESTION_TYPES,
    SHAPES,
    Scene,
    describe,
    random_question,
    random_scene,
    render,
)
from vlmserve.demo.tools import (
    JSON_REQUESTS,
    JSON_SUFFIX,
    REPORT_REQUESTS,
    REPORT_SHAPES_TOOL,
    TOOL_NAME,
    TOOL_RESULTS,
    json_answer,
    summary,
    tool_call_arguments,
)

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You are vlmserve-demo, a tiny vision model that answers questions about shapes in pictures.",
    "Answer the question about the picture.",
    "Be concise.",
    "You are an AI assistant. Always answer in as few words as possible.",
    "You are a friendly chatbot.",
    "Look carefully at the image before you answer.",
    "",
]

OTHER_PROMPTS = [
    "Hello!", "Hi", "hello", "Hi there, how are you?", "What can you do?", "Who are you?", "Tell me a joke.",
    "What is the weather like today?", "Write a poem about the sea.", "What is in this picture?",
    "What do you see?", "Can you help me?", "Thanks!", "What is 2 + 2?", "Describe this photo.",
    "Count the objects.", "Which shape is the biggest?", "Is this a cat?", "test", "?",
    "Translate 'good morning' into French.", "What colour is the sky?", "Explain quantum computing.",
]

#: how often each question type is drawn in training: the harder ones a little more
TRAIN_TYPE_WEIGHTS = {1: 1.0, 2: 1.4, 3: 1.0, 4: 1.2, 5: 1.4, 6: 1.5, 7: 1.3}

#: answer types beyond the seven questions: a report_shapes call, the summary after its result, a JSON answer
TOOL_CALL_QTYPE = 8
TOOL_SUMMARY_QTYPE = 9
JSON_QTYPE = 10
#: how often a group of conversations offers the tool; how often a turn is a report request (tool offered) or asks
#: for JSON; how often a report request comes without the tool (then answered like "Describe the image.")
TOOLS_FRACTION = 0.3
REPORT_FRACTION = 0.45
JSON_FRACTION = 0.1
PLAIN_REPORT_FRACTION = 0.04


@dataclass
class Conversation:
    """Messages (ending with an assistant turn) and the image of the first user turn, if any."""

    messages: list[dict] = field(default_factory=list)
    image: Image.Image | None = None
    #: what the image shows (training uses it for per-token vision targets)
    scene: Scene | None = None
    #: the question type of each assistant turn (0: no image)
    qtypes: list[int] = field(default_factory=list)
    #: the tools the request offers (OpenAI tool objects), or None
    tools: list[dict] | None = None


def vary(question: str, rng: random.Random) -> str:
    """A user's spelling of a question: now and then lower case, or without its final punctuation."""
    roll = rng.random()
    if roll < 0.08:
        return question.lower()
    if roll < 0.14:
        return question.rstrip("?.")
    return question


def _random_other_question(rng: random.Random) -> str:
    if rng.random() < 0.6:
        template = rng.choice(list(QUESTION_TYPES.values()))
        return template.format(color=rng.choice(COLORS), shape=rng.choice(SHAPES))
    return rng.choice(OTHER_PROMPTS)


def _num_turns(rng: random.Random) -> int:
    # Later turns are cheap (the image is already in the sequence), so most conversations ask several questions; the
    # first turn of each is the single-turn case.
    return rng.choices([1, 2, 3, 4], [0.25, 0.25, 0.25, 0.25])[0]


def _system(rng: random.Random) -> list[dict]:
    # Without a system message the template inserts "You are a helpful assistant."
    if rng.random() < 0.75:
        return []
    return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]


def no_image_conversation(rng: random.Random) -> Conversation:
    """Questions with no image: the model says it needs one."""
    conv = Conversation(messages=_system(rng))
    for _ in range(rng.choice([1, 1, 2])):
        conv.messages.append({"role": "user", "content": _random_other_question(rng)})
        conv.messages.append({"role": "assistant", "content": NO_IMAGE_ANSWER})
        conv.qtypes.append(0)
    return conv


def _first_turn(text: str, turn: int, rng: random.Random) -> str | list[dict]:
    if turn:
        return text
    parts = [{"type": "image"}, {"type": "text", "text": text}]
    return parts if rng.random() < 0.7 else parts[::-1]


def _report_turns(conv: Conversation, scene: Scene, content: str | list[dict], rng: random.Random) -> None:
    """A report request with the tool offered: the call, the tool's result, the one-sentence summary."""
    call_id = f"call_{rng.getrandbits(40):010x}"
    conv.messages.append({"role": "user", "content": content})
    conv.messages.append({"role": "assistant", "content": "", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": TOOL_NAME, "arguments": tool_call_arguments(scene)}}]})
    conv.messages.append({"role": "tool", "content": rng.choice(TOOL_RESULTS), "tool_call_id": call_id})
    conv.messages.append({"role": "assistant", "content": summary(scene)})
    conv.qtypes += [TOOL_CALL_QTYPE, TOOL_SUMMARY_QTYPE]


def _image_turns(conv: Conversation, scene: Scene, rng: random.Random) -> None:
    if rng.random() < 0.05:  # a user who first forgot the picture
        conv.messages.append({"role": "user", "content": _random_other_question(rng)})
        conv.messages.append({"role": "assistant", "content": NO_IMAGE_ANSWER})
        conv.qtypes.append(0)
    for turn in range(_num_turns(rng)):
        roll = rng.random()
        if conv.tools and roll < REPORT_FRACTION:
            _report_turns(conv, scene, _first_turn(vary(rng.choice(REPORT_REQUESTS), rng), turn, rng), rng)
            continue
        if roll > 1 - JSON_FRACTION:
            question, answer, qtype = f"{rng.choice(JSON_REQUESTS)} {JSON_SUFFIX}", json_answer(scene), JSON_QTYPE
        elif not conv.tools and roll < PLAIN_REPORT_FRACTION:
            question, answer, qtype = rng.choice(REPORT_REQUESTS), describe(scene), 7
            question = vary(question, rng)
        else:
            question, answer, qtype = random_question(scene, rng, weights=TRAIN_TYPE_WEIGHTS)
            question = vary(question, rng)
        conv.messages.append({"role": "user", "content": _first_turn(question, turn, rng)})
        conv.messages.append({"role": "assistant", "content": answer})
        conv.qtypes.append(qtype)


def image_conversations(rng: random.Random, count: int = 1) -> list[Conversation]:
    """`count` conversations about one image: the image in the first user turn, then 1-4 questions about it.

    Several conversations share one drawn image so that the image is drawn and processed once for all of them.
    """
    scene = random_scene(rng)
    image = render(scene)
    tools = [REPORT_SHAPES_TOOL] if rng.random() < TOOLS_FRACTION else None
    conversations = []
    for _ in range(count):
        conv = Conversation(messages=_system(rng), image=image, scene=scene, tools=tools)
        _image_turns(conv, scene, rng)
        conversations.append(conv)
    return conversations


def conversation_group(rng: random.Random, count: int, no_image_fraction: float = 0.06) -> list[Conversation]:
    """`count` training conversations: either about one shared image or, now and then, without any image."""
    if rng.random() < no_image_fraction:
        return [no_image_conversation(rng) for _ in range(count)]
    return image_conversations(rng, count)
