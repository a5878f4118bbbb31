"""Perplexity scored in chunks through the KV cache equals scoring whole windows at once."""

from __future__ import annotations

import math

import numpy as np
import pytest
from quantize_helpers import trained_bundle

from gptedge.quantize import evaluate
from gptedge.quantize.text import encode, read_text
from gptedge.runtime.backend import create_backend
from gptedge.runtime.bundle import load_bundle


def _whole_windows(bundle, ids: np.ndarray, window: int) -> float:
    """Reference: every window of ``window`` tokens from its own start, one full_logits call each."""
    nll, count = 0.0, 0
    with create_backend("ort-cpu", bundle) as backend:
        for begin in range(0, len(ids) - 1, window):
            tokens = ids[begin:begin + window][None, :]
            logits = backend.full_logits(tokens, np.ones_like(tokens), np.arange(tokens.shape[1])[None, :])
            nll += evaluate.summed_nll(logits[0, :-1], tokens[0, 1:])
            count += tokens.shape[1] - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("logits_budget", [64 << 20, 1])  # one chunk per window; 16-token chunks
def test_chunked_scoring_matches_whole_windows(tmp_path_factory, monkeypatch, logits_budget):
    trained = trained_bundle(tmp_path_factory.mktemp("trained"))
    bundle = load_bundle(trained.bundle)
    ids = encode(bundle, read_text(trained.eval, "eval"), "eval")[:300]
    monkeypatch.setattr(evaluate, "_LOGITS_BUDGET", logits_budget)
    window = bundle.manifest.architecture.max_context
    result = evaluate.perplexity_of_ids(bundle, ids, window=window, stride=window)
    assert result.tokens == sum(len(ids[b:b + window]) - 1 for b in range(0, len(ids) - 1, window))
    assert result.ppl == pytest.approx(_whole_windows(bundle, ids, window), rel=1e-4)
