"""Perplexity over a text file (sliding window) and a short greedy decode timing.

Scoring runs ``model.onnx`` in its own lean onnxruntime session, a window at a time in chunks
through the KV cache; the greedy decode runs the runtime's generate loop.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from gptedge.quantize.graph_io import release_freed_memory
from gptedge.quantize.text import encode, read_text, require_tokens
from gptedge.runtime import contract
from gptedge.runtime.backend import create_backend
from gptedge.runtime.bundle import Bundle, load_bundle
from gptedge.runtime.generate import Generator
from gptedge.runtime.ort.session_options import physical_cores, session_options

_ORT_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll / tokens)``; ``nll`` is the summed negative log-likelihood (nats) of
    ``tokens`` predicted tokens."""

    ppl: float
    tokens: int
    nll: float


def perplexity(bundle_dir: str | os.PathLike[str], text_path: str | os.PathLike[str],
               max_tokens: int | None = None, window: int | None = None,
               stride: int | None = None) -> PerplexityResult:
    """Perplexity of the bundle on a text file, windows of the full context with stride = half
    (``window``/``stride``: see :func:`perplexity_of_ids`).

    Every token after the first is predicted exactly once, each with at least half a context of
    left history (except in the first window). ``max_tokens`` truncates the text's ids.
    """
    bundle = load_bundle(bundle_dir)
    ids = encode(bundle, read_text(text_path, "--text"), f"--text {text_path}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    require_tokens(ids, 2, f"--text {text_path}")
    return perplexity_of_ids(bundle, ids, window=window, stride=stride)


def _kv_dtype(sess) -> type:
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    return _ORT_TO_NP[past[0].type] if past else np.float32


def empty_feeds(bundle: Bundle, sess, batch: int) -> dict[str, np.ndarray]:
    arch = bundle.manifest.architecture
    shape = (batch, arch.num_kv_heads, 0, arch.head_dim)
    dtype = _kv_dtype(sess)
    return {name: np.zeros(shape, dtype) for name in contract.past_names(arch.num_layers)}


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window; scored targets are [first, end)."""
    out, prev_end, begin = [], 1, 0
    while prev_end < n:
        end = min(begin + window, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        begin += stride
    return out


# Scoring memory: the KV cache of one batch and the logits of one chunk stay under these (bytes).
# Full-window logits of SmolLM2's 8k context were 1.6 GB a row (10.7 GB for the gate's batch).
_KV_BUDGET = 256 << 20
# 16 MB (85 positions of SmolLM2): onnxruntime's buffers grow with the chunk, most in fp16 graphs on
# the CPU (an fp16 bundle's scoring peaked 2.8 GB above its start at 64 MB, 0.76 GB at 16 MB).
_LOGITS_BUDGET = 16 << 20


def scoring_session(path: os.PathLike[str], threads: int | None = None) -> ort.InferenceSession:
    """A CPU session for scoring: no memory arena (its chunks would stay reserved after the run),
    no memory pattern (its one planned block for a chunk's intermediates doubled the scoring peak
    on SmolLM2: 0.96 GB instead of 1.9), no MLAS prepacking (a second copy of every weight)."""
    options = session_options(threads or physical_cores())
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def perplexity_of_ids(bundle: Bundle, ids: np.ndarray, window: int | None = None,
                      stride: int | None = None) -> PerplexityResult:
    """Perplexity of ``ids`` (1-D int64) under ``bundle``'s ``model.onnx``.

    Windows of ``window`` tokens (default: the context) every ``stride`` tokens (default: half a
    window); each token after the first is scored once, in the first window that reaches it. With
    ``stride == window`` every window is scored from its own start. A window is run in chunks
    through the KV cache, so only one chunk's logits exist at a time.
    """
    arch = bundle.manifest.architecture
    window = min(window or arch.max_context, arch.max_context)
    stride = stride or max(1, window // 2)
    kv_per_token = arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * 4
    batch = max(1, min(8, _KV_BUDGET // (window * kv_per_token)))
    chunk = max(16, min(window, _LOGITS_BUDGET // (batch * arch.vocab_size * 4)))
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in _windows(len(ids), window, stride):
        groups.setdefault(span[1] - span[0], []).append(span)
    nll, count = 0.0, 0
    sess = scoring_session(bundle.model_path)
    for spans in groups.values():
        for start in range(0, len(spans), batch):
            part = spans[start:start + batch]
            tokens = np.stack([ids[b:e] for b, e, _ in part])
            for begin, logits in _chunk_logits(bundle, sess, tokens, chunk):
                for row, (b, e, first) in enumerate(part):
                    lo, hi = max(first - b - 1, begin), min(e - b - 1, begin + logits.shape[1])
                    if lo < hi:
                        nll += summed_nll(logits[row, lo - begin:hi - begin], ids[b + lo + 1:b + hi + 1])
                        count += hi - lo
    del sess
    release_freed_memory()
    return PerplexityResult(ppl=math.exp(nll / count), tokens=count, nll=nll)


_TRIM_BYTES = 8 << 20  # smaller runs leave little to hand back, and a trim per step costs time


def _chunk_logits(bundle: Bundle, sess: ort.InferenceSession, tokens: np.ndarray, chunk: int):
    """Yield (first position, logits [B, chunk, V]) of ``tokens`` [B, S], run ``chunk`` at a time
    from an empty cache."""
    layers = bundle.manifest.architecture.num_layers
    batch, length = tokens.shape
    feeds = empty_feeds(bundle, sess, batch)
    outputs = [contract.LOGITS, *contract.present_names(layers)]
    for begin in range(0, length, chunk):
        end = min(begin + chunk, length)
        feeds.update({contract.INPUT_IDS: np.ascontiguousarray(tokens[:, begin:end]),
                      contract.ATTENTION_MASK: np.ones((batch, end), np.int64),
                      contract.POSITION_IDS: np.tile(np.arange(begin, end, dtype=np.int64), (batch, 1))})
        logits, *present = sess.run(outputs, feeds)
        feeds.update(zip(contract.past_names(layers), present))
        if logits.nbytes >= _TRIM_BYTES:  # each run's intermediates differ in size (the cache grows): trim before the next
            release_freed_memory(collect=False)
        yield begin, logits.astype(np.float32, copy=False)


def summed_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood (nats, float64 log-softmax) of ``targets`` [n] under ``logits``
    [n, vocab], ``_NLL_ROWS`` rows at a time (a 325 x 49k chunk in float64 made 0.5 GB of temporaries)."""
    total = 0.0
    for begin in range(0, len(targets), _NLL_ROWS):
        x = logits[begin:begin + _NLL_ROWS].astype(np.float64)
        x -= x.max(axis=-1, keepdims=True)
        picked = x[np.arange(len(x)), targets[begin:begin + _NLL_ROWS]]
        total += float((np.log(np.exp(x).sum(axis=-1)) - picked).sum())
    return total


_NLL_ROWS = 32


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
