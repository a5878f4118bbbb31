"""FP16 conversion on every family the exporter emits: untied Llama head, tied Llama head,
Qwen2-style q/k/v biases and GPT-2 (learned positions, LayerNorm, tied head). Each FP16 bundle
must be a valid single-assignment graph, load in onnxruntime, generate, and stay close to FP32."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import pytest
from conftest import TINY_GPT2, TINY_LLAMA

from gptedge.quantize import Fp16Config, quantize
from gptedge.quantize.evaluate import empty_feeds, greedy_tokens
from gptedge.quantize.graph_io import session
from gptedge.runtime.bundle import load_bundle

FAMILIES = {
    "llama-untied": TINY_LLAMA,
    "llama-tied": replace(TINY_LLAMA, tie_word_embeddings=True),
    "qwen2-qkv-bias": replace(TINY_LLAMA, qkv_bias=True, tie_word_embeddings=True),
    "gpt2": TINY_GPT2,
}
pytestmark = pytest.mark.slow  # three extra exports beyond the shared session bundles


@pytest.fixture(scope="module")
def fp16_pair(bundle_factory, tmp_path_factory):
    cache = {}

    def make(name):
        if name not in cache:
            source = bundle_factory(FAMILIES[name])
            out = quantize(source, Fp16Config(), tmp_path_factory.mktemp("fp16") / name)
            cache[name] = (load_bundle(source), out)
        return cache[name]
    return make


def _prefill_logits(bundle, ids: np.ndarray) -> np.ndarray:
    sess = session(bundle.model_path)
    feeds = {"input_ids": ids[None, :], "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None, :], **empty_feeds(bundle, sess, 1)}
    return sess.run(["logits"], feeds)[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fp16_graph_is_single_assignment_and_valid(name, fp16_pair):
    _, fp16 = fp16_pair(name)
    for role in ("model", "model_last"):
        model = onnx.load(str(fp16.file(role)), load_external_data=False)
        outputs = Counter(out for node in model.graph.node for out in node.output)
        assert not [out for out, count in outputs.items() if count > 1]
        onnx.checker.check_model(str(fp16.file(role)), full_check=True)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fp16_logits_and_greedy_match_fp32(name, fp16_pair):
    source, fp16 = fp16_pair(name)
    ids = (np.arange(12, dtype=np.int64) * 7) % source.manifest.architecture.vocab_size
    want, got = _prefill_logits(source, ids), _prefill_logits(fp16, ids)
    assert got.dtype == np.float32 and got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= 2e-2 * scale
    src_tokens, _ = greedy_tokens(source, ids[:4], 8)
    out_tokens, _ = greedy_tokens(fp16, ids[:4], 8)
    assert np.mean(np.equal(src_tokens, out_tokens)) >= 0.75


def test_fp16_survives_massive_activations(tmp_path):
    """Real models carry residual values in the thousands (SmolLM2 reaches 25,000): x^2 in the
    RMSNorm then overflows FP16. The norm statistics must stay FP32 from the square to the
    division, with no FP16 tensor (and no FP16 round trip) in between."""
    from gptedge.exporter import ExportConfig, export_loaded
    from gptedge.exporter.checkpoints.synthetic import random_checkpoint
    from gptedge.quantize.fp16 import norm_statistics_nodes

    checkpoint = random_checkpoint(TINY_LLAMA, seed=3)
    checkpoint.state_dict["embed.weight"] = checkpoint.state_dict["embed.weight"] * 30000.0  # mean x^2 > 65504
    source = export_loaded(checkpoint, ExportConfig(), tmp_path / "fp32")
    fp16 = quantize(source.path, Fp16Config(), tmp_path / "fp16")
    ids = np.arange(10, dtype=np.int64) * 5 % TINY_LLAMA.vocab_size
    want, got = _prefill_logits(source, ids), _prefill_logits(fp16, ids)
    assert np.all(np.isfinite(got))
    assert np.abs(got - want).max() <= 2e-2 * float(np.abs(want).max())

    fp32_graph = onnx.load(str(source.model_path), load_external_data=False)
    chain = set(norm_statistics_nodes(fp32_graph))
    chain_ops = Counter(node.op_type for node in fp32_graph.graph.node if node.name in chain)
    norms = 2 * TINY_LLAMA.num_layers + 1
    assert chain_ops["Pow"] == chain_ops["ReduceMean"] == chain_ops["Add"] == chain_ops["Sqrt"] == norms

    fp16_graph = onnx.load(str(fp16.model_path), load_external_data=False)
    to_fp16 = {node.output[0] for node in fp16_graph.graph.node if node.op_type == "Cast"
               and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in node.attribute)}
    statistics = [node for node in fp16_graph.graph.node if node.name in chain and node.op_type != "Pow"]
    assert len(statistics) >= 4 * norms
    assert [node.name for node in statistics if to_fp16 & set(node.input[:1])] == []
