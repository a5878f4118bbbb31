"""Perplexity over a text file (sliding window) and a short greedy decode timing.

Both run through the runtime's onnxruntime CPU backend, whatever the precision: its
``full_logits`` (``model.onnx``) scores windows from an empty cache, its generate loop decodes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from gptedge.quantize.text import encode, read_text, require_tokens
from gptedge.runtime import contract
from gptedge.runtime.backend import create_backend
from gptedge.runtime.bundle import Bundle, load_bundle
from gptedge.runtime.generate import Generator

_ORT_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll / tokens)``; ``nll`` is the summed negative log-likelihood (nats) of
    ``tokens`` predicted tokens."""

    ppl: float
    tokens: int
    nll: float


def perplexity(bundle_dir: str | os.PathLike[str], text_path: str | os.PathLike[str],
               max_tokens: int | None = None) -> PerplexityResult:
    """Perplexity of the bundle on a text file, windows of the full context with stride = half.

    Every token after the first is predicted exactly once, each with at least half a context of
    left history (except in the first window). ``max_tokens`` truncates the text's ids.
    """
    bundle = load_bundle(bundle_dir)
    ids = encode(bundle, read_text(text_path, "--text"), f"--text {text_path}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    require_tokens(ids, 2, f"--text {text_path}")
    return perplexity_of_ids(bundle, ids)


def _kv_dtype(sess) -> type:
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    return _ORT_TO_NP[past[0].type] if past else np.float32


def empty_feeds(bundle: Bundle, sess, batch: int) -> dict[str, np.ndarray]:
    arch = bundle.manifest.architecture
    shape = (batch, arch.num_kv_heads, 0, arch.head_dim)
    dtype = _kv_dtype(sess)
    return {name: np.zeros(shape, dtype) for name in contract.past_names(arch.num_layers)}


def _windows(n: int, context: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window; scored targets are [first, end)."""
    stride = max(1, context // 2)
    out, prev_end, begin = [], 1, 0
    while prev_end < n:
        end = min(begin + context, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        begin += stride
    return out


def perplexity_of_ids(bundle: Bundle, ids: np.ndarray, batch: int = 8) -> PerplexityResult:
    """Perplexity of ``ids`` (1-D int64) under ``bundle``'s ``model.onnx``."""
    context = bundle.manifest.architecture.max_context
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for window in _windows(len(ids), context):
        groups.setdefault(window[1] - window[0], []).append(window)
    nll, count = 0.0, 0
    backend = create_backend("ort-cpu", bundle)
    try:
        for length, windows in groups.items():
            positions_row = np.arange(length, dtype=np.int64)
            for start in range(0, len(windows), batch):
                chunk = windows[start:start + batch]
                tokens = np.stack([ids[b:e] for b, e, _ in chunk])
                logits = backend.full_logits(tokens, np.ones_like(tokens), np.tile(positions_row, (len(chunk), 1)))
                for row, (b, e, first) in enumerate(chunk):
                    positions = np.arange(first - b - 1, e - b - 1)
                    nll += _nll(logits[row, positions], ids[first:e])
                    count += len(positions)
    finally:
        backend.close()
    return PerplexityResult(ppl=math.exp(nll / count), tokens=count, nll=nll)


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets].sum())


def greedy_tokens(bundle: Bundle, prompt: np.ndarray, steps: int) -> tuple[list[int], float]:
    """Greedy-decode ``steps`` tokens after ``prompt`` with the runtime (batch 1, EOS ignored).

    Returns (generated ids, decode tokens per second, prefill excluded)."""
    steps = max(1, min(steps, bundle.manifest.architecture.max_context - len(prompt)))
    generator = Generator(bundle, create_backend("ort-cpu", bundle))
    try:
        result = generator.generate([int(t) for t in prompt], max_new_tokens=steps, ignore_eos=True)
    finally:
        generator.close()
    return list(result.tokens), float(result.timings["decode_tokens_per_s"])
