"""Request side of tool calling: which tools reach the template, which parser reads the output, and the grammar
that forces a call for `tool_choice: "required"` or a named function.

Legacy `functions` / `function_call` are mapped onto tools and tool_choice (the answer then comes back as
`function_call`, as OpenAI's legacy API does), and earlier legacy turns (assistant `function_call`, role
`function`) onto tool calls and tool results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vlmserve.api import schemas
from vlmserve.api.tool_parsers import PARSERS, make_parser
from vlmserve.errors import InvalidRequestError, UnsupportedFeatureError


@dataclass(frozen=True)
class ToolPlan:
    """What one request does with tools."""

    tools: list[dict[str, Any]] | None = None  # rendered into the template's tools section
    parser_name: str | None = None  # reads calls out of the output
    call_grammar: str | None = None  # Lark grammar of the calls this request allows
    is_forced: bool = False  # required / named: the output must be a call
    max_calls: int | None = None  # 1 when parallel_tool_calls is false, and for legacy function_call
    is_legacy: bool = False  # answer with `function_call` instead of `tool_calls`


def plan_tools(request: schemas.ChatCompletionRequest, parser_name: str | None, model_type: str) -> ToolPlan:
    tools, choice, is_legacy = _tools_and_choice(request)
    if not tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice names a tool but the request has no tools",
                                      param="function_call" if is_legacy else "tool_choice")
        return ToolPlan()
    choice = choice or "auto"
    if choice == "none":
        return ToolPlan()  # NOTE: "none" renders no tools at all, so the model is not tempted to call one
    if parser_name is None:
        raise UnsupportedFeatureError(
            f"tool calling has no output parser for this model family ({model_type}); start the server with "
            f"--tool-call-parser ({', '.join(PARSERS)})", param="tools")
    functions = [tool["function"] for tool in tools]
    parallel = request.parallel_tool_calls is not False and not is_legacy
    max_calls = None if parallel else 1
    parser = make_parser(parser_name, tools)
    if choice in ("auto", "required"):
        return ToolPlan(tools, parser_name, parser.grammar(functions, parallel=parallel), choice == "required",
                        max_calls, is_legacy)
    named = [f for f in functions if f["name"] == choice]
    if not named:
        raise InvalidRequestError(f"tool_choice names the function {choice!r}, which is not among the tools "
                                  f"({', '.join(f['name'] for f in functions)})",
                                  param="function_call" if is_legacy else "tool_choice")
    return ToolPlan(tools, parser_name, parser.grammar(named, parallel=False), True, 1, is_legacy)


def _tools_and_choice(request: schemas.ChatCompletionRequest) -> tuple[list[dict[str, Any]], str | None, bool]:
    """Tools as plain OpenAI dicts, the choice as "none"/"auto"/"required"/<function name>, and legacy-ness."""
    if request.functions is not None or request.function_call is not None:
        tools: list[dict[str, Any]] = [{"type": "function", "function": f.model_dump(exclude_none=True)}
                                       for f in request.functions or []]
        legacy = request.function_call
        return tools, legacy.name if isinstance(legacy, schemas.NamedFunction) else legacy, True
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools must have distinct function names", param="tools")
    choice = request.tool_choice
    return tools, choice.function.name if isinstance(choice, schemas.NamedToolChoice) else choice, False


def message_tool_fields(messages: list[schemas.ChatMessageParam]) -> list[tuple[str, tuple[dict[str, Any], ...],
                                                                                 str | None]]:
    """Per message: its role for the template, its tool calls (arguments as objects) and the call it answers.

    Legacy turns become tool turns: an assistant `function_call` gets the id `call_legacy_<i>` and the next
    `function` message answers it."""
    fields: list[tuple[str, tuple[dict[str, Any], ...], str | None]] = []
    last_legacy_id: str | None = None
    for i, message in enumerate(messages):
        role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
        calls = [(c.id, c.function) for c in message.tool_calls or []]
        if message.function_call is not None:
            last_legacy_id = f"call_legacy_{i}"
            calls.append((last_legacy_id, message.function_call))
        tool_call_id = message.tool_call_id if message.role != "function" else last_legacy_id or "call_legacy"
        fields.append((role, tuple(_template_call(call_id, function, f"messages[{i}]")
                                   for call_id, function in calls), tool_call_id))
    return fields


def _template_call(call_id: str, function: schemas.FunctionCallParam, param: str) -> dict[str, Any]:
    arguments: Any = function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise InvalidRequestError("a tool call's arguments must be JSON text", param=f"{param}.tool_calls"
                                      ) from exc
    return {"id": call_id, "type": "function", "function": {"name": function.name, "arguments": arguments}}
