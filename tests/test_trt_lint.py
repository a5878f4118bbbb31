"""`gptedge lint`: exported fp32 bundles are clean for TensorRT 10.3 and 11; hand-built graphs with
the usual TensorRT blockers fail with their reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TINY_LLAMA
from onnx import TensorProto, helper, numpy_helper

from gptedge.runtime.bundle import Manifest, write_manifest
from gptedge.runtime.cli import main
from gptedge.runtime.errors import EngineError, InputError
from gptedge.runtime.trt.lint import lint_bundle
from gptedge.runtime.trt.support import support_for


@pytest.mark.parametrize("trt", ["10.3", "10.x", "11"])
@pytest.mark.parametrize("which", ["llama_bundle", "gpt2_bundle"])
def test_exported_fp32_bundles_are_clean(request, which, trt):
    report = lint_bundle(request.getfixturevalue(which), trt)
    assert report.ok, [f.message for f in report.errors]
    assert report.graphs == ["model.onnx", "model_last.onnx"]
    assert report.nodes_checked > 50


def _bundle(tmp_path: Path, nodes, inputs, outputs, inits=(), opset=18, ir=10, domains=()) -> Path:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in domains]]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir
    folder = tmp_path / "b"
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    write_manifest(folder, Manifest(TINY_LLAMA, files={"model": {"path": "model.onnx", "portable": True,
                                                               "purpose": "test graph"}}))
    return folder


def _io(name, dtype=TensorProto.FLOAT, shape=("b", 8)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _rules(folder, trt="10.3"):
    report = lint_bundle(folder, trt)
    return report, {f.rule for f in report.errors}


def test_com_microsoft_matmulnbits_fails(tmp_path):
    w = numpy_helper.from_array(np.zeros((8, 1, 8), np.uint8), "w")
    s = numpy_helper.from_array(np.ones(8, np.float32), "s")
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=8, N=8, bits=4,
                            block_size=16, name="/layers.0/mlp/MatMulNBits")
    folder = _bundle(tmp_path, [node], [_io("x")], [_io("y")], [w, s], domains=["com.microsoft"])
    report, rules = _rules(folder)
    assert "domain" in rules and not report.ok
    (finding,) = [f for f in report.errors if f.rule == "domain"]
    assert finding.node == "/layers.0/mlp/MatMulNBits" and "com.microsoft" in finding.message


def _qdq_graph(tmp_path, zp_value=0, zp_type=np.int8):
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zp = numpy_helper.from_array(np.array(zp_value, zp_type), "zp")
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dq")]
    return _bundle(tmp_path, nodes, [_io("x")], [_io("y")], [scale, zp])


def test_qdq_symmetric_int8_is_fine_nonzero_zero_point_fails(tmp_path):
    assert lint_bundle(_qdq_graph(tmp_path / "ok"), "10.3").ok
    report, rules = _rules(_qdq_graph(tmp_path / "bad", zp_value=3))
    assert rules == {"qdq-zero-point"}
    assert "non-zero" in report.errors[0].message and "3" in report.errors[0].message


def test_qdq_uint8_fails(tmp_path):
    _report, rules = _rules(_qdq_graph(tmp_path, zp_value=128, zp_type=np.uint8))
    assert {"qdq-unsigned", "qdq-zero-point"} <= rules


def test_per_axis_activation_quantization_fails(tmp_path):
    scale = numpy_helper.from_array(np.full(8, 0.1, np.float32), "scale")
    zp = numpy_helper.from_array(np.zeros(8, np.int8), "zp")
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], axis=1, name="q"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], axis=1, name="dq")]
    _report, rules = _rules(_bundle(tmp_path, nodes, [_io("x")], [_io("y")], [scale, zp]))
    assert rules == {"qdq-per-axis"}


def test_per_channel_weight_dequantize_is_fine(tmp_path):
    w = numpy_helper.from_array(np.ones((8, 8), np.int8), "w")
    scale = numpy_helper.from_array(np.full(8, 0.1, np.float32), "scale")
    zp = numpy_helper.from_array(np.zeros(8, np.int8), "zp")
    nodes = [helper.make_node("DequantizeLinear", ["w", "scale", "zp"], ["wf"], axis=1, name="dq"),
             helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm")]
    report, _ = _rules(_bundle(tmp_path, nodes, [_io("x")], [_io("y")], [w, scale, zp]))
    assert report.ok, report.errors


def test_if_on_decode_path_fails(tmp_path):
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [_io("t")])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [_io("e")])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="/if")
    folder = _bundle(tmp_path, [node], [_io("x"), _io("c", TensorProto.BOOL, [])], [_io("y")])
    report, rules = _rules(folder)
    assert rules == {"if-decode"}
    assert report.nodes_checked == 3  # the branches were walked too


def test_too_high_opset_fails_on_10_3_but_not_on_11(tmp_path):
    folder = _bundle(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [_io("x")], [_io("y")], opset=21)
    report, rules = _rules(folder, "10.3")
    assert rules == {"opset"} and "9..20" in report.errors[0].message
    assert lint_bundle(folder, "11").ok


def test_ir_version_newer_than_parser_fails(tmp_path):
    folder = _bundle(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [_io("x")], [_io("y")], ir=11)
    assert _rules(folder, "10.3")[1] == {"ir-version"}
    assert lint_bundle(folder, "11").ok


def test_dynamic_quantization_graph_fails(tmp_path):
    w = numpy_helper.from_array(np.ones((8, 8), np.int8), "w")
    wzp = numpy_helper.from_array(np.array(0, np.int8), "wzp")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"], name="dql"),
             helper.make_node("MatMulInteger", ["xq", "w", "xzp", "wzp"], ["acc"], name="mmi"),
             helper.make_node("Cast", ["acc"], ["y"], to=TensorProto.FLOAT)]
    report, rules = _rules(_bundle(tmp_path, nodes, [_io("x")], [_io("y")], [w, wzp]))
    ops = {f.op for f in report.errors if f.rule == "op"}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert any("dynamic" in f.message for f in report.errors)


def test_real_quantize_dynamic_output_fails(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32), "w")
    src = _bundle(tmp_path / "src", [helper.make_node("MatMul", ["x", "w"], ["y"])], [_io("x", shape=("b", 64))],
                  [_io("y", shape=("b", 64))], [w])
    out = _bundle(tmp_path / "out", [helper.make_node("Relu", ["x"], ["y"])], [_io("x")], [_io("y")])
    quantize_dynamic(str(src / "model.onnx"), str(out / "model.onnx"), weight_type=QuantType.QInt8)
    report, rules = _rules(out)
    assert "op" in rules
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {f.op for f in report.errors}


def test_double_is_a_warning_only(tmp_path):
    nodes = [helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["d"], ["y"], to=TensorProto.FLOAT)]
    report, _ = _rules(_bundle(tmp_path, nodes, [_io("x")], [_io("y")]))
    assert report.ok and "dtype-double" in report.rules()


def test_int4_block_dequantize_only_on_newer_tensorrt(tmp_path):
    w = helper.make_tensor("w", TensorProto.INT4, [8, 16], np.zeros(128, np.int8).tolist())
    scale = numpy_helper.from_array(np.full((8, 1), 0.1, np.float32), "scale")
    nodes = [helper.make_node("DequantizeLinear", ["w", "scale"], ["wf"], axis=1, block_size=16, name="dq"),
             helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm")]
    folder = _bundle(tmp_path, nodes, [_io("x")], [_io("y", shape=("b", 16))], [w, scale], opset=21)
    report, rules = _rules(folder, "10.3")
    assert {"opset", "qdq-block"} <= rules
    assert lint_bundle(folder, "11").ok and lint_bundle(folder, "10.x").ok


def test_full_versions_map_to_tables():
    assert support_for("10.3.0.30").name == "10.3"
    assert support_for("10.15.1").name == "10.x"
    assert support_for("11.2.0").name == "11"
    with pytest.raises(InputError):
        support_for("8.6.1")


def test_cli_exit_codes(llama_bundle, tmp_path, capsys):
    assert main(["lint", str(llama_bundle), "--trt", "10.3"]) == 0
    folder = _bundle(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [_io("x")], [_io("y")], opset=21)
    assert main(["lint", str(folder)]) == EngineError.exit_code
    out = capsys.readouterr()
    assert "opset" in out.out and "would not parse" in out.err


def test_cli_table_keeps_whole_node_names_in_80_columns(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    w = numpy_helper.from_array(np.zeros((8, 1, 8), np.uint8), "w")
    s = numpy_helper.from_array(np.ones(8, np.float32), "s")
    name = "/layers.17/mlp/down_proj/MatMulNBits"
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=8, N=8, bits=4,
                            block_size=16, name=name)
    folder = _bundle(tmp_path, [node], [_io("x")], [_io("y")], [w, s], domains=["com.microsoft"])
    assert main(["lint", str(folder)]) == EngineError.exit_code
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 80
    first_column = "".join(line.split("│")[1].strip() for line in out.splitlines() if line.count("│") == 4)
    assert name in first_column  # whole, folded over lines rather than cut
