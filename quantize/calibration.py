"""Activation statistics of the linear layers' inputs, seen on the real generation path.

A calibration copy of ``model.onnx`` also outputs every linear layer's input. Each calibration
window is run as a prefill and then ``decode_steps`` single-token decode steps that feed
``present`` back as ``past`` (teacher-forced with the text's next tokens), so the ranges of
decode-time activations are measured too. Statistics are keyed by the layer's weight name, which
is the same in ``model.onnx`` and ``model_last.onnx``.

Scales: ``minmax`` (max |x|), ``percentile`` (of |x|) and ``entropy`` (TensorRT's KL-divergence
threshold search on the |x| histogram).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from gptedge.quantize.evaluate import empty_feeds
from gptedge.quantize.graph_io import session
from gptedge.quantize.graph_utils import float_outputs_of, initializers, linear_layers
from gptedge.runtime import contract
from gptedge.runtime.bundle import Bundle

_SAMPLE_CAP = 200_000  # |x| values kept per tensor for percentile/entropy
# Default prefill length of a calibration window. Production calibrators use 128-512 tokens; half
# of an 8k context (SmolLM2) made one batch of 4 windows hold 16k rows of every linear input plus
# 3 GB of logits, and the calibration of a 135 M model ran out of 24 GB.
DEFAULT_WINDOW_TOKENS = 256
_ACTIVATION_BUDGET = 128 << 20  # bytes of linear-layer inputs one calibration run may return


@dataclass
class ActivationStats:
    """Running statistics of one linear layer's input ``x`` [..., in].

    ``amax``: max |x|; ``channel_amax`` / ``channel_sqsum``: per input channel max |x| and sum of
    squares (SmoothQuant and Wanda); ``tokens``: rows seen; ``samples``: a uniform subsample of |x|
    (at most ``_SAMPLE_CAP`` values, each batch represented by its share of the values seen).
    """

    amax: float = 0.0
    channel_amax: np.ndarray | None = None
    channel_sqsum: np.ndarray | None = None
    tokens: int = 0
    samples: list[np.ndarray] = field(default_factory=list)
    values_seen: int = 0

    def add(self, x: np.ndarray, rng: np.random.Generator) -> None:
        rows = np.abs(x.reshape(-1, x.shape[-1]).astype(np.float32))
        self.amax = max(self.amax, float(rows.max()))
        ch_max, ch_sq = rows.max(axis=0), (rows.astype(np.float64) ** 2).sum(axis=0)
        if self.channel_amax is None:
            self.channel_amax, self.channel_sqsum = ch_max, ch_sq
        else:
            self.channel_amax = np.maximum(self.channel_amax, ch_max)
            self.channel_sqsum = self.channel_sqsum + ch_sq
        self.tokens += rows.shape[0]
        flat = rows.ravel()
        self.values_seen += flat.size
        kept = sum(s.size for s in self.samples)
        new = min(flat.size, round(_SAMPLE_CAP * flat.size / self.values_seen))
        if kept + new > _SAMPLE_CAP:  # thin the old samples to their share of the values seen
            old = np.concatenate(self.samples)
            self.samples = [rng.choice(old, min(old.size, _SAMPLE_CAP - new), replace=False)]
        self.samples.append(rng.choice(flat, new, replace=False) if new < flat.size else flat.copy())

    @property
    def amax_over_rms(self) -> float:
        """max |x| over the root mean square of every value seen (how "massive" the outliers are)."""
        assert self.channel_sqsum is not None, "no calibration rows were added"
        rms = float(np.sqrt(self.channel_sqsum.sum() / max(self.tokens * self.channel_sqsum.size, 1)))
        return self.amax / max(rms, 1e-12)

    @property
    def channel_norm(self) -> np.ndarray:
        """L2 norm of each input channel over all calibration rows (Wanda's ||X_j||)."""
        assert self.channel_sqsum is not None, "no calibration rows were added"
        return np.sqrt(self.channel_sqsum)

    def threshold(self, method: str, percentile: float = 99.99) -> float:
        """The clipping value |x| <= t used for the int8 scale t / 127."""
        if method == "minmax":
            return self.amax
        values = np.concatenate(self.samples)
        if method == "percentile":
            return float(min(self.amax, np.percentile(values, percentile)))
        return entropy_threshold(values, self.amax)


def entropy_threshold(values: np.ndarray, amax: float, bins: int = 2048, levels: int = 128) -> float:
    """TensorRT's calibration: the clip threshold minimising KL(P || Q) between the |x| histogram
    P (outliers folded into the last kept bin) and its ``levels``-level quantization Q."""
    if amax <= 0:
        return 0.0
    hist, edges = np.histogram(values, bins=bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    best, best_kl = bins, np.inf
    for i in range(levels, bins + 1, 16):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = p > 0
        q = np.zeros(i)
        for chunk in np.array_split(np.arange(i), levels):
            mass, support = hist[chunk].sum(), nonzero[chunk].sum()
            if support:
                q[chunk] = np.where(nonzero[chunk], mass / support, 0.0)
        p, q = p / p.sum(), q / max(q.sum(), 1e-12)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    return float(edges[best])


def collect_stats(bundle: Bundle, model: onnx.ModelProto, ids: np.ndarray, windows: int = 16,
                  seq_len: int | None = None, decode_steps: int = 8, batch: int | None = None,
                  seed: int = 0) -> dict[str, ActivationStats]:
    """weight name -> statistics of that linear layer's input over prefill + decode runs.

    ``ids``: calibration token ids (1-D). Windows of ``seq_len + decode_steps`` tokens are taken
    at evenly spaced offsets; ``seq_len`` defaults to half the context, at most
    ``DEFAULT_WINDOW_TOKENS``. ``batch``: windows per run (default: as many as keep the linear
    inputs of one run under ``_ACTIVATION_BUDGET``, at most 4).
    """
    arch = bundle.manifest.architecture
    layers = linear_layers(model)
    seq_len, decode_steps = _window(arch.max_context, seq_len, decode_steps)
    span = seq_len + decode_steps
    assert len(ids) >= span, "callers check the calibration length first"
    sess = session(float_outputs_of(model, [lin.activation for lin in layers]))
    # no logits: the LM head's input is an output, the head itself need not run
    out_names = [*contract.present_names(arch.num_layers), *[lin.activation for lin in layers]]
    n_present = arch.num_layers * 2
    if batch is None:
        inits = initializers(model)
        widths = sum(int(inits[lin.weight].dims[0]) for lin in layers)
        batch = max(1, min(4, _ACTIVATION_BUDGET // (span * widths * 4)))
    stats = {lin.weight: ActivationStats() for lin in layers}
    rng = np.random.default_rng(seed)
    starts = np.linspace(0, len(ids) - span, num=windows).astype(np.int64)
    for first in range(0, len(starts), batch):
        rows = np.stack([ids[s:s + span] for s in starts[first:first + batch]])
        b = rows.shape[0]
        feeds = {contract.INPUT_IDS: rows[:, :seq_len], contract.ATTENTION_MASK: np.ones((b, seq_len), np.int64),
                 contract.POSITION_IDS: np.tile(np.arange(seq_len, dtype=np.int64), (b, 1)),
                 **empty_feeds(bundle, sess, b)}
        for step in range(decode_steps + 1):
            outs = sess.run(out_names, feeds)
            for lin, value in zip(layers, outs[n_present:]):
                stats[lin.weight].add(value, rng)
            if step == decode_steps:
                break
            pos = seq_len + step
            feeds = {contract.INPUT_IDS: rows[:, pos:pos + 1],
                     contract.ATTENTION_MASK: np.ones((b, pos + 1), np.int64),
                     contract.POSITION_IDS: np.full((b, 1), pos, np.int64),
                     **dict(zip(contract.past_names(arch.num_layers), outs[:n_present]))}
    return stats


def calibration_span(bundle: Bundle, seq_len: int | None, decode_steps: int) -> int:
    """Tokens one calibration window needs (the minimum length of a calibration text)."""
    return sum(_window(bundle.manifest.architecture.max_context, seq_len, decode_steps))


def _window(context: int, seq_len: int | None, decode_steps: int) -> tuple[int, int]:
    """(prefill tokens, decode steps) of one calibration window in a ``context``-token model."""
    steps = max(0, min(decode_steps, context - 2))
    prefill = seq_len or max(2, min(context // 2, DEFAULT_WINDOW_TOKENS))
    return min(prefill, context - steps), steps
