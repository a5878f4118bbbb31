"""Every HF family and mechanism the decoder maps, on a tiny random model of each (2 layers, 64 wide,
GQA, random norm weights and biases, a sliding window shorter than the prompt where the family has
one): the export's parity with transformers, greedy tokens equal to transformers' ``generate`` over
a prompt longer than the window, batch == single, the ORT variant where it applies, TRT 10.3 lint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_family_models import CASES, NEW_TOKENS, PROMPT, WINDOW, family_bundle

from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.generate import load
from gptedge.runtime.trt.lint import lint_bundle

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # one export per family


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return (request.param, *family_bundle(request.param, tmp_path_factory))


def _hf_greedy(folder: Path, prompt: list[int], attention: str = "eager") -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention).eval()
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_export_matches_transformers_and_lints_for_trt(case):
    name, _, bundle = case
    manifest = load_bundle(bundle).manifest
    assert manifest.parity["passed"] and manifest.source["reference"] == "transformers"
    assert ("model_ort" in manifest.files) == CASES[name][2]
    report = lint_bundle(bundle, "10.3")
    assert report.ok, [f.message for f in report.errors]
    if "window" in name:
        assert manifest.architecture.sliding_window == WINDOW


def test_greedy_tokens_equal_transformers_generate_and_batch_equals_single(case):
    name, folder, bundle = case
    want = _hf_greedy(folder, PROMPT)
    assert len(set(want)) > 3  # not a degenerate loop, which would hide differences
    generator = load(bundle, backend="ort-cpu")
    try:
        single = generator.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert single.tokens == want
        if "longrope" in name:
            return  # LongRoPE picks its factors from the batch's longest row, so a batch differs by design
        short = PROMPT[:9]
        batch = generator.generate([PROMPT, short], max_new_tokens=NEW_TOKENS, ignore_eos=True)
        alone = generator.generate(short, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert [r.tokens for r in batch] == [want, alone.tokens]
    finally:
        generator.close()
