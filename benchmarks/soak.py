"""Load and soak test of the runtime: many threads on one loaded bundle, then a long sequential run.

    python benchmarks/soak.py [--bundle DIR] [--threads 8] [--per-thread 100] [--sequential 1000] [--json]

1. Exports a small GPT-2-like bundle from random weights (4 layers x 256, vocab 512, context 256)
   in a child process (so torch never sits in this process's memory), unless --bundle is given.
2. Serial reference: greedy output of each of 16 prompts.
3. Concurrency: --threads threads x --per-thread greedy generations on ONE Generator
   (``gptedge.runtime.load(...).generate``); every output must equal the serial one, no exception.
4. Soak: --sequential greedy generations in a row; the resident set size (RSS) is sampled after
   each, and the mean RSS of the first and last 100 is reported (a leak shows as a rise).
Exit status 1 when an output differs or an exception happened.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

NEW_TOKENS = 32
N_PROMPTS = 16


def export_bundle(out: Path) -> None:
    """Random-weight GPT-2-like bundle (std 0.1 so greedy outputs differ between prompts)."""
    from gptedge.exporter import ExportConfig, export_loaded
    from gptedge.exporter.checkpoints import LoadedCheckpoint
    from gptedge.exporter.checkpoints.synthetic import random_state_dict
    from gptedge.runtime.bundle import Architecture

    arch = Architecture(vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64,
                        intermediate_size=1024, max_context=256, norm="layernorm", position="learned",
                        activation="gelu_tanh", tie_word_embeddings=True)
    checkpoint = LoadedCheckpoint(arch, random_state_dict(arch, seed=0, std=0.1), {"format": "random", "seed": 0})
    export_loaded(checkpoint, ExportConfig(validate=False), out)


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, vocab, size=int(rng.integers(4, 48))).tolist() for _ in range(N_PROMPTS)]


def concurrency(generator, cases: list[list[int]], reference: list[list[int]], threads: int,
                per_thread: int) -> dict:
    mismatches, errors, lock = [], [], threading.Lock()

    def worker(index: int) -> None:
        for i in range(per_thread):
            case = (index * 7 + i) % len(cases)
            try:
                tokens = generator.generate(cases[case], max_new_tokens=NEW_TOKENS, ignore_eos=True).tokens
            except Exception as exc:  # noqa: BLE001 - counted and reported, never swallowed silently
                with lock:
                    errors.append(f"thread {index} run {i}: {type(exc).__name__}: {exc}")
                continue
            if tokens != reference[case]:
                with lock:
                    mismatches.append((index, i, case))

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    seconds = time.perf_counter() - start
    return {"threads": threads, "generations": threads * per_thread, "mismatches": len(mismatches),
            "exceptions": len(errors), "first_errors": errors[:3], "seconds": round(seconds, 1)}


def soak(generator, cases: list[list[int]], reference: list[list[int]], count: int) -> dict:
    samples, wrong = [], 0
    start = time.perf_counter()
    for i in range(count):
        case = i % len(cases)
        if generator.generate(cases[case], max_new_tokens=NEW_TOKENS, ignore_eos=True).tokens != reference[case]:
            wrong += 1
        samples.append(rss_mib())
    window = min(100, count)
    return {"generations": count, "mismatches": wrong, "seconds": round(time.perf_counter() - start, 1),
            "rss_first100_mib": round(float(np.mean(samples[:window])), 1),
            "rss_last100_mib": round(float(np.mean(samples[-window:])), 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="use this bundle instead of exporting one")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--per-thread", type=int, default=100)
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--export-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_only:
        export_bundle(args.export_only)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            bundle = Path(tmp) / "bundle"
            subprocess.run([sys.executable, __file__, "--export-only", str(bundle)], check=True)
        return run(bundle, args)


def run(bundle: Path, args: argparse.Namespace) -> int:
    from gptedge.runtime import load

    generator = load(bundle, backend="ort-cpu")
    cases = prompts(generator.arch.vocab_size)
    reference = [generator.generate(c, max_new_tokens=NEW_TOKENS, ignore_eos=True).tokens for c in cases]
    report = {"bundle": "4 layers x 256, vocab 512 (random weights)" if args.bundle is None else str(bundle),
              "distinct_outputs": len({tuple(r) for r in reference}), "new_tokens": NEW_TOKENS,
              "backend": generator.backend_name,
              "concurrency": concurrency(generator, cases, reference, args.threads, args.per_thread),
              "sequential": soak(generator, cases, reference, args.sequential)}
    print(json.dumps(report, indent=1) if args.json else _text(report))
    bad = report["concurrency"]["mismatches"] + report["concurrency"]["exceptions"] + report["sequential"]["mismatches"]
    return 1 if bad else 0


def _text(r: dict) -> str:
    c, s = r["concurrency"], r["sequential"]
    return "\n".join([
        f"bundle: {r['bundle']}, backend {r['backend']}, {r['new_tokens']} greedy tokens per generation, "
        f"{r['distinct_outputs']} distinct reference outputs",
        f"concurrency: {c['threads']} threads, {c['generations']} generations in {c['seconds']} s: "
        f"{c['mismatches']} outputs differ from the serial run, {c['exceptions']} exceptions",
        f"sequential: {s['generations']} generations in {s['seconds']} s, {s['mismatches']} differ; "
        f"RSS mean first 100 {s['rss_first100_mib']} MiB, last 100 {s['rss_last100_mib']} MiB, "
        f"peak {s['peak_rss_mib']} MiB"])


if __name__ == "__main__":
    sys.exit(main())
