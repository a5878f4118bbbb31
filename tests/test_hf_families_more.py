"""GPT-J, CodeGen, OPT, OLMo and Helium on a tiny random model each (2 layers, 64 wide, random norm
weights and biases; the helpers of test_hf_families.py): export parity with transformers, greedy
tokens equal to transformers' ``generate``, batch == single, the ORT variant where it applies and
TRT 10.3 lint. The mechanisms: GPT-J's interleaved partial rotary and parallel block, CodeGen's
``mp_num = 4`` fused QKV, OPT's offset positions, post-LN and projections, OLMo's parameter-free
LayerNorm and ``clip_qkv``, Helium's interleaved rotary with GQA."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_hf_families import NEW_TOKENS, PROMPT, _hf_greedy, tiny_folder

from gptedge.exporter import ExportConfig, export
from gptedge.exporter.checkpoints.hf_config import architecture_from_config
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.generate import load
from gptedge.runtime.trt.lint import lint_bundle

pytest.importorskip("transformers")

# case -> (model_type, config keywords, whether model_ort.onnx is expected)
CASES: dict[str, tuple[str, dict, bool]] = {
    "gptj-interleaved-partial": ("gptj", dict(rotary_dim=8), False),
    # 8 heads: two per mp_num block, so the block layout of the fused qkv_proj is exercised
    "codegen-mp4-qkv": ("codegen", dict(num_attention_heads=8, head_dim=8, rotary_dim=4), False),
    # without biases: with them, this random post-LN model greedy-decodes one repeated token
    "opt-350m-post-norm-project-nobias": ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=32, ffn_dim=96,
                                                      enable_bias=False, tie_word_embeddings=True), True),
    "opt-125m-pre-norm": ("opt", dict(ffn_dim=96, tie_word_embeddings=True), True),
    "olmo-clip-qkv": ("olmo", dict(clip_qkv=0.5), True),
    "helium-interleaved-gqa": ("helium", dict(attention_bias=True, mlp_bias=True), True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    model_type, overrides, _ = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = tiny_folder(root / "hf", model_type, **overrides)
    export(folder, ExportConfig(last_logits_variant=True), root / "bundle")
    return request.param, folder, root / "bundle"


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
