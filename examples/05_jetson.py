"""Build a TensorRT engine for a bundle on this device, then generate with it.

Run it on the Jetson (or a desktop GPU with TensorRT), after copying the bundle there:

    python examples/05_jetson.py path/to/bundle --prompt "Once upon a time" --max-context 512

Steps: lint the graphs against this TensorRT, check the memory plan, build (or reuse) the engine in
``bundle/engines/``, generate greedily on backend "tensorrt".
"""

from __future__ import annotations

import argparse
import sys

from gptedge.runtime.generate import load
from gptedge.runtime.trt.build import BuildConfig, build_engine, import_tensorrt
from gptedge.runtime.trt.lint import lint_bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--prompt-ids", help="comma-separated token ids instead of text (bundles without a tokenizer)")
    parser.add_argument("--max-context", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    trt = import_tensorrt()  # BackendUnavailableError with the install hint when missing
    report = lint_bundle(args.bundle, trt.__version__)
    print(f"lint: {report.nodes_checked} nodes, {len(report.errors)} errors for {report.trt.label}")
    result = build_engine(args.bundle, BuildConfig(max_context=args.max_context))
    print(("reused " if result.reused else f"built in {result.seconds:.0f} s: ") + str(result.path))
    prompt = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else args.prompt
    with load(args.bundle, backend="tensorrt") as generator:
        out = generator.generate(prompt, max_new_tokens=args.max_new_tokens)
    print(out.text if not args.prompt_ids else out.tokens)
    print(", ".join(f"{k} {v:.3g}" for k, v in out.timings.items()))
    return 0


if __name__ == "__main__":
    from gptedge.runtime.errors import GptEdgeError

    try:
        sys.exit(main())
    except GptEdgeError as exc:  # one line with the fix, as the CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
