"""Tools, structured output and reasoning against a running vlmserve (the demo model by default).

    vlmserve serve &            # the bundled demo model
    python examples/tools_and_structured.py [BASE_URL]
"""

from __future__ import annotations

import json
import sys
from typing import Literal

from openai import OpenAI
from pydantic import BaseModel, Field

client = OpenAI(base_url=sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1", api_key="unused")
MODEL = client.models.list().data[0].id

# 1. Tools: a named tool_choice forces a call; the grammar makes its arguments valid for the schema.
tools = [{"type": "function", "function": {
    "name": "count_shapes", "description": "Count the shapes of one color in the picture.",
    "parameters": {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
                   "required": ["color"]}}}]
messages = [{"role": "user", "content": "How many red shapes are there?"}]
reply = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "count_shapes"}})
call = reply.choices[0].message.tool_calls[0]
print("tool call:", call.function.name, call.function.arguments, reply.choices[0].finish_reason)

# ... run the tool, send its result back in a `tool` turn (a tool may return images too), get the answer.
messages += [reply.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"count": 2})}]
answer = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, temperature=0, max_tokens=20)
print("answer after the tool:", answer.choices[0].message.content)


# 2. Structured output: a Pydantic model as response_format; the reply is parsed into it.
class ShapeCount(BaseModel):
    color: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=9)


parsed = client.chat.completions.parse(model=MODEL, response_format=ShapeCount, temperature=0,
                                       messages=[{"role": "user", "content": "How many red shapes are there?"}])
print("structured:", parsed.choices[0].message.parsed)
