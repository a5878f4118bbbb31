"""GPT-J, CodeGen, OPT, OLMo and Helium on a tiny random model each (2 layers, 64 wide, random norm
weights and biases; the helpers of test_hf_families.py): export parity with transformers, greedy
tokens equal to transformers' ``generate``, batch == single, the ORT variant where it applies and
TRT 10.3 lint. The mechanisms: GPT-J's interleaved partial rotary and parallel block, CodeGen's
``mp_num = 4`` fused QKV, OPT's offset positions, post-LN and projections, OLMo's parameter-free
LayerNorm and ``clip_qkv``, Helium's interleaved rotary with GQA."""

from __future__ import annotations

from pathlib import Path

import pytest
from hf_family_models import MORE_CASES, NEW_TOKENS, PROMPT, family_bundle
from test_hf_families import _hf_greedy

from gptedge.exporter.checkpoints.hf_config import architecture_from_config
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.generate import load
from gptedge.runtime.trt.lint import lint_bundle

pytest.importorskip("transformers")

CASES = MORE_CASES


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return (request.param, *family_bundle(request.param, tmp_path_factory))


@pytest.mark.slow
def test_export_matches_transformers_and_lints_for_trt(case):
    name, _, bundle = case
    manifest = load_bundle(bundle).manifest
    assert manifest.parity["passed"] and manifest.source["reference"] == "transformers"
    assert ("model_ort" in manifest.files) == CASES[name][2]
    report = lint_bundle(bundle, "10.3")
    assert report.ok, [f.message for f in report.errors]


@pytest.mark.slow
def test_greedy_tokens_equal_transformers_generate_and_batch_equals_single(case):
    _, folder, bundle = case
    want = _hf_greedy(folder, PROMPT)
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


def test_opt_switches_map_from_config():
    """OPT's optional keys reach the architecture (config only: transformers 4.57 cannot build an OPT
    with ``layer_norm_elementwise_affine: false``, its ``_init_weights`` fills the absent weight)."""
    cfg = dict(model_type="opt", vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               ffn_dim=96, max_position_embeddings=64, enable_bias=False, layer_norm_elementwise_affine=False,
               do_layer_norm_before=True, _remove_final_layer_norm=True, activation_function="gelu")
    arch = architecture_from_config(cfg, Path("config.json"))
    assert (arch.qkv_bias, arch.attn_out_bias, arch.mlp_bias) == (False, False, False)
    assert (arch.norm_affine, arch.final_norm, arch.norm_placement) == (False, False, "pre")
    assert arch.activation == "gelu" and arch.embed_proj_dim is None


def test_new_switches_round_trip_and_bad_values_are_named():
    import dataclasses
    import json

    from conftest import TINY_LLAMA

    from gptedge.runtime.bundle import Architecture
    from gptedge.runtime.errors import BundleError

    switches = dict(norm="layernorm", norm_affine=False, rope_interleaved=True, final_norm=False, embed_proj_dim=16,
                    qkv_clip=8.0, activation="relu", norm_placement="post_residual")
    arch = dataclasses.replace(TINY_LLAMA, **switches)
    assert Architecture.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    bad = dict(rope_interleaved="yes", final_norm=None, embed_proj_dim=0, qkv_clip=-1.0)
    with pytest.raises(BundleError) as info:
        dataclasses.replace(TINY_LLAMA, **bad)
    assert all(f"{name}=" in str(info.value) for name in bad)
    with pytest.raises(BundleError, match="norm_affine=false needs norm='layernorm'"):
        dataclasses.replace(TINY_LLAMA, norm_affine=False)
