"""The ``gptedge`` command. Each subcommand is one module with ``register(subparsers)``.

Export/quantize/demo commands live with torch-using packages; they are mounted lazily so that the
runtime-only install (a Jetson app) still runs ``gptedge generate`` and gets a clear message for
the rest. A command module that cannot be imported is a broken install and raises; only a command
whose documented extra is missing (``gptedge export`` without torch) answers with one line naming
the extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from gptedge.runtime import __version__
from gptedge.runtime.errors import GptEdgeError, InputError

# (command, module that registers it, pip extra it needs or None)
COMMANDS: list[tuple[str, str, str | None]] = [
    ("export", "gptedge.runtime.cli.export_cmd", "export"),
    ("inspect", "gptedge.runtime.cli.inspect_cmd", None),
    ("generate", "gptedge.runtime.cli.generate_cmd", None),
    ("chat", "gptedge.runtime.cli.chat_cmd", None),
    ("bench", "gptedge.runtime.cli.bench_cmd", None),
    ("eval", "gptedge.runtime.cli.eval_cmd", None),
    ("quantize", "gptedge.runtime.cli.quantize_cmd", None),
    ("lint", "gptedge.runtime.cli.lint_cmd", None),
    ("plan", "gptedge.runtime.cli.plan_cmd", None),
    ("build", "gptedge.runtime.cli.build_cmd", None),
    ("triton", "gptedge.runtime.cli.triton_cmd", None),
    ("demo", "gptedge.runtime.cli.demo_cmd", "export"),
    ("serve", "gptedge.runtime.cli.serve_cmd", "serve"),
]

# Packages that come with an extra (pyproject's optional-dependencies), not with gptedge itself.
EXTRA_PACKAGES = ("torch", "safetensors", "onnxscript", "transformers", "fastapi", "uvicorn", "starlette",
                  "pydantic", "prometheus_client")
MISSING_EXTRA_EXIT = 11
INTERNAL_ERROR_EXIT = 70  # an unexpected exception: a gptedge bug (EX_SOFTWARE)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one ``error:`` line (exit 2, as argparse)."""

    unavailable: dict[str, ModuleNotFoundError]  # see build_parser

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser() -> OneLineParser:
    """The parser with every command mounted. ``parser.unavailable`` maps a command whose extra is
    not installed to the ModuleNotFoundError its module raised (the command is listed, not runnable);
    any other import failure of a command module propagates."""
    parser = OneLineParser(prog="gptedge", description="Export, quantize and run GPT models at the edge.")
    parser.add_argument("--version", action="version", version=f"gptedge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.unavailable = {}
    for name, module_name, extra in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if extra is None or (exc.name or "").split(".")[0] not in EXTRA_PACKAGES:
                raise
            parser.unavailable[name] = exc
            subparsers.add_parser(name, help=f"(needs: pip install 'gptedge[{extra}]')")
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # the top-level options take no value, so the first other word is the command
    command = next((word for word in argv if not word.startswith("-")), None)
    if command in parser.unavailable:
        exc = parser.unavailable[command]
        if "--debug" in argv:
            raise exc
        return _fail(f"`gptedge {command}` needs the '{exc.name}' package; install it with: "
                     f"pip install 'gptedge[{_extra_for(command)}]'", MISSING_EXTRA_EXIT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GptEdgeError as exc:
        if args.debug:
            raise
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        extra = _extra_for(args.command)
        if args.debug or extra is None or exc.name not in EXTRA_PACKAGES:
            raise
        return _fail(f"`gptedge {args.command}` needs the '{exc.name}' package; "
                     f"install it with: pip install 'gptedge[{extra}]'", MISSING_EXTRA_EXIT)
    except OSError as exc:  # a file the user named cannot be read or written (permissions, disk full ...)
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}; check the path and its permissions",
                     InputError.exit_code)
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: one line, traceback with --debug
        if args.debug:
            raise
        return _fail(f"unexpected {type(exc).__name__}: {exc}. This is a gptedge bug; rerun with --debug "
                     "and report the traceback", INTERNAL_ERROR_EXIT)


def _fail(message: str, code: int) -> int:
    """Print ``message`` as one ``error:`` line on stderr (library messages may hold newlines)."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return code


def _extra_for(command: str) -> str | None:
    return next((extra for name, _m, extra in COMMANDS if name == command), None)


if __name__ == "__main__":
    sys.exit(main())
