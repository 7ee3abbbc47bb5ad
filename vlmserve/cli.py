"""The `vlmserve` command: serve, chat, download. Serve flags are derived from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from vlmserve import __version__
from vlmserve.config import SECTIONS, Config, ConfigError

_SCALARS = {"int": int, "float": float, "str": str}


def _flag(name: str) -> str:
    """The flag of a config field that does not name its own (`option(flag=...)`)."""
    return "--" + name.replace("_", "-")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options", cls.__doc__)
        for f in dataclasses.fields(cls):
            _add_field(group, section, f)


def _add_field(group: Any, section: str, f: dataclasses.Field[Any]) -> None:
    meta = f.metadata
    annotation = str(f.type)
    help_text = meta["help"] + (f" Example: {meta['example']}" if meta.get("example") else "")
    dest = f"{section}.{f.name}"
    if meta.get("positional"):
        group.add_argument(dest, nargs="?", default=f.default, metavar=meta.get("metavar"), help=help_text)
        return
    kwargs: dict[str, Any] = {"dest": dest, "default": f.default, "help": help_text}
    if annotation == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
    else:
        if annotation.startswith("tuple["):
            kwargs["nargs"] = "+"
            kwargs["type"] = _SCALARS[annotation[len("tuple["):].split(",")[0]]
        else:
            kwargs["type"] = _SCALARS[annotation.split(" |")[0]]
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
    group.add_argument(meta.get("flag") or _flag(f.name), **kwargs)


def config_from_args(args: argparse.Namespace) -> Config:
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for dest, value in vars(args).items():
        section, _, name = dest.partition(".")
        if section in values and name:
            values[section][name] = tuple(value) if isinstance(value, list) else value
    return Config(**{section: SECTIONS[section](**fields) for section, fields in values.items()})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmserve", description="Serve vision-language models behind the "
                                     "OpenAI API.")
    parser.add_argument("--version", action="version", version=f"vlmserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="start the OpenAI-compatible server", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start the server. With no MODEL, serves the bundled demo model.",
        epilog="examples:\n  vlmserve serve\n  vlmserve serve Qwen/Qwen2-VL-2B-Instruct --port 8888\n"
               "  vlmserve serve modelscope:ZhipuAI/glm-4v-9b --served-model-name glm-4v --api-key sk-local\n"
               "  vlmserve serve ./my-model --allowed-local-media-path /srv/images")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                       help="Server log verbosity. Example: --log-level DEBUG")
    _add_config_arguments(serve)

    from vlmserve.chat_client import add_chat_arguments

    add_chat_arguments(commands.add_parser("chat", help="chat with a running server from the terminal",
                                           description="Stream an answer from a running vlmserve (or any "
                                           "OpenAI-compatible) server."))

    download = commands.add_parser("download", help="fetch a model ahead of time for offline use")
    download.add_argument("model", help="a Hugging Face id or 'modelscope:ORG/NAME'")
    download.add_argument("--revision", default=None, help="branch, tag or commit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from vlmserve.serve import configure_logging, run

        configure_logging(args.log_level)
        try:
            config = config_from_args(args)
        except ConfigError as exc:
            parser.error(str(exc))
        if config.ray.ray:
            from vlmserve.ray.app import run as run_on_ray

            return run_on_ray(config)
        return run(config)
    if args.command == "chat":
        from vlmserve.chat_client import run_chat

        return run_chat(args)
    if args.command == "download":
        from vlmserve.errors import ModelLoadError
        from vlmserve.models.loader import resolve_model_path

        try:
            print(resolve_model_path(args.model, revision=args.revision))
        except ModelLoadError as exc:
            print(f"vlmserve download: {exc.message}", file=sys.stderr)
            return 1
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
