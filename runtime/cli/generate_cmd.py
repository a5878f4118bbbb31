"""`gptedge generate BUNDLE "prompt"`: stream text to stdout, a one-line summary to stderr."""

from __future__ import annotations

import argparse
import sys

from gptedge.runtime.cli.sampling_flags import add_sampling_arguments, sampling_options


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a bundle (streams to stdout)")
    p.add_argument("bundle", help="bundle folder made by `gptedge export`")
    p.add_argument("prompt", help="prompt text (or comma-separated token ids with --ids)")
    p.add_argument("--ids", action="store_true", help="the prompt is comma-separated token ids, e.g. 1,450,3681")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    add_sampling_arguments(p)
    p.add_argument("--truncate-prompt", action="store_true", help="keep the end of a prompt that is too long")
    p.add_argument("--backend", default="auto", help="auto (default), ort-cpu, ort-cuda or tensorrt")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    p.set_defaults(func=run)


def summary_line(result, backend_name: str) -> str:
    """One line of counts and speed for stderr."""
    timings = result.timings
    return (f"{len(result.tokens)} tokens ({result.finish_reason}), TTFT {timings['ttft_s'] * 1000:.1f} ms, "
            f"decode {timings['decode_tokens_per_s']:.1f} tok/s, backend {backend_name}")


def _prompt(args: argparse.Namespace):
    if not args.ids:
        return args.prompt
    from gptedge.runtime.errors import InputError

    try:
        return [int(t) for t in args.prompt.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise InputError(f"--ids: prompt {args.prompt!r} is not comma-separated integers") from exc


def run(args: argparse.Namespace) -> int:
    from gptedge.runtime import load

    options = sampling_options(args)
    generator = load(args.bundle, backend=args.backend, threads=args.threads)
    kwargs = dict(truncate_prompt=args.truncate_prompt, options=options)
    if generator.tokenizer_info.kind == "none":  # no tokenizer to decode with: the ids are the output
        result = generator.generate(_prompt(args), **kwargs)
        sys.stdout.write(",".join(str(t) for t in result.tokens))
    elif args.no_stream:
        result = generator.generate(_prompt(args), **kwargs)
        sys.stdout.write(result.text)
    else:
        stream = generator.stream(_prompt(args), **kwargs)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        result = stream.result
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(summary_line(result, generator.backend_name), file=sys.stderr)
    return 0
