"""Choosing the next token from the last logits row: pure numpy functions, no state.

Every function takes ``logits`` of shape ``[vocab]`` (float32 or float64) for ONE sequence and
returns a new array (inputs are never modified). :class:`SamplingOptions` validates the user's
arguments once; :func:`choose_token` applies them in the usual order: repetition penalty ->
greedy (temperature 0) or temperature -> top-k -> top-p -> draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from gptedge.runtime.errors import GenerationError


@dataclass(frozen=True)
class SamplingOptions:
    """How one generation call picks and stops tokens, validated once when it is made.

    ``temperature`` 0 means greedy (argmax); ``top_k`` keeps the k most likely tokens; ``top_p``
    keeps the smallest set whose probability reaches p (nucleus); ``repetition_penalty`` > 1
    discourages tokens already in the prompt or output (CTRL / HF convention). ``seed`` makes
    sampling reproducible (one ``np.random.Generator`` per call). ``max_new_tokens``: tokens to
    generate at most; ``stop``: text that ends the generation (a string or a list of strings,
    stored as a tuple); ``ignore_eos``: keep generating past EOS. Every bad value raises a
    :class:`GenerationError` naming the argument.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not np.isfinite(t) or t < 0:
            raise GenerationError(f"temperature={t!r}: must be a number >= 0 (0 = greedy)")
        if self.top_k is not None and not _is_int(self.top_k, minimum=1):
            raise GenerationError(f"top_k={self.top_k!r}: must be an integer >= 1 (or None for no limit)")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise GenerationError(f"top_p={self.top_p!r}: must be in (0, 1] (or None for no limit)")
        rp = self.repetition_penalty
        if rp is not None and not (isinstance(rp, (int, float)) and np.isfinite(rp) and rp > 0):
            raise GenerationError(f"repetition_penalty={rp!r}: must be a number > 0 (1 = off, > 1 discourages repeats)")
        if self.seed is not None and not _is_int(self.seed, minimum=0):
            raise GenerationError(f"seed={self.seed!r}: must be an integer >= 0 (or None for a random seed)")
        if not _is_int(self.max_new_tokens, minimum=1):
            raise GenerationError(f"max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1")
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        object.__setattr__(self, "stop", normalize_stop(self.stop))
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))

    @classmethod
    def of(cls, options: SamplingOptions | None, **keywords: Any) -> SamplingOptions:
        """``options`` when given, else the options the sampling ``keywords`` (the keyword arguments
        of :meth:`~gptedge.runtime.generate.Generator.generate`) describe. Passing ``options`` and a
        keyword that differs from its default is refused: one of them would be silently ignored."""
        from_keywords = cls(**keywords)
        if options is None:
            return from_keywords
        if not isinstance(options, SamplingOptions):
            raise GenerationError(f"options={options!r}: must be a SamplingOptions (or None)")
        default = cls()
        given = [f.name for f in fields(cls) if getattr(from_keywords, f.name) != getattr(default, f.name)]
        if given:
            raise GenerationError(f"got options=SamplingOptions(...) and {', '.join(given)}=...; pass the sampling "
                                  "settings one way: in options, or as keyword arguments")
        return options

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        """A fresh generator for one call (so concurrent calls never share random state)."""
        return np.random.default_rng(self.seed)


# The name this class had when it held the token-picking fields only.
SamplingParams = SamplingOptions


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value >= minimum)


def normalize_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise GenerationError(f"stop={stop!r}: must be a non-empty string or a list of non-empty strings")
    return stops


def check_finite(logits: np.ndarray) -> None:
    """Raise :class:`GenerationError` when logits hold NaN or inf (the model overflowed)."""
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).sum())
        raise GenerationError(
            f"the model produced {bad} non-finite logits (NaN/inf). Likely causes: FP16 overflow in an "
            "fp16/quantized bundle (try the fp32 bundle, or quantize with fewer layers in fp16), or corrupt "
            "weights holding NaN/inf (re-export the bundle or copy model.onnx.data again)")


def greedy(logits: np.ndarray) -> int:
    """The id of the largest logit (the first one on ties, as torch.argmax)."""
    return int(logits.argmax())  # the method: np.argmax adds a Python wrapper call per token


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Divide positive logits and multiply negative ones by ``penalty`` for every token where the
    boolean mask ``seen [vocab]`` is true (tokens already in prompt + output)."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    picked = out[seen]
    out[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Scale logits by ``1 / temperature`` (temperature > 0)."""
    return logits.astype(np.float64) / temperature


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Set every logit below the k-th largest to -inf (ties with the k-th are kept)."""
    if k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64 (-inf logits get probability 0)."""
    z = logits.astype(np.float64)
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose total probability is >= ``p`` (at least
    one token); the rest become -inf."""
    if p >= 1.0:
        return logits
    probs = softmax(logits)
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    # A token stays when the mass of the tokens before it is still below p.
    keep_sorted = (cumulative - probs[order]) < p
    keep_sorted[0] = True
    keep = np.zeros(logits.shape[-1], dtype=bool)
    keep[order[keep_sorted]] = True
    return np.where(keep, logits, -np.inf)


def sample_from(logits: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one id from softmax(logits) using ``rng``."""
    probs = softmax(logits)
    # Inverse-CDF draw: one uniform number, reproducible for a given seed.
    index = int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"))
    return min(index, probs.shape[-1] - 1)


def choose_token(logits: np.ndarray, params: SamplingOptions, rng: np.random.Generator,
                 seen: np.ndarray | None = None) -> int:
    """Pick the next id from one logits row ``[vocab]`` following ``params``.

    ``seen [vocab]`` (bool) marks tokens already in prompt + output, for the repetition penalty.
    """
    if params.greedy and (params.repetition_penalty is None or seen is None):
        # argmax returns the first NaN or +inf when there is one, so checking the winner is
        # enough here and saves a pass over the vocabulary every token
        token = greedy(logits)
        if not math.isfinite(logits[token]):
            check_finite(logits)
        return token
    check_finite(logits)
    if params.repetition_penalty is not None and seen is not None:
        logits = apply_repetition_penalty(logits, seen, float(params.repetition_penalty))
    if params.greedy:
        return greedy(logits)
    logits = apply_temperature(logits, float(params.temperature))
    if params.top_k is not None:
        logits = top_k_filter(logits, int(params.top_k))
    if params.top_p is not None:
        logits = top_p_filter(logits, float(params.top_p))
    return sample_from(logits, rng)
