"""Weight-only block quantization (int4, int8-dynamic): the block search, zero points, the int8
tied table serving both the lookup and the LM head (static int8's too), and the activation-aware
mode's refusal without calibration text. A tiny tied Llama (SmolLM2's shape of model; random weights, fixed seed;
head_dim 16 so that onnxruntime's generation graph is built too)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from conftest import TINY_LLAMA
from onnx import numpy_helper

from gptedge.quantize import Int4Config, Int8Config, Int8DynamicConfig, quantize
from gptedge.quantize.blockquant import quantize_blocks
from gptedge.quantize.evaluate import empty_feeds
from gptedge.quantize.graph_io import session
from gptedge.quantize.graph_utils import linear_layers
from gptedge.runtime import load
from gptedge.runtime.errors import InputError
from gptedge.runtime.trt.lint import lint_bundle

TIED = replace(TINY_LLAMA, hidden_size=64, head_dim=16, tie_word_embeddings=True)


def test_weights_on_a_q4_1_grid_come_back_exactly():
    rng = np.random.default_rng(0)
    blocks, n = 6, 40
    step = rng.uniform(1e-3, 1e-2, (blocks, 1, n))
    low = rng.uniform(-0.1, 0.0, (blocks, 1, n))
    levels = rng.integers(0, 16, (blocks, 32, n))
    levels[:, 0], levels[:, 1] = 0, 15  # Q4_1 maps each block's min and max to 0 and 15
    weight = (low + levels * step).reshape(blocks * 32, n).astype(np.float32)
    q = quantize_blocks(weight, 32, 4)
    np.testing.assert_allclose(q.dequantize(), weight, atol=1e-6)
    assert q.q.max() <= 15 and q.zero.dtype == np.float32


def test_activation_weights_steer_the_error_to_quiet_channels():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 48)).astype(np.float32)
    importance = rng.uniform(0, 1, 64) ** 4
    rtn = quantize_blocks(weight, 32, 4, search=False)
    plain = quantize_blocks(weight, 32, 4)
    aware = quantize_blocks(weight, 32, 4, importance)

    def cost(blocks):
        return float((importance[:, None] * (blocks.dequantize() - weight) ** 2).sum())
    assert cost(aware) < cost(plain) < cost(rtn)
    integer = quantize_blocks(weight, 32, 8, importance, integer_zero=True)
    assert np.array_equal(integer.zero, np.rint(integer.zero)) and integer.zero.max() <= 255


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tiny tied Llama with a char tokenizer (calibration text must be encodable)."""
    import json

    from gptedge.exporter import ExportConfig, export_loaded
    from gptedge.exporter.checkpoints import TokenizerFiles
    from gptedge.exporter.checkpoints.synthetic import random_checkpoint
    from gptedge.runtime.bundle import TokenizerInfo

    itos = [chr(32 + i) for i in range(TIED.vocab_size)]
    tokenizer = TokenizerFiles(info=TokenizerInfo(kind="char", file="tokenizer.char.json", vocab_size=len(itos)),
                               files={"tokenizer.char.json": json.dumps({"itos": itos}).encode()})
    out = tmp_path_factory.mktemp("tied") / "b"
    export_loaded(replace(random_checkpoint(TIED, 0), tokenizer=tokenizer), ExportConfig(), out)
    return out


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    return path


def _logits(path, ids):
    sess = session(path)
    from gptedge.runtime.bundle import load_bundle
    bundle = load_bundle(path.parent)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None], **empty_feeds(bundle, sess, 1)}
    return sess.run(["logits"], feeds)[0]


def _nodes(path, op_type):
    model = onnx.load(str(path), load_external_data=False)
    return [n for n in model.graph.node if n.op_type == op_type], model


