"""`gptedge chat BUNDLE`: chat in the terminal with the bundle's chat template (the KV cache is kept
between turns), or answer one `--message`."""

from __future__ import annotations

import argparse
import sys

from gptedge.runtime.cli.generate_cmd import summary_line
from gptedge.runtime.cli.sampling_flags import add_sampling_arguments, sampling_options


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a bundle using its chat template (greedy by default)")
    p.add_argument("bundle", help="bundle folder made by `gptedge export` (with a chat template)")
    p.add_argument("--system", help="system message that opens the conversation")
    p.add_argument("--message", help="answer this one user message and exit (default: read lines from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (default 256)")
    add_sampling_arguments(p)
    p.add_argument("--backend", default="auto", help="auto (default), ort-cpu, ort-cuda or tensorrt")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptedge.runtime import load
    from gptedge.runtime.chat import template_source

    options = sampling_options(args)
    generator = load(args.bundle, backend=args.backend, threads=args.threads)
    template_source(generator.bundle)  # no template: one clear line before any prompt is shown
    session = generator.session(system=args.system)
    if args.message is not None:
        result = session.chat(args.message, options=options)
        print(result.text)
        print(summary_line(result, generator.backend_name), file=sys.stderr)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message and Enter; Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            return 0
        if not line.strip():
            continue
        result = session.chat(line.rstrip("\n"), options=options)
        print(result.text, flush=True)
        if interactive:
            print(summary_line(result, generator.backend_name), file=sys.stderr)
