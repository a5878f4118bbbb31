"""``gptedge quantize`` fp16 and int8 (static), and on four of them int8-dynamic and int4, on the HF
families whose graphs differ most from Llama's (soft-capping, fused projections, q/k norms, partial
rotary with a parallel residual, biases with LayerNorm, multipliers, post-norms, ALiBi, ReLU²,
interleaved rotary, post-LN), reusing the one export per family that test_hf_families.py makes: each
quantized bundle loads and generates, fp16 keeps fp32's greedy tokens, and fp16 and int8 pass the
TensorRT 10.3 lint."""

from __future__ import annotations

import numpy as np
import pytest
from hf_family_models import PROMPT, family_bundle

from gptedge.quantize import Fp16Config, Int4Config, Int8Config, Int8DynamicConfig, quantize
from gptedge.quantize.evaluate import empty_feeds
from gptedge.quantize.graph_io import session
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.generate import load
from gptedge.runtime.trt.lint import lint_bundle

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # an export per family (shared with test_hf_families.py) and 4 quantizations

FAMILIES = ["gemma2-window-softcap", "phi3-longrope-window", "qwen3-qk-norm-window", "gpt_neox-parallel",
            "starcoder2-window", "granite-multipliers", "olmo2-post-norms",
            # ALiBi, per-head q/k LayerNorm, ReLU² + LayerNorm1P, interleaved partial rotary, post-LN with
            # projections, parameter-free LayerNorm with clip_qkv
            "falcon-new-arch-gqa-alibi", "bloom-alibi-6-heads", "cohere-qk-norm", "nemotron-relu2-partial",
            "gptj-interleaved-partial", "opt-350m-post-norm-project-nobias", "olmo-clip-qkv"]
MODES = {"fp16": Fp16Config(), "int8": Int8Config(calib_windows=2, calib_seq_len=32, float_search_budget=None),
         "int8-dynamic": Int8DynamicConfig(), "int4": Int4Config(block_size=32)}
# int8-dynamic and int4 swap each linear MatMul for MatMulNBits whatever surrounds it, so they run on
# the families whose linear layers differ most (fused projections, a projected embedding, ALiBi with
# grouped fused QKV, soft-capping with a tied head); fp16 and int8 touch every family's own ops
WEIGHT_ONLY_FAMILIES = ("gemma2-window-softcap", "phi3-longrope-window", "falcon-new-arch-gqa-alibi",
                        "opt-350m-post-norm-project-nobias")
LINTED = ("fp16", "int8")  # the TensorRT precisions; int8-dynamic and int4 use onnxruntime's contrib ops
NEW_TOKENS = 12


def _greedy(bundle) -> list[int]:
    generator = load(bundle, backend="ort-cpu")
    try:
        return generator.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).tokens
    finally:
        generator.close()


def _last_logits(bundle_dir, ids: list[int]) -> np.ndarray:
    bundle = load_bundle(bundle_dir)
    sess = session(bundle.model_path)
    row = np.array([ids], dtype=np.int64)
    feeds = {"input_ids": row, "attention_mask": np.ones_like(row), "position_ids": np.arange(len(ids))[None, :],
             **empty_feeds(bundle, sess, 1)}
    return sess.run(["logits"], feeds)[0][0, -1]


def assert_same_greedy(fp32_dir, fp32: list[int], fp16_dir, fp16: list[int]) -> None:
    """fp16's greedy tokens are fp32's, except after a step where fp32 itself nearly tied: there fp16's
    pick must be within twice the two graphs' largest logit difference of fp32's best."""
    if fp16 == fp32:
        return
    step = next(i for i, (a, b) in enumerate(zip(fp32, fp16)) if a != b)
    want, got = (_last_logits(d, PROMPT + fp32[:step]) for d in (fp32_dir, fp16_dir))
    assert want[fp32[step]] - want[fp16[step]] <= 2 * np.abs(want - got).max(), (step, fp32, fp16)


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    """Text in the tiny models' word-level vocabulary (w0 .. w95) for int8 calibration."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(f"w{(13 * i + 5) % 96}" for i in range(400)))
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_every_mode_loads_generates_and_lints(family, calib_text, tmp_path_factory):
    _, source = family_bundle(family, tmp_path_factory)
    fp32 = _greedy(source)
    root = tmp_path_factory.mktemp(f"q-{family}")
    for mode, config in MODES.items():
        if mode not in LINTED and family not in WEIGHT_ONLY_FAMILIES:
            continue
        # int8's quality gate measures on the held-out tail of the calibration text; the others have none here
        out = quantize(source, config, root / mode, calib_text=calib_text if mode == "int8" else None,
                       max_ppl_increase=25.0 if mode == "int8" else None)
        tokens = _greedy(out.path)
        assert len(tokens) == NEW_TOKENS, mode
        if mode == "fp16":
            assert_same_greedy(source, fp32, out.path, tokens)
        if mode in LINTED:
            report = lint_bundle(out.path, "10.3")
            assert report.ok, (mode, [f.message for f in report.errors])
