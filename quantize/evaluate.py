"""Perplexity over a text file (sliding window) and a short greedy decode timing.

Both run the bundle's graphs directly with onnxruntime on the CPU, whatever their precision:
``model.onnx`` (full logits) scores windows from an empty cache, ``model_last.onnx`` decodes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptedge.quantize.graph_io import session
from gptedge.quantize.text import encode, read_text, require_tokens
from gptedge.runtime import contract
from gptedge.runtime.bundle import Bundle, load_bundle

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
    sess = session(bundle.model_path)
    context = bundle.manifest.architecture.max_context
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for window in _windows(len(ids), context):
        groups.setdefault(window[1] - window[0], []).append(window)
    nll, count = 0.0, 0
    for _length, windows in groups.items():
        for start in range(0, len(windows), batch):
            chunk = windows[start:start + batch]
            tokens = np.stack([ids[b:e] for b, e, _ in chunk])
            logits = _run_full(bundle, sess, tokens)
            for row, (b, e, first) in enumerate(chunk):
                positions = np.arange(first - b - 1, e - b - 1)
                nll += _nll(logits[row, positions], ids[first:e])
                count += len(positions)
    return PerplexityResult(ppl=math.exp(nll / count), tokens=count, nll=nll)


def _run_full(bundle: Bundle, sess, tokens: np.ndarray) -> np.ndarray:
    batch, length = tokens.shape
    feeds = {contract.INPUT_IDS: tokens, contract.ATTENTION_MASK: np.ones((batch, length), np.int64),
             contract.POSITION_IDS: np.tile(np.arange(length, dtype=np.int64), (batch, 1)),
             **empty_feeds(bundle, sess, batch)}
    return sess.run([contract.LOGITS], feeds)[0]


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets].sum())


def greedy_tokens(bundle: Bundle, prompt: np.ndarray, steps: int) -> tuple[list[int], float]:
    """Greedy-decode ``steps`` tokens after ``prompt`` with ``model_last.onnx`` (batch 1).

    Returns (generated ids, decode tokens per second, prefill excluded)."""
    path = bundle.file("model_last") or bundle.model_path
    sess = session(Path(path))
    arch = bundle.manifest.architecture
    steps = max(1, min(steps, arch.max_context - len(prompt)))
    names = contract.present_names(arch.num_layers)
    feeds = {contract.INPUT_IDS: prompt[None, :], contract.ATTENTION_MASK: np.ones((1, len(prompt)), np.int64),
             contract.POSITION_IDS: np.arange(len(prompt), dtype=np.int64)[None, :], **empty_feeds(bundle, sess, 1)}
    out, generated, started = None, [], 0.0
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()  # decode speed excludes the prefill
        out = sess.run([contract.LOGITS, *names], feeds)
        token = int(out[0][0, -1].argmax())
        total = feeds[contract.ATTENTION_MASK].shape[1]
        if step == steps:
            break
        generated.append(token)
        feeds = {contract.INPUT_IDS: np.array([[token]], np.int64),
                 contract.ATTENTION_MASK: np.ones((1, total + 1), np.int64),
                 contract.POSITION_IDS: np.array([[total]], np.int64),
                 **dict(zip(contract.past_names(arch.num_layers), out[1:]))}
    elapsed = time.perf_counter() - started
    return generated, steps / elapsed if elapsed > 0 else float("inf")
