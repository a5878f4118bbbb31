"""Sampling functions: argument checks, and the distribution each one really samples from."""

from __future__ import annotations

import numpy as np
import pytest

from gptedge.runtime.errors import GenerationError
from gptedge.runtime.sampling import (
    SamplingOptions,
    SamplingParams,
    apply_repetition_penalty,
    choose_token,
    softmax,
    top_k_filter,
    top_p_filter,
)

LOGITS = np.array([2.0, 1.0, 0.5, 3.0, -1.0, 0.0, 1.5, -0.5], dtype=np.float32)


def draws(params: SamplingParams, n: int, logits: np.ndarray = LOGITS, seen=None) -> np.ndarray:
    rng = params.rng()
    return np.array([choose_token(logits, params, rng, seen) for _ in range(n)])


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": -1.0}, "repetition_penalty"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(GenerationError, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"), ({"stop": [""]}, "stop"), ({"stop": [3]}, "stop"),
])
def test_bad_call_options_name_the_argument(kwargs, name):
    with pytest.raises(GenerationError, match=name):
        SamplingOptions(**kwargs)


def test_options_normalize_stop_and_refuse_a_second_way_of_saying_it():
    assert SamplingOptions(stop="END").stop == ("END",) and SamplingOptions(stop=None).stop == ()
    given = SamplingOptions(temperature=0.5, seed=3)
    assert SamplingOptions.of(given, temperature=0.0, stop=None) is given  # keywords at their defaults
    assert SamplingOptions.of(None, temperature=0.5, seed=3) == given
    with pytest.raises(GenerationError, match="temperature"):
        SamplingOptions.of(given, temperature=0.7)
    with pytest.raises(GenerationError, match="options"):
        SamplingOptions.of({"temperature": 0.5})


def test_greedy_is_argmax_and_ignores_seed():
    params = SamplingParams(temperature=0.0, seed=3)
    assert set(draws(params, 20)) == {int(np.argmax(LOGITS))}


def test_seeded_sampling_is_reproducible_and_seed_matters():
    a = draws(SamplingParams(temperature=1.0, seed=7), 200)
    b = draws(SamplingParams(temperature=1.0, seed=7), 200)
    c = draws(SamplingParams(temperature=1.0, seed=8), 200)
    assert (a == b).all()
    assert (a != c).any()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    n = 20000
    counts = np.bincount(draws(SamplingParams(temperature=temperature, seed=1), n), minlength=len(LOGITS))
    expected = softmax(LOGITS / temperature) * n
    keep = expected > 5  # chi-square needs enough expected counts per cell
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum()
    # 99.9 % quantile of chi-square with <= 7 degrees of freedom is 24.3
    assert chi2 < 24.3, (counts, expected.round())
    assert counts[~keep].sum() <= max(10, 3 * expected[~keep].sum())


def test_top_k_never_leaves_the_top_k():
    samples = draws(SamplingParams(temperature=1.5, top_k=3, seed=2), 3000)
    top3 = set(np.argsort(-LOGITS)[:3].tolist())
    assert set(samples.tolist()) == top3  # every one of the 3 is drawn, nothing else
    assert top_k_filter(LOGITS, 1).tolist().count(-np.inf) == len(LOGITS) - 1


def test_top_p_keeps_the_smallest_nucleus_and_samples_renormalised():
    probs = softmax(LOGITS)
    order = np.argsort(-probs)
    for p in (0.3, 0.6, 0.9, 0.999):
        kept = np.isfinite(top_p_filter(LOGITS, p))
        k = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # smallest prefix with mass >= p
        assert set(np.flatnonzero(kept).tolist()) == set(order[:k].tolist())
    n = 10000
    samples = draws(SamplingParams(temperature=1.0, top_p=0.8, seed=4), n)
    nucleus = np.flatnonzero(np.isfinite(top_p_filter(LOGITS, 0.8)))
    assert set(samples.tolist()) <= set(nucleus.tolist())
    freq = np.bincount(samples, minlength=len(LOGITS))[nucleus] / n
    want = probs[nucleus] / probs[nucleus].sum()
    assert np.abs(freq - want).max() < 0.02


def test_top_p_one_token_when_it_dominates():
    logits = np.array([10.0, 0.0, 0.0], dtype=np.float32)
    assert np.isfinite(top_p_filter(logits, 0.5)).sum() == 1


def test_repetition_penalty_changes_exactly_the_seen_logits():
    seen = np.zeros(len(LOGITS), dtype=bool)
    seen[[0, 4, 5]] = True  # a positive, a negative and a zero logit
    out = apply_repetition_penalty(LOGITS, seen, 2.0)
    assert out[0] == pytest.approx(1.0) and out[4] == pytest.approx(-2.0) and out[5] == 0.0
    assert np.array_equal(out[~seen], LOGITS[~seen])
    assert np.array_equal(LOGITS[:1], [2.0])  # input untouched
    # greedy with a strong penalty on the argmax picks the runner-up
    seen_top = np.zeros(len(LOGITS), dtype=bool)
    seen_top[3] = True
    assert choose_token(LOGITS, SamplingParams(repetition_penalty=10.0), np.random.default_rng(), seen_top) == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_logits_raise_with_the_likely_cause(bad):
    logits = LOGITS.copy()
    logits[2] = bad
    with pytest.raises(GenerationError, match="fp32"):
        choose_token(logits, SamplingParams(), np.random.default_rng())
