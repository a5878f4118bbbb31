"""The decoder and its ONNX graph: contract names, shapes, parity, and full == incremental logits."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY_GPT2, TINY_LLAMA

from gptedge.runtime import contract
from gptedge.runtime.bundle import FORMAT_VERSION, load_bundle


@pytest.mark.parametrize("arch", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama-gqa"])
def test_bundle_keeps_the_contract(bundle_factory, arch):
    path = bundle_factory(arch)
    bundle = load_bundle(path)
    assert bundle.manifest.format_version == FORMAT_VERSION
    assert bundle.manifest.parity["passed"] and bundle.manifest.parity["max_abs"] <= 1e-4
    model = onnx.load(str(path / "model.onnx"))
    onnx.checker.check_model(str(path / "model.onnx"))
    assert model.ir_version <= 10
    assert 18 <= model.opset_import[0].version <= 20
    assert [i.name for i in model.graph.input] == contract.input_names(arch.num_layers)
    assert [o.name for o in model.graph.output] == contract.output_names(arch.num_layers)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert not any(n.op_type == "If" for n in model.graph.node)
    assert any(n.name.startswith("/layers.1/attn/") for n in model.graph.node)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["architecture"]["num_kv_heads"] == arch.num_kv_heads


def _run(session, arch, ids, mask, pos, past):
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feeds)))
    new_past = {contract.past_name(i, k): out[contract.present_name(i, k)]
                for i in range(arch.num_layers) for k in ("key", "value")}
    return out["logits"], new_past


@pytest.mark.parametrize("arch", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama-gqa"])
def test_full_sequence_equals_incremental_decode(bundle_factory, arch):
    path = bundle_factory(arch)
    session = ort.InferenceSession(str(path / "model.onnx"))
    rng = np.random.default_rng(3)
    ids = rng.integers(0, arch.vocab_size, (1, 10))
    empty = {n: np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), np.float32)
             for n in contract.past_names(arch.num_layers)}
    full, _ = _run(session, arch, ids, np.ones((1, 10), np.int64), np.arange(10)[None], empty)
    logits, past = _run(session, arch, ids[:, :6], np.ones((1, 6), np.int64), np.arange(6)[None], empty)
    steps = [logits]
    for t in range(6, 10):
        logits, past = _run(session, arch, ids[:, t:t + 1], np.ones((1, t + 1), np.int64), np.array([[t]]), past)
        steps.append(logits)
    incremental = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(incremental, full, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_last_position_graph_matches_full_graph(family, request):
    """model_last.onnx is cut from the traced model.onnx (RMSNorm and LayerNorm final norms)."""
    arch = {"llama": TINY_LLAMA, "gpt2": TINY_GPT2}[family]
    bundle = request.getfixturevalue(f"{family}_bundle")
    full = ort.InferenceSession(str(bundle / "model.onnx"))
    last = ort.InferenceSession(str(bundle / "model_last.onnx"))
    ids = np.arange(7)[None] % arch.vocab_size
    empty = {n: np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), np.float32)
             for n in contract.past_names(arch.num_layers)}
    a, _ = _run(full, arch, ids, np.ones((1, 7), np.int64), np.arange(7)[None], empty)
    b, _ = _run(last, arch, ids, np.ones((1, 7), np.int64), np.arange(7)[None], empty)
    assert b.shape == (1, 1, arch.vocab_size)
    np.testing.assert_allclose(b[:, 0], a[:, -1], atol=1e-6)
    # both graphs read one shared weight file
    assert sorted(p.name for p in bundle.glob("*.data")) == ["model.onnx.data"]


def test_tied_embedding_is_stored_once(gpt2_bundle):
    arch = TINY_GPT2
    model = onnx.load(str(gpt2_bundle / "model.onnx"), load_external_data=False)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    assert "embed.weight" not in shapes
    # [C, V]: the LM head and the lookup (Gather axis=1) share it
    assert shapes["lm_head.weight_t"] == [arch.hidden_size, arch.vocab_size]
    users = [n.op_type for n in model.graph.node if "lm_head.weight_t" in n.input]
    assert sorted(users) == ["Gather", "MatMul"]


def test_quantizing_a_tied_bundle_keeps_one_table(gpt2_bundle, tmp_path):
    from gptedge.quantize import Int4Config, quantize
    from gptedge.runtime import load

    out = quantize(gpt2_bundle, Int4Config(block_size=32), tmp_path / "int4")
    model = onnx.load(str(out.path / "model.onnx"), load_external_data=False)
    lookups = [n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")
               and n.input[0].startswith("lm_head")]
    assert lookups == ["lm_head.weight_t_q"]  # the lookup reads the int8 head's own tensor
    assert not [i.name for i in model.graph.initializer if i.name.startswith("lm_head.weight_t.untied")]
    assert not any(n.op_type == "MatMul" and "lm_head.weight_t" in n.input for n in model.graph.node)
    result = load(out.path).generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)
    assert len(result.tokens) == 4


@pytest.mark.parametrize("base", [TINY_LLAMA, replace(TINY_LLAMA, tie_word_embeddings=True, qkv_bias=True), TINY_GPT2],
                         ids=["llama", "llama-tied-qkv-bias", "gpt2"])
def test_stamped_layers_equal_a_full_trace(base):
    """Deep decoders are traced at two layers and stamped out: same graph, same numbers."""
    from gptedge.exporter.checkpoints.synthetic import random_checkpoint
    from gptedge.exporter.onnx_export import _trace
    from gptedge.exporter.pipeline import build_decoder
    from gptedge.exporter.stamp import first_layers, stamp_layers

    arch = replace(base, num_layers=4)
    decoder = build_decoder(arch, random_checkpoint(arch, seed=2).state_dict, "random")
    stamped = _trace(first_layers(decoder), 18, None)
    assert stamp_layers(stamped, decoder.state_dict(), arch.num_layers, None)
    full = _trace(decoder, 18, None)
    onnx.checker.check_model(stamped, full_check=True)
    assert sorted(n.op_type for n in stamped.graph.node) == sorted(n.op_type for n in full.graph.node)
    assert {n.name for n in full.graph.node if n.name.startswith("/layers.3/")} <= {n.name for n in stamped.graph.node}
    assert [v.name for v in stamped.graph.input] == [v.name for v in full.graph.input]
    assert [v.name for v in stamped.graph.output] == [v.name for v in full.graph.output]
    rng = np.random.default_rng(0)
    past = {name: rng.standard_normal((2, arch.num_kv_heads, 3, arch.head_dim)).astype(np.float32)
            for name in contract.past_names(arch.num_layers)}
    mask = np.ones((2, 5), np.int64)
    mask[1, 0] = 0
    ids, pos = np.array([[3, 5], [7, 9]]), np.array([[3, 4], [2, 3]])
    want = _run(ort.InferenceSession(full.SerializeToString()), arch, ids, mask, pos, past)
    got = _run(ort.InferenceSession(stamped.SerializeToString()), arch, ids, mask, pos, past)
    np.testing.assert_array_equal(got[0], want[0])
    for name in want[1]:
        np.testing.assert_array_equal(got[1][name], want[1][name])
