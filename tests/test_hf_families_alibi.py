"""Falcon, BLOOM, Cohere and Nemotron (ALiBi, multi-query / grouped fused QKV, embedding LayerNorm,
interleaved RoPE, per-head q/k LayerNorm, LayerNorm1P, ReLU²) on a tiny random model of each, with
the checks of ``test_hf_families.py``: export parity with transformers, greedy tokens equal to
transformers' ``generate``, batch (left-padded) == single, TRT 10.3 lint, and whether
``model_ort.onnx`` is written (never for ALiBi: GroupQueryAttention takes no position bias)."""

from __future__ import annotations

import pytest
from hf_family_models import ALIBI_CASES, NEW_TOKENS, PROMPT, family_bundle
from test_hf_families import _hf_greedy

from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.generate import load
from gptedge.runtime.ort.variant import unsupported
from gptedge.runtime.trt.lint import lint_bundle

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # one export per case

CASES = ALIBI_CASES


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return (request.param, *family_bundle(request.param, tmp_path_factory))


def test_export_matches_transformers_and_lints_for_trt(case):
    name, _, bundle = case
    manifest = load_bundle(bundle).manifest
    assert manifest.parity["passed"] and manifest.source["reference"] == "transformers"
    assert ("model_ort" in manifest.files) == CASES[name][2]
    report = lint_bundle(bundle, "10.3")
    assert report.ok, [f.message for f in report.errors]
    assert (manifest.architecture.position == "alibi") == ("alibi" in name)
    if "alibi" in name:  # the variant is refused up front, with the reason (logged), not tried
        assert "ALiBi" in (unsupported(manifest.architecture) or "")


def test_greedy_tokens_equal_transformers_generate_and_batch_equals_single(case):
    name, folder, bundle = case
    # transformers 4.57's eager Falcon adds ALiBi twice (in the scores and again in the mask); its
    # sdpa path adds it once, as the original Falcon code and the bundle do (hf_falcon.py)
    want = _hf_greedy(folder, PROMPT, "sdpa" if name.startswith("falcon") and "alibi" in name else "eager")
    assert len(set(want)) > 3  # not a degenerate loop, which would hide differences
    generator = load(bundle, backend="ort-cpu")
    try:
        single = generator.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert single.tokens == want
        short = PROMPT[:9]
        batch = generator.generate([PROMPT, short], max_new_tokens=NEW_TOKENS, ignore_eos=True)
        alone = generator.generate(short, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert [r.tokens for r in batch] == [want, alone.tokens]
    finally:
        generator.close()
