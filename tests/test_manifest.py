"""manifest.json: schema, versioning, and a reader that only ever raises BundleError."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_LLAMA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptedge.runtime.bundle import FORMAT_VERSION, SCHEMA_PATH, Manifest, load_bundle, read_manifest
from gptedge.runtime.errors import BundleError

jsonschema = pytest.importorskip("jsonschema")


def test_exported_manifest_matches_published_schema(llama_bundle):
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    manifest = json.loads((llama_bundle / "manifest.json").read_text())
    jsonschema.validate(manifest, schema)
    assert manifest["format_version"] == FORMAT_VERSION
    assert {"model", "model_last", "weights"} <= set(manifest["files"])


def test_manifest_round_trip(llama_bundle):
    manifest = read_manifest(llama_bundle)
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again.to_dict() == manifest.to_dict()
    assert again.architecture == TINY_LLAMA


def _copy_manifest(tmp_path, bundle, edit):
    data = json.loads((bundle / "manifest.json").read_text())
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format_version=FORMAT_VERSION + 1), "upgrade gptedge"),
    (lambda d: d.pop("format_version"), "format_version"),
    (lambda d: d.update(format_version="1"), "format_version"),
    (lambda d: d["architecture"].update(num_heads=3), "num_kv_heads"),
    (lambda d: d["architecture"].update(norm="batchnorm"), "norm"),
    (lambda d: d["architecture"].update(future_key=1), "unknown keys"),
    (lambda d: d["files"]["model"].update(path="../../etc/passwd"), "escapes the bundle"),
    (lambda d: d["files"]["model"].update(path="/abs/model.onnx"), "escapes the bundle"),
    (lambda d: d.update(tokenizer=[1, 2]), "tokenizer"),
])
def test_bad_manifests_are_refused(tmp_path, llama_bundle, edit, message):
    folder = _copy_manifest(tmp_path, llama_bundle, edit)
    with pytest.raises(BundleError, match=message):
        read_manifest(folder)


def test_malformed_json_and_missing_files(tmp_path, llama_bundle):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="malformed JSON"):
        read_manifest(tmp_path)
    with pytest.raises(BundleError, match="no manifest.json"):
        read_manifest(tmp_path / "nowhere")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_text((llama_bundle / "manifest.json").read_text())
    with pytest.raises(BundleError, match="missing"):
        load_bundle(copy)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["format_version", "architecture", "tokenizer", "files", "io",
                                        "precision", "source", "tools", "parity", "history"]), json_values)
       | json_values)
def test_fuzzed_manifest_raises_only_bundle_error(data):
    try:
        Manifest.from_dict(data)
    except BundleError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({"format_version": st.just(1)}, optional={
    "architecture": st.dictionaries(st.sampled_from(["vocab_size", "hidden_size", "num_layers", "num_heads",
                                                     "num_kv_heads", "head_dim", "intermediate_size",
                                                     "max_context", "norm", "position", "activation",
                                                     "norm_eps", "rope_scaling", "qkv_bias"]), json_values),
    "tokenizer": json_values, "files": json_values, "precision": json_values}))
def test_fuzzed_near_valid_manifest_raises_only_bundle_error(data):
    try:
        Manifest.from_dict(data)
    except BundleError:
        pass


FAMILY_SWITCHES = dict(sliding_window=6, sliding_layers=[0], rope_local_theta=100.0, nope_layers=[1], rotary_dim=4,
                       parallel_residual="two_norms", lm_head_bias=True, qk_norm="head", norm_offset=1.0,
                       norm_placement="pre_post", embed_scale=8.0, residual_scale=0.5, attn_scale=0.2,
                       attn_softcap=50.0, logit_softcap=30.0, logit_divisor=2.5)


def test_family_switches_round_trip_and_bad_values_are_named():
    import dataclasses

    from gptedge.runtime.bundle import Architecture

    arch = dataclasses.replace(TINY_LLAMA, **FAMILY_SWITCHES)
    assert Architecture.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    assert [arch.window_of(i) for i in range(arch.num_layers)] == [6, None]
    bad = dict(sliding_window=0, sliding_layers=[7], rotary_dim=3, qk_norm="sometimes", attn_softcap=-1.0,
               parallel_residual="yes", embed_scale=float("nan"))
    with pytest.raises(BundleError) as info:
        dataclasses.replace(TINY_LLAMA, **bad)
    assert all(f"{name}=" in str(info.value) for name in bad)


def test_newer_family_switches_round_trip_and_bad_values_are_named():
    import dataclasses

    from gptedge.runtime.bundle import Architecture

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
