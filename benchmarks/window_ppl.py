"""Perplexity of bundles on fixed windows, each scored from its own start (issue 16's protocol).

    python benchmarks/window_ppl.py BUNDLE [BUNDLE ...] [--text wiki.test.raw] [--windows 24] [--len 256]

The first ``windows * len`` token ids of the text are cut into ``windows`` disjoint windows; each
is run as one prefill from an empty cache and its tokens 1..len-1 are scored. One window per call
keeps the logits to ``len x vocab`` floats (SmolLM2: 50 MB). Prints one line per bundle: size MB
(graphs + weights), perplexity and, from the second bundle on, the change vs the first in %;
``--decode N``: also greedy decode speed (tokens/s, N tokens after a 16-token prompt, batch 1).
"""
import argparse
import math
import sys
import time

import numpy as np

from gptedge.quantize.api import bundle_size_mb
from gptedge.quantize.evaluate import greedy_tokens
from gptedge.quantize.text import encode, read_text
from gptedge.runtime.backend import create_backend
from gptedge.runtime.bundle import load_bundle

TEXT = "/work/shared/data/wikitext-2-raw/wiki.test.raw"


def window_ppl(path: str, text: str, windows: int, length: int) -> tuple[float, float, float]:
    bundle = load_bundle(path)
    ids = encode(bundle, read_text(text, "--text"), "--text")[: windows * length]
    backend = create_backend("ort-cpu", bundle)
    nll, count, start = 0.0, 0, time.perf_counter()
    try:
        for w in range(windows):
            tokens = ids[w * length:(w + 1) * length][None, :]
            positions = np.arange(tokens.shape[1], dtype=np.int64)[None, :]
            logits = backend.full_logits(tokens, np.ones_like(tokens), positions)[0, :-1].astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            nll -= float(logp[np.arange(len(logp)), tokens[0, 1:]].sum())
            count += len(logp)
    finally:
        backend.close()
    return math.exp(nll / count), bundle_size_mb(bundle), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--len", type=int, default=256)
    parser.add_argument("--decode", type=int, default=0, metavar="N")
    args = parser.parse_args()
    first = None
    for path in args.bundles:
        ppl, size, secs = window_ppl(path, args.text, args.windows, args.len)
        first = first or ppl
        delta = "" if ppl is first else f"{100 * (ppl / first - 1):+.3f} %"
        speed = ""
        if args.decode:
            bundle = load_bundle(path)
            prompt = encode(bundle, read_text(args.text, "--text"), "--text")[:16]
            speed = f"\tdecode {greedy_tokens(bundle, prompt, args.decode)[1]:.1f} tok/s"
        sys.stdout.write(f"{path}\t{size:.1f} MB\tppl {ppl:.4f}\t{delta}{speed}\t({secs:.0f} s)\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
