"""Budget-driven mixed precision on the tiny trained model: the layer the test makes sensitive is
the one kept at the higher precision, the manifest records the plan, the budget holds, a budget
that cannot be met says what it reached, and a budget without calibration text is refused."""

from __future__ import annotations

import shutil

import onnx
import pytest
from onnx import numpy_helper
from quantize_helpers import trained_bundle

from gptedge.quantize import Int4Config, Int8Config, MixedConfig, quantize
from gptedge.quantize.graph_io import save_graphs_shared
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.cli import main
from gptedge.runtime.errors import InputError, QualityGateError
from gptedge.runtime.trt.lint import lint_bundle

NORM, LINEAR = "layers.1.mlp_norm.weight", "layers.1.mlp.gate_up.weight_t"
CHANNEL = 3


def _rescaled(tmp_path_factory, name: str, factor: float):
    """The trained bundle with input channel ``CHANNEL`` of layer 1's MLP divided by ``factor`` (the
    norm's gain) and the matching weight row multiplied by it: the same float model, but that row
    now sets the range of its 4-bit (``factor`` ~ 100) or even 8-bit (~ 1e4) blocks, whose other
    rows round to nothing; plain-range quantization (``rtn``) cannot clip it away."""
    trained = trained_bundle(tmp_path_factory.mktemp("trained"))
    out = tmp_path_factory.mktemp(name) / "bundle"
    shutil.copytree(trained.bundle, out)
    source = load_bundle(out)
    paths = [out / source.manifest.files[role]["path"] for role in ("model", "model_last")]
    graphs = {path: onnx.load(str(path)) for path in paths}
    for model in graphs.values():
        for init in model.graph.initializer:
            if init.name in (NORM, LINEAR):
                value = numpy_helper.to_array(init).copy()
                value[CHANNEL] *= 1.0 / factor if init.name == NORM else factor
                init.CopyFrom(numpy_helper.from_array(value, init.name))
    save_graphs_shared(graphs)
    return trained, out


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory):
    return _rescaled(tmp_path_factory, "sensitive", 100.0)


def test_int4_keeps_the_sensitive_layer_int8_and_records_the_plan(sensitive, tmp_path):
    trained, bundle = sensitive
    base = Int4Config(algorithm="rtn")
    plain = quantize(bundle, base, tmp_path / "plain", calib_text=trained.calib, eval_text=trained.eval,
                     max_ppl_increase=1e6)
    mixed = quantize(bundle, MixedConfig(base, max_ppl_increase=1.0), tmp_path / "mixed",
                     calib_text=trained.calib, eval_text=trained.eval)
    entry = mixed.manifest.history[-1]
    plan = entry["mixed_plan"]
    assert entry["config"]["type"] == "MixedConfig" and entry["config"]["base"]["mode"] == "int4"
    sensitivity = plan["sensitivity_pct"]
    assert max(sensitivity, key=sensitivity.get) == LINEAR and sensitivity[LINEAR] > 1.0
    assert plan["kept"][0]["name"] == LINEAR and len(plan["kept"]) <= 2 and plan["units"] == 8
    assert plan["measured_pct"] <= 1.0 and plan["trail"]["0"] > 1.0
    assert plain.manifest.history[-1]["quality"]["ppl_increase_pct"] > 1.0  # what the plan avoids
    assert entry["quality"]["ppl_increase_pct"] <= 1.0
    assert abs(entry["quality"]["ppl_increase_pct"] - plan["measured_pct"]) < 0.05  # the same kernels and windows
    bits = {n.input[1].removesuffix("_q"): next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(mixed.model_path), load_external_data=False).graph.node if n.op_type == "MatMulNBits"}
    kept = {k["name"] for k in plan["kept"]}
    assert {w for w, b in bits.items() if b == 8} == kept | {"lm_head.weight_t"}
    assert entry["quality"]["size_mb"] > plain.manifest.history[-1]["quality"]["size_mb"]
    loose = quantize(bundle, MixedConfig(base, max_ppl_increase=1e3), tmp_path / "loose", calib_text=trained.calib,
                     eval_text=trained.eval).manifest.history[-1]["mixed_plan"]
    assert loose["kept"] == [] and loose["sensitivity_pct"] == {} and list(loose["trail"]) == ["0"]  # all int4 fits


def test_int4_qdq_cli_prints_the_plan_and_stays_standard(sensitive, tmp_path, capsys):
    trained, bundle = sensitive
    out = tmp_path / "qdq"
    # the CLI's int4 algorithm is the activation-aware one, which weighs the rescaled row by its tiny
    # input and is hurt less by it; still +5.5 % all int4, and only that layer needs keeping
    assert main(["quantize", str(bundle), "-o", str(out), "--mode", "int4-qdq", "--calib", str(trained.calib),
                 "--eval", str(trained.eval), "--max-ppl-increase", "1"]) == 0
    printed = capsys.readouterr().out
    entry = load_bundle(out).manifest.history[-1]
    kept = entry["mixed_plan"]["kept"]
    assert "mixed precision" in printed and "gate" in printed and [k["name"] for k in kept] == [LINEAR]
    assert entry["quality"]["ppl_increase_pct"] <= 1.0
    for layer in kept:
        assert layer["name"] in printed
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.name.endswith("/weight/Cast") for n in model.graph.node) == len(kept)  # kept: float16 weights
    assert lint_bundle(out, "11").ok


def test_int8_static_keeps_the_outlier_input_float(tmp_path_factory, tmp_path):
    trained, bundle = _rescaled(tmp_path_factory, "outlier", 1.0 / 300.0)  # an activation outlier instead
    config = MixedConfig(Int8Config(calib_windows=4, smoothquant_alpha=None, search_seq_len=64), max_ppl_increase=1.0,
                         search_windows=2)
    out = quantize(bundle, config, tmp_path / "int8", calib_text=trained.calib, eval_text=trained.eval)
    entry = out.manifest.history[-1]
    assert entry["mixed_plan"]["kept"][0]["name"] == LINEAR
    assert entry["int8_search"]["fitted_on"].startswith("evaluation windows")
    assert entry["quality"]["ppl_increase_pct"] <= 1.0


def test_a_budget_that_cannot_be_met_reports_what_it_reached(tmp_path_factory, tmp_path):
    trained, bundle = _rescaled(tmp_path_factory, "hopeless", 1e4)  # too much even for 8-bit blocks
    with pytest.raises(QualityGateError, match=r"cannot be met .* rises \d+\.\d+ %"):
        quantize(bundle, MixedConfig(Int4Config(algorithm="rtn"), max_ppl_increase=1.0), tmp_path / "x",
                 calib_text=trained.calib, eval_text=trained.eval)
    assert not (tmp_path / "x").exists()


def test_a_budget_without_calibration_text_is_refused(sensitive, tmp_path, capsys):
    trained, bundle = sensitive
    with pytest.raises(InputError, match="--calib FILE"):
        quantize(bundle, MixedConfig(Int4Config(), max_ppl_increase=2.0), tmp_path / "a", eval_text=trained.eval)
    code = main(["quantize", str(bundle), "-o", str(tmp_path / "b"), "--mode", "int8", "--eval", str(trained.eval),
                 "--max-ppl-increase", "2"])
    assert code == InputError.exit_code and "--calib FILE" in capsys.readouterr().err
    with pytest.raises(InputError, match="max_ppl_increase"):
        MixedConfig(Int4Config(), max_ppl_increase=-1.0)
