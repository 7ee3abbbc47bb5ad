"""Render chat templates in a sandbox with bounded output.

Templates come from model repositories, `--chat-template` files and (only with --trust-request-chat-template)
requests. Every one renders in Jinja's immutable sandbox — no attribute access to Python internals, no mutation
of the data passed in — and through `Template.generate()`, so output is counted as it is produced and a template
that would render megabytes is stopped early.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vlmserve.errors import InvalidRequestError

#: rendered prompts larger than this are refused; far above any real context window's text
MAX_RENDERED_CHARS = 4_000_000
#: `range()` items one render may create in all (nested loops multiply); real templates use a handful
MAX_RANGE_ITEMS = 100_000


class TemplateError(InvalidRequestError):
    """A chat template failed to render for this conversation (400)."""

    code = "invalid_chat_template"


def _raise_exception(message: str) -> None:
    # Templates call raise_exception("...") to reject conversations they cannot format.
    raise TemplateError(f"the chat template refused this conversation: {message}", param="messages")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


class _GenerationBlock(Extension):
    """`{% generation %}…{% endgeneration %}`, which transformers' templates use to mark assistant text for
    training masks; rendering just renders the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus: attributes it blocks raise instead of rendering as nothing, and
    repetition (`'x' * n`, `n ** m`) is refused before it allocates beyond the output cap."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} is not allowed")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if (isinstance(sequence, (str, list, tuple)) and isinstance(count, int)
                        and len(sequence) * count > MAX_RENDERED_CHARS):
                    raise TemplateError("the chat template repeats a value beyond the output cap",
                                        param="chat_template")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateError("the chat template raises a number to too large a power", param="chat_template")
        return super().call_binop(context, operator, left, right)


class _RangeBudget:
    """`range()` for one render, refusing once all its ranges together exceed MAX_RANGE_ITEMS items."""

    def __init__(self) -> None:
        self._left = MAX_RANGE_ITEMS

    def __call__(self, *args: int) -> range:
        items = range(*args)
        self._left -= len(items)
        if self._left < 0:
            raise TemplateError("the chat template loops too much", param="chat_template")
        return items


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                          extensions=["jinja2.ext.loopcontrols", _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"the chat template has a syntax error on line {exc.lineno}",
                            param="chat_template") from exc


def render_chat_template(source: str, context: dict[str, Any], *, max_chars: int = MAX_RENDERED_CHARS) -> str:
    """Render `source` with `context`; TemplateError if it fails or grows beyond `max_chars`."""
    template = _compile(source)
    pieces: list[str] = []
    size = 0
    try:
        for piece in template.generate(**context, range=_RangeBudget()):
            size += len(piece)
            if size > max_chars:
                raise TemplateError(f"the chat template rendered more than {max_chars} characters",
                                    param="chat_template")
            pieces.append(piece)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError("the chat template tried an operation the sandbox forbids",
                            param="chat_template") from exc
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
            OverflowError, RecursionError) as exc:
        raise TemplateError(f"the chat template failed to render ({type(exc).__name__})",
                            param="messages") from exc
    return "".join(pieces)
