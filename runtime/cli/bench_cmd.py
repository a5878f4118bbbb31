"""`gptedge bench BUNDLE`: median TTFT, decode tok/s, peak RSS and the runtime's own overhead."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import replace
from typing import Any


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure TTFT, decode speed and memory of a bundle")
    p.add_argument("bundle", help="bundle folder made by `gptedge export`")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (random ids; default 32, or a quarter of a "
                   "shorter context)")
    p.add_argument("--new-tokens", type=int, help="tokens to generate per run, EOS ignored (default 128, or "
                   "what is left of the context after the prompt)")
    p.add_argument("--batch", type=int, default=1, help="prompts per run (default 1)")
    p.add_argument("--runs", type=int, default=5, help="measured runs after one warm-up (default 5)")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--backend", default="auto", help="auto (default), ort-cpu, ort-cuda or tensorrt")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


class _RunTimer:
    """Wraps the engine call (onnxruntime's run_with_iobinding, else Backend.step) to add up its time."""

    def __init__(self, backend: Any) -> None:
        self.durations: list[float] = []
        session = getattr(backend, "session", None)
        owner, name = (session, "run_with_iobinding") if hasattr(session, "run_with_iobinding") else (backend, "step")
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.durations.append(time.perf_counter() - start)

        setattr(owner, name, timed)


def measure(generator: Any, prompt_len: int, new_tokens: int, batch: int, runs: int) -> dict[str, Any]:
    """Run the benchmark on a loaded :class:`~gptedge.runtime.Generator`; returns medians."""
    import numpy as np

    from gptedge.runtime.errors import InputError
    from gptedge.runtime.sampling import SamplingOptions

    if min(prompt_len, new_tokens, batch, runs) < 1:
        raise InputError("--prompt-len, --new-tokens, --batch and --runs must all be >= 1")
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, generator.arch.vocab_size, size=(batch, prompt_len)).tolist()
    options = SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True)  # greedy, exactly new_tokens
    generator.generate(prompts, options=replace(options, max_new_tokens=min(8, new_tokens)))  # warm-up
    timer = _RunTimer(generator.backend)
    ttft, tps, overhead = [], [], []
    for _ in range(runs):
        timer.durations.clear()
        result = generator.generate(prompts, options=options)[0]
        ttft.append(result.timings["ttft_s"])
        tps.append(result.timings["decode_tokens_per_s"])
        decode_wall = (new_tokens - 1) / tps[-1] if tps[-1] else 0.0
        if decode_wall:
            overhead.append(100.0 * (1.0 - sum(timer.durations[1:]) / decode_wall))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"bundle": str(generator.bundle.path), "backend": generator.backend_name,
            "threads": getattr(generator.backend, "threads", None),
            "graph": getattr(getattr(generator.backend, "model_path", None), "name", None), "prompt_len": prompt_len,
            "new_tokens": new_tokens, "batch": batch, "runs": runs,
            "ttft_ms": 1000 * statistics.median(ttft),
            "decode_tokens_per_s": statistics.median(tps),
            "decode_tokens_per_s_all_rows": batch * statistics.median(tps),
            "overhead_pct_of_decode_step": statistics.median(overhead) if overhead else None,
            "peak_rss_mib": peak_kib / 1024}


DEFAULT_PROMPT_LEN = 32
DEFAULT_NEW_TOKENS = 128


def default_lengths(max_context: int, prompt_len: int | None, new_tokens: int | None) -> tuple[int, int]:
    """(prompt_len, new_tokens): the given values, with each one left out chosen to fit ``max_context``
    (a demo bundle has only 128 tokens, less than the default 32 + 128)."""
    if prompt_len is None:
        prompt_len = min(DEFAULT_PROMPT_LEN, max(1, max_context // 4))
    if new_tokens is None:
        new_tokens = min(DEFAULT_NEW_TOKENS, max(1, max_context - prompt_len))
    return prompt_len, new_tokens


def run(args: argparse.Namespace) -> int:
    from gptedge.runtime import load

    generator = load(args.bundle, backend=args.backend, threads=args.threads)
    args.prompt_len, args.new_tokens = default_lengths(generator.max_context, args.prompt_len, args.new_tokens)
    report = measure(generator, args.prompt_len, args.new_tokens, args.batch, args.runs)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    graph = f", {report['graph']}" if report.get("graph") else ""
    table = Table(title=f"gptedge bench {report['bundle']} ({report['backend']}, {report['threads']} threads{graph})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("prompt / new tokens / batch", f"{args.prompt_len} / {args.new_tokens} / {args.batch}")
    table.add_row(f"TTFT (median of {args.runs})", f"{report['ttft_ms']:.1f} ms")
    table.add_row("decode (per sequence)", f"{report['decode_tokens_per_s']:.1f} tok/s")
    if args.batch > 1:
        table.add_row("decode (all rows)", f"{report['decode_tokens_per_s_all_rows']:.1f} tok/s")
    overhead = report["overhead_pct_of_decode_step"]
    table.add_row("runtime overhead (outside the engine)", "n/a" if overhead is None else f"{overhead:.1f} % of a step")
    table.add_row("peak RSS", f"{report['peak_rss_mib']:.0f} MiB")
    Console(file=sys.stdout).print(table)
    return 0