def test_int4_matmulnbits_shares_the_int8_table_between_lookup_and_head(tied, calib, tmp_path):
    out = quantize(tied, Int4Config(), tmp_path / "int4", calib_text=calib, max_ppl_increase=1e6)
    entry = out.manifest.history[-1]
    assert entry["algorithm"] == "activation-mse" and entry["lm_head"]["tied_table_shared"]
    for role in ("model", "model_last"):
        matmuls, model = _nodes(out.file(role), "MatMulNBits")
        bits = {n.output[0]: next(a.i for a in n.attribute if a.name == "bits") for n in matmuls}
        assert bits.pop("logits") == 8 and set(bits.values()) == {4}
        (lookup,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
        head = next(n for n in matmuls if n.output[0] == "logits")
        assert lookup.input[0] == head.input[1]  # one uint8 tensor serves both
        assert not [i for i in model.graph.initializer if i.name.startswith("lm_head") and
                    i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
        assert not linear_layers(model)
    ids = np.array([[1, 5, 9, 17, 33, 60]], np.int64)
    source, quantized = _logits(tied / "model.onnx", ids), _logits(out.model_path, ids)
    assert np.abs(quantized - source).max() < 0.1 * np.abs(source).max()
    with load(out.path) as generator:
        assert len(generator.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True).tokens) == 4


def test_int4_qdq_is_standard_symmetric_with_an_int8_table(tied, calib, tmp_path):
    out = quantize(tied, Int4Config(format="qdq"), tmp_path / "qdq", calib_text=calib, max_ppl_increase=1e6)
    assert lint_bundle(out.path, "11").ok
    dqs, model = _nodes(out.model_path, "DequantizeLinear")
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert all(len(n.input) == 2 for n in dqs)  # zero-point 0 (TensorRT); the offsets ride beside
    assert sum(n.name.endswith("/offset/Add") for n in model.graph.node) == len(dqs) - 2
    table = [n for n in dqs if n.input[0] == "lm_head.weight_t_int8"]
    assert {n.name for n in table} == {"/lm_head/weight/DequantizeLinear", "/embed/weight/DequantizeLinear"}
    inits = {i.name: i for i in model.graph.initializer}
    assert inits["lm_head.weight_t_int8"].data_type == onnx.TensorProto.INT8
    assert list(inits["lm_head.weight_t_scale"].dims) == [TIED.vocab_size]  # one scale per row
    # onnxruntime's generation graph gathers int8 rows instead of dequantizing the table per call
    variant, variant_model = _nodes(out.path / "model_ort.onnx", "DequantizeLinear")
    assert [n.name for n in variant if n.input[0] == "lm_head.weight_t_int8"] == ["/lm_head/weight/DequantizeLinear"]
    # ... from aliases of the same bytes, so that the head's DequantizeLinear -> MatMul stays fusable
    gathers = {n.input[0] for n in variant_model.graph.node if n.op_type == "Gather"}
    assert {"lm_head.weight_t_int8.lookup", "lm_head.weight_t_scale.lookup"} <= gathers
    assert sorted(p.name for p in out.path.glob("*.data")) == ["model.onnx.data"]
    assert out.manifest.files["model_ort"]["parity_max_abs_diff"] < 1e-3
    ids = np.array([[2, 4, 8, 16, 32]], np.int64)
    source, quantized = _logits(tied / "model.onnx", ids), _logits(out.model_path, ids)
    assert np.abs(quantized - source).max() < 0.1 * np.abs(source).max()


def test_int8_dynamic_blocks_have_zero_points_and_share_the_table(tied, tmp_path):
    out = quantize(tied, Int8DynamicConfig(), tmp_path / "int8")
    model = onnx.load(str(out.model_path))
    matmuls = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert all(len(n.input) == 4 for n in matmuls)  # uint8 zero points
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert any(np.any(inits[n.input[3]] != 128) for n in matmuls)
    (lookup,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert lookup.input[0] == "lm_head.weight_t_q"


def test_activation_aware_search_refuses_without_calibration_text(tied, tmp_path):
    with pytest.raises(InputError, match="--calib"):
        quantize(tied, Int4Config(algorithm="activation-mse"), tmp_path / "x")
    out = quantize(tied, Int4Config(format="qdq"), tmp_path / "y")  # the documented default: unweighted
    assert out.manifest.history[-1]["algorithm"] == "mse"


def test_int8_static_looks_up_the_heads_own_int8_weight(tied, calib, tmp_path):
    config = Int8Config(smoothquant_alpha=0.5, calib_windows=2, search_windows=1, search_seq_len=64)
    out = quantize(tied, config, tmp_path / "int8", calib_text=calib, max_ppl_increase=1e6)
    entry = out.manifest.history[-1]
    assert entry["lm_head"]["tied_table_shared"]
    assert "lm_head.weight_t" not in entry["smoothquant_layers"]  # its values are the lookup table too
    assert lint_bundle(out.path, "10.3").ok
    for role in ("model", "model_last"):
        dqs, model = _nodes(out.file(role), "DequantizeLinear")
        table = {n.name for n in dqs if n.input[0] == "lm_head.weight_t_quantized"}
        assert "/embed/weight/DequantizeLinear" in table and len(table) == 2
        assert not [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and
                    len(i.dims) == 2 and TIED.vocab_size in i.dims]  # no float copy of the table left
    ids = np.array([[3, 7, 11, 19, 40]], np.int64)
    source, quantized = _logits(tied / "model.onnx", ids), _logits(out.model_path, ids)
    assert np.abs(quantized - source).max() < 0.1 * np.abs(source).max()
    assert out.manifest.files["model_ort"]["parity_max_abs_diff"] < 1e-3
