"""Scoring a switchable graph: one session, a float ``mask`` input choosing per unit (a linear layer
or a linear input) between two precisions, so any plan is scored without building its bundle.

Used by the int8 static search (:mod:`gptedge.quantize.int8_search`) and by mixed precision
(:mod:`gptedge.quantize.mixed`): per-unit sensitivities on calibration windows, then the fewest
units to keep at the higher precision, measured on the evaluation text.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from gptedge.quantize.evaluate import empty_feeds, perplexity_of_ids
from gptedge.runtime import contract
from gptedge.runtime.bundle import Bundle

_LOGITS_BUDGET = 64 << 20  # bytes of logits per run: SmolLM2's 256-token window is 50 MB a row


class Scorer:
    """Mean next-token NLL (nats) of fixed windows ``tokens`` [W, L] under a mask, each window
    scored from its own start on tokens 1..L-1; rows run a few at a time so that one run's logits
    stay under ``_LOGITS_BUDGET``."""

    def __init__(self, bundle: Bundle, sess: ort.InferenceSession, tokens: np.ndarray, mask_name: str) -> None:
        self.sess, self.tokens, self.mask_name = sess, tokens, mask_name
        width, length = tokens.shape
        vocab = bundle.manifest.architecture.vocab_size
        self.rows = max(1, min(width, _LOGITS_BUDGET // (length * vocab * 4)))
        self.empty = empty_feeds(bundle, sess, self.rows)
        self.positions = np.arange(length, dtype=np.int64)

    @property
    def count(self) -> int:
        """Scored tokens."""
        return int(self.tokens.shape[0] * (self.tokens.shape[1] - 1))

    def _log_probs(self, mask: np.ndarray):
        """Yield (row slice, next-token log-probabilities [rows, L-1, V] float64) a batch at a time."""
        for start in range(0, len(self.tokens), self.rows):
            rows = self.tokens[start:start + self.rows]
            empty = self.empty if len(rows) == self.rows else {k: v[:len(rows)] for k, v in self.empty.items()}
            feeds = {contract.INPUT_IDS: rows, contract.ATTENTION_MASK: np.ones_like(rows),
                     contract.POSITION_IDS: np.tile(self.positions, (len(rows), 1)), **empty,
                     self.mask_name: mask.astype(np.float32)}
            (logits,) = self.sess.run([contract.LOGITS], feeds)
            x = logits[:, :-1].astype(np.float64)
            del logits
            x -= x.max(axis=-1, keepdims=True)
            x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
            yield slice(start, start + len(rows)), x

    def nll(self, mask: np.ndarray) -> float:
        total = 0.0
        for rows, logp in self._log_probs(mask):
            total -= float(np.take_along_axis(logp, self.tokens[rows, 1:, None], axis=-1).sum())
        return total / self.count

    def keep_reference(self, mask: np.ndarray) -> None:
        """Store the next-token distributions under ``mask`` (float32) for :meth:`kl`."""
        self.reference = [logp.astype(np.float32) for _, logp in self._log_probs(mask)]

    def kl(self, mask: np.ndarray) -> float:
        """Mean KL divergence (nats per token) from the reference distributions to those under ``mask``."""
        total = 0.0
        for ref, (_, logp) in zip(self.reference, self._log_probs(mask), strict=True):
            total += float((np.exp(ref) * (ref - logp)).sum())
        return total / self.count


def windows_of(ids: np.ndarray, length: int, spread: int | None = None) -> np.ndarray:
    """[W, length] windows of ``ids``: ``spread`` windows evenly over the text, or (None) every
    disjoint window from the start (a last partial window is dropped)."""
    length = min(length, len(ids))
    if spread is None:
        count = len(ids) // length
        return ids[:count * length].reshape(count, length)
    starts = np.linspace(0, len(ids) - length, num=spread).astype(np.int64)
    return np.stack([ids[s:s + length] for s in starts])


def source_nll(bundle: Bundle, windows: np.ndarray) -> float:
    """Mean NLL of the (float) source bundle on ``windows`` [W, L], scored as :class:`Scorer` does."""
    length = windows.shape[1]
    result = perplexity_of_ids(bundle, windows.reshape(-1), window=length, stride=length)
    return result.nll / result.tokens


def pct(nll: float, base: float) -> float:
    """Perplexity increase (%) from mean NLL ``base`` to ``nll``."""
    return 100.0 * math.expm1(nll - base)


def fewest_kept(ranked: list[int], n: int, increase: Callable[[np.ndarray], float],
                budget_pct: float, known: dict[int, float] | None = None) -> tuple[int, float, dict[int, float]]:
    """Smallest k such that keeping ``ranked[:k]`` at the higher precision (mask 0 there, 1
    elsewhere: ``increase`` takes the low-precision mask) is within ``budget_pct``; doubling, then
    bisection (the increase shrinks as k grows, up to noise). Returns (k, its increase, every k
    measured -> increase). k == n with an increase over budget: the budget cannot be met."""
    def measured(k: int) -> float:
        mask = np.ones(n)
        mask[ranked[:k]] = 0.0
        return increase(mask)

    results = dict(known or {})
    if 0 not in results:
        results[0] = measured(0)
    if results[0] <= budget_pct or n == 0:
        return 0, results[0], results
    low, high = 0, 1
    while high < n:
        results[high] = measured(high)
        if results[high] <= budget_pct:
            break
        low, high = high, min(n, high * 2)
    if high >= n:
        high = n
        if n not in results:
            results[n] = measured(n)
        if results[n] > budget_pct:
            return n, results[n], results
    while high - low > 1:
        mid = (low + high) // 2
        results[mid] = measured(mid)
        low, high = (low, mid) if results[mid] <= budget_pct else (mid, high)
    return high, results[high], results
