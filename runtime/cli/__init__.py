"""The ``gptedge`` command. Each subcommand is one module with ``register(subparsers)``.

Export/quantize/demo commands live with torch-using packages; they are mounted lazily so that the
runtime-only install (a Jetson app) still runs ``gptedge generate`` and gets a clear message for
the rest.
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
    ("demo", "gptedge.runtime.cli.demo_cmd", "export"),
]

MISSING_EXTRA_EXIT = 11
INTERNAL_ERROR_EXIT = 70  # an unexpected exception: a gptedge bug (EX_SOFTWARE)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one ``error:`` line (exit 2, as argparse)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gptedge", description="Export, quantize and run GPT models at the edge.")
    parser.add_argument("--version", action="version", version=f"gptedge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module_name, _extra in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("gptedge.runtime.cli."):
                continue  # command not built yet in this version
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except ModuleNotFoundError as exc:  # a command module needs a package this install lacks
        if debug:
            raise
        return _fail(f"cannot start gptedge: the '{exc.name}' package is missing; reinstall gptedge "
                     "(pip install gptedge) or add the extra the command needs", MISSING_EXTRA_EXIT)
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
        if args.debug or extra is None or exc.name not in ("torch", "safetensors", "onnxscript", "transformers"):
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
