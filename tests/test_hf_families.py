"""Every HF family and mechanism the decoder maps, on a tiny random model of each (2 layers, 64 wide,
GQA, random norm weights and biases, a sliding window shorter than the prompt where the family has
one; the cases of hf_family_models.py): the export's parity with transformers, greedy tokens equal to
transformers' ``generate`` over a prompt longer than the window, batch (left-padded) == single,
whether ``model_ort.onnx`` is written (never for ALiBi: GroupQueryAttention takes no position bias),
TRT 10.3 lint.

The mechanisms beyond Llama's: sliding windows, YaRN / LongRoPE / dynamic RoPE, soft-capping, q/k
norms, multipliers, post-norms, NoPE layers, multi-query attention, partial rotary with a parallel
residual, GPT-J's interleaved rotary, CodeGen's ``mp_num = 4`` fused QKV, OPT's offset positions,
post-LN and projections, OLMo's parameter-free LayerNorm and ``clip_qkv``, Falcon's three fused-QKV
layouts and ALiBi, BLOOM's embedding LayerNorm, Cohere's per-head q/k LayerNorm, Nemotron's ReLU²."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_family_models import ALIBI_CASES, CASES, MORE_CASES, NEW_TOKENS, PROMPT, WINDOW, family_bundle

from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.generate import load
from gptedge.runtime.ort.variant import unsupported
from gptedge.runtime.trt.lint import lint_bundle

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # one export per case

ALL_CASES = {**CASES, **MORE_CASES, **ALIBI_CASES}


@pytest.fixture(scope="module", params=sorted(ALL_CASES))
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
    assert ("model_ort" in manifest.files) == ALL_CASES[name][2]
    report = lint_bundle(bundle, "10.3")
    assert report.ok, [f.message for f in report.errors]
    if "window" in name:
        assert manifest.architecture.sliding_window == WINDOW
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
        if "longrope" in name:
            return  # LongRoPE picks its factors from the batch's longest row, so a batch differs by design
        short = PROMPT[:9]
        batch = generator.generate([PROMPT, short], max_new_tokens=NEW_TOKENS, ignore_eos=True)
        alone = generator.generate(short, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert [r.tokens for r in batch] == [want, alone.tokens]
    finally:
        generator.close()
