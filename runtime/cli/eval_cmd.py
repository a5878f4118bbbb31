"""`gptedge eval BUNDLE --text FILE`: perplexity of a bundle on a text file (sliding window)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity of a bundle on a text file")
    p.add_argument("bundle", type=Path, help="bundle folder")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file to score")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    p.add_argument("--window", type=int, help="tokens per scored window (default: the context)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: half a window; "
                                              "= --window scores every window from its own start)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gptedge.quantize.evaluate import perplexity
    from gptedge.runtime.errors import InputError

    if args.max_tokens is not None and args.max_tokens < 2:
        raise InputError(f"--max-tokens {args.max_tokens}: must be at least 2")
    for flag, value in (("--window", args.window), ("--stride", args.stride)):
        if value is not None and value < 2:
            raise InputError(f"{flag} {value}: must be at least 2")
    result = perplexity(args.bundle, args.text, max_tokens=args.max_tokens, window=args.window, stride=args.stride)
    if args.json:
        print(json.dumps({"bundle": str(args.bundle), "text": str(args.text), "ppl": result.ppl,
                          "tokens": result.tokens, "nll": result.nll}))
    else:
        Console().print(f"perplexity [bold]{result.ppl:.4f}[/bold] over {result.tokens} tokens of {args.text}")
    return 0
