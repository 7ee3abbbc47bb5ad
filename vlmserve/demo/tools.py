"""The demo model's tool and JSON answers: `report_shapes` in the Hermes format, and "Answer in JSON.".

The tool object here is exactly what the API hands to the chat template for a request that offers it
(`ToolParam.model_dump(exclude_none=True)`: type, then function with name, description, parameters), so training
sees the very prompt a client's request renders to. Rendering goes through the server's own path
(`render_like_server`), never through `processor.apply_chat_template`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from vlmserve.demo.shapes import COLORS, SHAPES, Scene

TOOL_NAME = "report_shapes"

#: the JSON schema of the tool's arguments and of a JSON answer: {"shapes": [{"color", "shape"}, ...]}
SHAPES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "shapes": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "color": {"type": "string", "enum": list(COLORS)},
                    "shape": {"type": "string", "enum": list(SHAPES)},
                },
                "required": ["color", "shape"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["shapes"],
    "additionalProperties": False,
}

REPORT_SHAPES_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Report every shape in the image, left to right.",
        "parameters": SHAPES_SCHEMA,
    },
}

#: requests that ask for the shapes to be reported or listed (with the tool offered: a call)
REPORT_REQUESTS = [
    "Report the shapes.", "List the shapes.", "Report the shapes in the image.", "List all the shapes.",
    "Report every shape in the image.", "Use the tool to report the shapes.", "Please list the shapes.",
    "Report the shapes, left to right.",
]
JSON_SUFFIX = "Answer in JSON."
JSON_REQUESTS = ["Describe the image.", "List the shapes.", "What shapes are there?", "Report the shapes."]
#: what a client's tool might send back; the summary does not depend on it
TOOL_RESULTS = ['{"status": "ok"}', '{"ok": true}', "ok", "Done.", "Reported.", '{"result": "success"}']


def ordered_shapes(scene: Scene) -> list[dict[str, str]]:
    """The scene's shapes left to right (the order of `shapes.describe`), as the schema's objects."""
    ordered = sorted(scene.shapes, key=lambda s: (s.center_x, s.center_y))
    return [{"color": s.color, "shape": s.kind} for s in ordered]


def json_answer(scene: Scene) -> str:
    """The answer to "... Answer in JSON.": `{"shapes": [...]}`, spaced as `json.dumps` spaces it."""
    return json.dumps({"shapes": ordered_shapes(scene)})


def tool_call_arguments(scene: Scene) -> dict[str, Any]:
    return {"shapes": ordered_shapes(scene)}


def tool_call_text(scene: Scene) -> str:
    """The assistant's output for a report request with the tool offered, byte for byte as the template writes an
    assistant turn's `tool_calls` back (so a later turn re-renders what the model produced)."""
    body = json.dumps({"name": TOOL_NAME, "arguments": tool_call_arguments(scene)}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def summary(scene: Scene) -> str:
    """The one-sentence answer once the tool's result is back: "Reported 2 shapes: a red circle and a blue square."."""
    items = [f"{'an' if s['color'][0] in 'aeiou' else 'a'} {s['color']} {s['shape']}" for s in ordered_shapes(scene)]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    count = len(items)
    return f"Reported {count} shape{'s' if count != 1 else ''}: {listed}."


def validate_shapes(value: Any) -> bool:
    """Whether `value` matches SHAPES_SCHEMA (the few keywords it uses, checked by hand: no jsonschema needed)."""
    if not isinstance(value, dict) or set(value) != {"shapes"} or not isinstance(value["shapes"], list):
        return False
    return all(isinstance(item, dict) and set(item) == {"color", "shape"} and item["color"] in COLORS
               and item["shape"] in SHAPES for item in value["shapes"])


_CALL_RE = re.compile(r"^\s*<tool_call>\s*(\{.*\})\s*</tool_call>\s*$", re.DOTALL)


def parse_tool_call(text: str) -> tuple[str, Any] | None:
    """(name, arguments) of the single Hermes call that `text` is, or None when it is anything else."""
    match = _CALL_RE.match(text)
    if match is None:
        return None
    try:
        obj = json.loads(match.group(1))
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    return obj["name"], obj.get("arguments")


def render_like_server(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                       add_generation_prompt: bool = False) -> str:
    """`messages` (this package's conversation dicts) rendered as vlmserve's PromptRenderer renders a request.

    The messages become `ChatMessage`s and go through the renderer's own message conversion and sandboxed
    template, with the same context (tokens and `tools` only when there are tools). Images are placeholders: the
    template only writes their marker.
    """
    from vlmserve.multimodal.prompt import _to_template_message
    from vlmserve.multimodal.template import render_chat_template

    conversation = [_to_template_message(_chat_message(m), None) for m in messages]
    context: dict[str, Any] = {"messages": conversation, "add_generation_prompt": add_generation_prompt,
                               "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                               "unk_token": None}
    if tools:
        context["tools"] = tools
    return render_chat_template(template, context)


def _chat_message(message: dict[str, Any]) -> Any:
    from vlmserve.types import ChatMessage, ImagePart, TextPart

    content = message.get("content")
    parts: list[Any] = []
    if isinstance(content, str):
        parts.append(TextPart(content))
    elif content:
        for part in content:
            parts.append(ImagePart(None, "demo") if part["type"] == "image" else TextPart(part["text"]))
    return ChatMessage(role=message["role"], parts=tuple(parts), tool_calls=tuple(message.get("tool_calls", ())),
                       tool_call_id=message.get("tool_call_id"))
