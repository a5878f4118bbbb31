"""model_ort.onnx: the onnxruntime-only generation graph (GroupQueryAttention + fused norms/GELU).

Every check runs real onnxruntime sessions on bundles exported from random weights: the variant
must give the portable graph's logits and tokens, be skipped where the kernel cannot run, be rebuilt
(not copied) by the quantizer, and give way to the portable graph for left-padded batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY_GPT2, TINY_LLAMA

from gptedge.runtime import contract, load
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.ort import variant as ort_variant
from gptedge.runtime.ort.backend import OrtBackend

# GroupQueryAttention's CPU kernel needs head_dim % 16 == 0; the other tiny configs use 8.
GQA_LLAMA = dataclasses.replace(TINY_LLAMA, hidden_size=48, num_heads=3, num_kv_heads=1, head_dim=16)
GQA_GPT2 = dataclasses.replace(TINY_GPT2, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16)
ARCHS = pytest.mark.parametrize("arch", [GQA_LLAMA, GQA_GPT2], ids=["llama", "gpt2"])


def ops(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


@ARCHS
def test_export_writes_a_checked_non_portable_variant(bundle_factory, arch):
    bundle = load_bundle(bundle_factory(arch))
    entry = bundle.manifest.files[contract.ORT_VARIANT_ROLE]
    assert entry["portable"] is False and entry["path"] == "model_ort.onnx"
    assert entry["parity_max_abs_diff"] < 1e-4
    graph = onnx.load(str(bundle.path / "model_ort.onnx"), load_external_data=False).graph
    counts = Counter(node.op_type for node in graph.node)
    assert counts["GroupQueryAttention"] == arch.num_layers and counts["Softmax"] == 0
    readers_of_past = {n.op_type for n in graph.node for name in n.input if name.startswith("past_key_values")}
    assert "Concat" not in readers_of_past  # the cache is appended inside the attention kernel
    portable = ops(bundle.path / "model_last.onnx")
    assert sum(counts.values()) < 0.5 * sum(portable.values())
    if arch.norm == "rmsnorm":
        assert counts["SkipSimplifiedLayerNormalization"] == 2 * arch.num_layers - 1
    else:
        # the embedding sum (tokens + positions) feeds the first norm, so it fuses too
        assert counts["SkipLayerNormalization"] == 2 * arch.num_layers
        assert counts["FastGelu"] == arch.num_layers and counts["Tanh"] == 0
    # the LM head weight is 3-D there, so onnxruntime reads it in place instead of pre-packing a copy
    head = next(n for n in graph.node if n.output[0] == contract.LOGITS)
    assert [len(t.dims) for t in graph.initializer if t.name == head.input[1]] == [3]
    if arch.tie_word_embeddings:  # the token lookup reads the same (3-D) table
        assert any(n.op_type == "Gather" and n.input[0] == head.input[1] for n in graph.node)
    # the variant refers to the bundle's one data file: no second copy of the weights
    assert sorted(p.name for p in bundle.path.glob("*.data")) == ["model.onnx.data"]


@ARCHS
def test_variant_decodes_like_the_portable_graph(bundle_factory, arch, monkeypatch):
    path = bundle_factory(arch)
    fast = OrtBackend(load_bundle(path), threads=1)
    assert fast.model_path.name == "model_ort.onnx"
    monkeypatch.setenv("GPTEDGE_ORT_VARIANT", "0")
    portable = OrtBackend(load_bundle(path), threads=1)
    assert portable.model_path.name == "model_last.onnx"
    ids = np.random.default_rng(3).integers(0, arch.vocab_size, (1, 10), dtype=np.int64)
    logits = []
    for backend in (fast, portable):
        state, rows = backend.new_state(1), []
        rows.append(backend.step(state, ids[:, :6], np.ones((1, 6), np.int64), np.arange(6)[None]).copy())
        for t in range(6, 10):
            rows.append(backend.step(state, ids[:, t:t + 1], np.ones((1, t + 1), np.int64),
                                     np.array([[t]])).copy())
        logits.append(np.stack(rows))
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-4)


def test_padded_batches_fall_back_to_the_portable_graph(bundle_factory, monkeypatch):
    path = bundle_factory(GQA_LLAMA)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
    with load(path, backend="ort-cpu", threads=1) as gen:
        assert gen.backend.model_path.name == "model_ort.onnx"
        batched = gen.generate(prompts, max_new_tokens=6)
        assert gen.backend._padded_session is not None  # the padded batch opened model_last
        single = [gen.generate(p, max_new_tokens=6) for p in prompts]
    monkeypatch.setenv("GPTEDGE_ORT_VARIANT", "0")
    with load(path, backend="ort-cpu", threads=1) as gen:
        reference = gen.generate(prompts, max_new_tokens=6)
    assert [r.tokens for r in batched] == [r.tokens for r in reference]
    assert [r.tokens for r in single] == [r.tokens for r in reference]


def test_unsupported_head_size_writes_no_variant(llama_bundle, caplog):
    bundle = load_bundle(llama_bundle)  # head_dim 8
    assert contract.ORT_VARIANT_ROLE not in bundle.manifest.files
    assert not (bundle.path / "model_ort.onnx").exists()
    assert "multiple of 16" in ort_variant.unsupported(bundle.manifest.architecture)
    files = dict(bundle.manifest.files)
    with caplog.at_level(logging.INFO, logger="gptedge.runtime.ort.variant"):
        assert ort_variant.attach(bundle.path, files, bundle.manifest.architecture, {}) is None
    assert "multiple of 16" in caplog.text and contract.ORT_VARIANT_ROLE not in files
    caplog.clear()  # the exporter's way: the same in a child interpreter, its log relayed here
    with caplog.at_level(logging.INFO, logger="gptedge.runtime.ort.variant"):
        assert ort_variant.attach_isolated(bundle.path, files, bundle.manifest.architecture, {}) is None
    assert "multiple of 16" in caplog.text and files == dict(bundle.manifest.files)


def test_a_graph_without_the_kv_pattern_is_refused(bundle_factory, tmp_path):
    bundle = load_bundle(bundle_factory(GQA_LLAMA))
    model = onnx.load(str(bundle.path / "model_last.onnx"), load_external_data=False)
    for node in model.graph.node:  # the cache is no longer Concat(past, new)
        if node.output[0] == "present.0.key":
            node.op_type = "Max"
    broken = bundle.path.parent / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(ort_variant.VariantError, match="present.0.key"):
        ort_variant.build(broken, bundle.manifest.architecture, "float32")


@pytest.mark.parametrize("mode", ["fp16", "int8-dynamic", "int4"])
def test_quantized_bundles_get_their_own_variant(bundle_factory, tmp_path, mode, monkeypatch):
    from gptedge.quantize import Fp16Config, Int4Config, Int8DynamicConfig, quantize

    config = {"fp16": Fp16Config(), "int8-dynamic": Int8DynamicConfig(), "int4": Int4Config(block_size=16)}[mode]
    out = quantize(bundle_factory(GQA_LLAMA), config, tmp_path / mode, max_ppl_increase=float("inf"))
    entry = json.loads((out.path / "manifest.json").read_text())["files"][contract.ORT_VARIANT_ROLE]
    assert entry["parity_max_abs_diff"] < (5e-2 if mode == "fp16" else 1e-4)
    counts = ops(out.path / "model_ort.onnx")
    assert counts["GroupQueryAttention"] == GQA_LLAMA.num_layers
    if mode != "fp16":  # the quantized linears are carried over as they are
        assert counts["MatMulNBits"] == ops(out.path / "model_last.onnx")["MatMulNBits"] > 0
    prompt = [3, 4, 5, 6]
    with load(out.path, backend="ort-cpu", threads=1) as gen:
        assert gen.backend.model_path.name == "model_ort.onnx"
        fast = gen.generate(prompt, max_new_tokens=8).tokens
    monkeypatch.setenv("GPTEDGE_ORT_VARIANT", "0")
    with load(out.path, backend="ort-cpu", threads=1) as gen:
        assert gen.backend.model_path.name == "model_last.onnx"
        assert gen.generate(prompt, max_new_tokens=8).tokens == fast


def test_export_config_can_skip_the_variant(tmp_path):
    from gptedge.exporter.checkpoints.synthetic import random_checkpoint
    from gptedge.exporter.config import ExportConfig
    from gptedge.exporter.pipeline import export_loaded

    bundle = export_loaded(random_checkpoint(GQA_LLAMA, 0), ExportConfig(ort_variant=False, validate=False),
                           tmp_path / "b")
    assert contract.ORT_VARIANT_ROLE not in bundle.manifest.files
    assert not (bundle.path / "model_ort.onnx").exists()


def test_in_place_cache_grows_and_gives_the_portable_tokens(bundle_factory, monkeypatch):
    arch = dataclasses.replace(GQA_LLAMA, max_context=700)
    path = bundle_factory(arch)
    prompt = np.random.default_rng(5).integers(0, arch.vocab_size, 300).tolist()
    with load(path, backend="ort-cpu", threads=1) as gen:
        backend = gen.backend
        state = backend.new_state(1)
        backend.step(state, np.array([prompt]), np.ones((1, 300), np.int64), np.arange(300)[None])
        assert state.buffers is not None and state.buffers[0].shape[2] == 300  # room for the prompt
        backend.step(state, np.array([[7]]), np.ones((1, 301), np.int64), np.array([[300]]))
        assert state.buffers[0].shape[2] == 600 and state.length == 301  # doubled, history copied
        fast = gen.generate(prompt, max_new_tokens=320).tokens  # grows to max_context on the way
    monkeypatch.setenv("GPTEDGE_ORT_VARIANT", "0")
    with load(path, backend="ort-cpu", threads=1) as gen:
        assert gen.generate(prompt, max_new_tokens=320).tokens == fast


def test_a_state_leaves_the_in_place_cache_for_a_padded_step(bundle_factory, monkeypatch):
    path = bundle_factory(GQA_LLAMA)
    ids = np.random.default_rng(9).integers(0, GQA_LLAMA.vocab_size, (1, 8))
    masks = [np.ones((1, 5), np.int64), np.ones((1, 6), np.int64), np.array([[1, 1, 0, 1, 1, 1, 1]]),
             np.array([[1, 1, 0, 1, 1, 1, 1, 1]])]
    feeds = [(ids[:, :5], masks[0], np.arange(5)[None]), (ids[:, 5:6], masks[1], np.array([[5]])),
             (ids[:, 6:7], masks[2], np.array([[5]])), (ids[:, 7:8], masks[3], np.array([[6]]))]
    fast = _steps_match_the_portable_graph(path, feeds, monkeypatch)
    assert fast._padded_session is not None


def _steps_match_the_portable_graph(path, feeds, monkeypatch) -> OrtBackend:
    """Run ``feeds`` (ids, mask, positions) step by step on the variant's backend and on the
    portable graph's; the logits must agree. Returns the variant's backend."""
    fast = OrtBackend(load_bundle(path), threads=1)
    monkeypatch.setenv("GPTEDGE_ORT_VARIANT", "0")
    portable = OrtBackend(load_bundle(path), threads=1)
    monkeypatch.delenv("GPTEDGE_ORT_VARIANT")
    results = []
    for backend in (fast, portable):
        state = backend.new_state(1)
        results.append([backend.step(state, *feed).copy() for feed in feeds])
        assert all(isinstance(v, ort.OrtValue) for v in state.past)
    np.testing.assert_allclose(np.stack(results[0]), np.stack(results[1]), atol=1e-4)
    return fast


def test_variant_takes_lengths_from_positions_and_checks_them(bundle_factory, monkeypatch):
    """The variant does not read the mask (so a decode step binds nothing new); a step whose
    positions do not continue the cache goes to the portable graph, which honours them."""
    from gptedge.runtime.errors import GenerationError

    path = bundle_factory(GQA_LLAMA)
    graph = onnx.load(str(path / "model_ort.onnx"), load_external_data=False).graph
    assert not [n.name for n in graph.node if contract.ATTENTION_MASK in n.input]
    ids = np.random.default_rng(4).integers(0, GQA_LLAMA.vocab_size, (1, 6))
    shifted = [(ids[:, :5], np.ones((1, 5), np.int64), np.arange(3, 8)[None]),
               (ids[:, 5:], np.ones((1, 6), np.int64), np.array([[8]]))]
    fast = _steps_match_the_portable_graph(path, shifted, monkeypatch)
    assert fast._padded_session is not None
    state = fast.new_state(1)
    with pytest.raises(GenerationError, match=r"attention_mask has 4 columns.*pass \[batch, 5\]"):
        fast.step(state, ids[:, :5], np.ones((1, 4), np.int64), np.arange(5)[None])
