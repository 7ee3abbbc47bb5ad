"""The demo's tool/JSON training data matches what the server renders and parses (issue 16)."""

from __future__ import annotations

import json
import random

import pytest

from vlmserve.api import schemas
from vlmserve.api.tool_parsers.hermes import HermesParser
from vlmserve.demo import WEIGHTS_DIR
from vlmserve.demo.conversations import TOOL_CALL_QTYPE, TOOL_SUMMARY_QTYPE, conversation_group
from vlmserve.demo.shapes import random_scene
from vlmserve.demo.tools import (
    REPORT_SHAPES_TOOL,
    json_answer,
    parse_tool_call,
    render_like_server,
    summary,
    tool_call_arguments,
    tool_call_text,
    validate_shapes,
)

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / "model.safetensors").is_file(), reason="demo weights not built")


def test_the_tool_is_what_the_api_hands_the_template() -> None:
    dumped = schemas.ToolParam.model_validate(json.loads(json.dumps(REPORT_SHAPES_TOOL))).model_dump(exclude_none=True)
    assert json.dumps(dumped) == json.dumps(REPORT_SHAPES_TOOL)  # same keys in the same order


def test_answers_match_the_schema_and_the_parser() -> None:
    scene = random_scene(random.Random(5))
    assert validate_shapes(json.loads(json_answer(scene)))
    parsed = HermesParser([REPORT_SHAPES_TOOL]).parse(tool_call_text(scene), final=True)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("report_shapes", tool_call_arguments(scene))]
    assert parse_tool_call(tool_call_text(scene)) == ("report_shapes", tool_call_arguments(scene))
    assert not validate_shapes({"shapes": [{"color": "pink", "shape": "circle"}]})
    assert not validate_shapes({"shapes": [{"color": "red"}]})
    assert summary(scene).startswith(f"Reported {len(scene.shapes)} shape")


def _tool_conversation():  # type: ignore[no-untyped-def]
    for group in range(200):
        conv = conversation_group(random.Random(f"test-tools:{group}"), 1)[0]
        if conv.tools and TOOL_CALL_QTYPE in conv.qtypes:
            return conv
    raise AssertionError("no tool conversation drawn")


def test_training_tokens_are_the_servers_prompt_then_the_call() -> None:
    from transformers import AutoConfig

    from vlmserve.demo.data import ConversationEncoder, load_demo_processor
    from vlmserve.multimodal.prompt import PromptRenderer
    from vlmserve.types import ChatMessage, ImagePart, TextPart

    processor = load_demo_processor(WEIGHTS_DIR)
    encoder = ConversationEncoder(processor, AutoConfig.from_pretrained(WEIGHTS_DIR))
    conv = _tool_conversation()
    call_turn = next(i for i, m in enumerate(conv.messages) if m.get("tool_calls"))
    item = encoder.encode_group([conv])[0]
    # The same request through the server's renderer, up to the turn the model answers with the call.
    chat = []
    for message in conv.messages[:call_turn]:
        if message["role"] == "system":
            chat.append(ChatMessage(role="system", parts=(TextPart(message["content"]),)))
            continue
        content = message["content"]
        parts = (TextPart(content),) if isinstance(content, str) else tuple(
            ImagePart(conv.image, "h") if p["type"] == "image" else TextPart(p["text"]) for p in content)
        chat.append(ChatMessage(role=message["role"], parts=parts))
    renderer = PromptRenderer(processor, image_token_id=processor.image_token_id, max_model_len=4096)
    prompt = renderer.render(chat, tools=[REPORT_SHAPES_TOOL])
    n = len(prompt.token_ids)
    assert item["input_ids"][:n].tolist() == prompt.token_ids
    call = processor.tokenizer(tool_call_text(conv.scene) + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert item["labels"][n: n + len(call)].tolist() == call  # the first labelled tokens: the call, then its end
    assert int(item["labels"][n - 1]) == -100  # the assistant header before it is prompt, not learnt
    assert conv.qtypes[conv.qtypes.index(TOOL_CALL_QTYPE) + 1] == TOOL_SUMMARY_QTYPE


def test_the_call_renders_back_as_it_was_generated() -> None:
    scene = random_scene(random.Random(9))
    call = {"id": "c", "type": "function", "function": {"name": "report_shapes", "arguments": tool_call_arguments(scene)}}
    text = render_like_server(processor_template(), [{"role": "user", "content": "x"},
                                                      {"role": "assistant", "content": "", "tool_calls": [call]}],
                              [REPORT_SHAPES_TOOL])
    assert f"<|im_start|>assistant\n{tool_call_text(scene)}<|im_end|>\n" in text


def processor_template() -> str:
    return (WEIGHTS_DIR / "chat_template.jinja").read_text()
