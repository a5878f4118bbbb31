"""Asymmetric block quantization of a weight matrix: ``W[k, n] ~ (q[k, n] - zero[b, n]) * scale[b, n]``.

``W`` is a linear layer's weight in the graph's ``[in, out]`` orientation; blocks run along ``in``
(``b = k // block``), as MatMulNBits and blocked ``DequantizeLinear`` both want. ``q`` is unsigned
(0 .. 2**bits - 1); ``zero`` is a float (MatMulNBits takes float zero points; the QDQ writer turns
it into a float offset path, since TensorRT's ``DequantizeLinear`` wants zero-point 0).

The search minimises the activation-weighted squared error of each block,
``sum_k a_k (W[k, n] - Wq[k, n])**2`` with ``a_k = E[x_k**2]`` the mean square of input channel
``k`` on calibration text (the diagonal of the layer's Hessian ``X^T X``: the output error a weight
error causes is proportional to how large its input channel runs). Without calibration ``a = 1``:
plain MSE. Two stages, both vectorised over every block and column at once:

1. clipping search: the block range [min, max] shrunk by each ratio in ``CLIP_RATIOS``, keep the best;
2. least-squares refit: with ``q`` fixed, the (scale, zero) pair that minimises the weighted error
   in closed form, then ``q`` re-rounded, kept only where the error fell (``REFIT_ROUNDS`` times).

A weight matrix that already sits on a grid of this kind (GGUF Q4_1: blocks of 32 with a float
minimum) is reproduced exactly by stage 1 at ratio 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

CLIP_RATIOS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76)
REFIT_ROUNDS = 2
COLUMN_CHUNK = 4096


@dataclass(frozen=True)
class Blocks:
    """``q`` uint8 [k padded to whole blocks, n] (values below ``2**bits``; padding rows hold the
    zero point's rounding), ``scale``/``zero`` float32 [ceil(k / block), n], ``rows`` = k."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    block: int
    rows: int

    def dequantize(self) -> np.ndarray:
        """The float32 matrix [k, n] these blocks stand for."""
        kp, n = self.q.shape
        q = self.q.reshape(-1, self.block, n).astype(np.float32)
        return ((q - self.zero[:, None, :]) * self.scale[:, None, :]).reshape(kp, n)[:self.rows]


def quantize_blocks(weight: np.ndarray, block: int, bits: int, importance: np.ndarray | None = None,
                    search: bool = True, integer_zero: bool = False) -> Blocks:
    """Asymmetric ``bits``-bit blocks of ``weight`` [k, n] (a last partial block is padded with
    zero-weight rows that do not count in the error).

    ``importance`` [k]: per-input-channel weights of the error (None: all 1). ``search=False``:
    plain min/max rounding (RTN), for comparison. ``integer_zero``: zero points rounded to
    integers in [0, 2**bits - 1] (MatMulNBits' fast kernels and GatherBlockQuantized take only those)."""
    k, n = weight.shape
    if k % block:
        pad = block - k % block
        weight = np.concatenate([weight, np.repeat(weight[-1:], pad, axis=0)])  # in range: no effect on min/max
        importance = np.concatenate([np.ones(k, np.float32) if importance is None else importance,
                                     np.zeros(pad, np.float32)])
        padded = quantize_blocks(weight, block, bits, importance, search, integer_zero)
        return Blocks(padded.q, padded.scale, padded.zero, bits, block, k)
    if n > COLUMN_CHUNK:  # columns are independent; chunks bound the search's temporaries (LM heads)
        parts = [quantize_blocks(weight[:, i:i + COLUMN_CHUNK], block, bits, importance, search, integer_zero)
                 for i in range(0, n, COLUMN_CHUNK)]
        q, scale, zero = (np.concatenate([getattr(p, f) for p in parts], axis=1) for f in ("q", "scale", "zero"))
        return Blocks(q, scale, zero, bits, block, k)
    w = weight.astype(np.float32).reshape(k // block, block, n)
    a = _block_weights(importance, k, block)
    maxq = float(2 ** bits - 1)
    fit = partial(_fit, w, a, maxq=maxq, integer=integer_zero)
    lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
    if not search:
        lo, hi = w.min(axis=1), w.max(axis=1)
    best = None
    for ratio in CLIP_RATIOS if search else (1.0,):
        scale = _safe((hi - lo) * ratio / maxq)
        zero = -lo * ratio / scale
        best = _keep_better(best, fit(scale, zero))
        if not search:
            break
    if search:
        lo_raw, hi_raw = w.min(axis=1), w.max(axis=1)  # ranges not pinned to include 0
        scale = _safe((hi_raw - lo_raw) / maxq)
        best = _keep_better(best, fit(scale, -lo_raw / scale))
        for _ in range(REFIT_ROUNDS):
            best = _keep_better(best, fit(*_refit(w, a, best[0])))
    assert best is not None
    q, scale, zero, _ = best
    return Blocks(q.reshape(k, n).astype(np.uint8), scale.astype(np.float32), zero.astype(np.float32), bits, block, k)


def symmetric_rows(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along ``axis`` (a per-row table): (int8 values, scale)."""
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    scale = np.abs(weight).max(axis=reduce, keepdims=True).astype(np.float32) / 127.0
    scale = _safe(scale)
    q = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    return q, scale.reshape(-1)


def _block_weights(importance: np.ndarray | None, k: int, block: int) -> np.ndarray:
    if importance is None:
        return np.ones((k // block, block, 1), np.float32)
    a = np.asarray(importance, np.float64).reshape(k // block, block, 1)
    a = a / np.maximum(a.mean(axis=1, keepdims=True), 1e-30)  # only the ratios inside a block matter
    return (a + 1e-3 * (a > 0)).astype(np.float32)  # a silent channel still costs a little; padding nothing  # a silent channel still costs a little: no free rounding


def _safe(scale: np.ndarray) -> np.ndarray:
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def _fit(w, a, scale, zero, maxq, integer):
    if integer:
        zero = np.clip(np.rint(zero), 0, maxq)
    q = np.clip(np.rint(w / scale[:, None, :] + zero[:, None, :]), 0, maxq)
    err = (a * (w - (q - zero[:, None, :]) * scale[:, None, :]) ** 2).sum(axis=1)
    return q, scale, zero, err


def _keep_better(best, new):
    if best is None:
        return new
    better = new[3] < best[3]
    q = np.where(better[:, None, :], new[0], best[0])
    return (q, *(np.where(better, n, b) for n, b in zip(new[1:], best[1:], strict=True)))


def _refit(w, a, q):
    """Closed-form weighted least squares of ``w ~ s * q + c`` per block and column -> (s, -c/s)."""
    total = a.sum(axis=1)
    mq = (a * q).sum(axis=1) / total
    mw = (a * w).sum(axis=1) / total
    var = (a * (q - mq[:, None, :]) ** 2).sum(axis=1)
    cov = (a * (q - mq[:, None, :]) * (w - mw[:, None, :])).sum(axis=1)
    scale = _safe(np.where(var > 0, cov / np.where(var > 0, var, 1.0), 0.0))
    return scale, -(mw - scale * mq) / scale
