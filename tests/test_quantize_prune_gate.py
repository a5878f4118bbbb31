"""Pruning (structural promises), the quality gate, bad inputs, configs and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from quantize_helpers import trained_bundle

from gptedge.quantize import Fp16Config, Int4Config, Int8Config, PruneConfig, quantize
from gptedge.quantize.graph_utils import get_array, linear_layers
from gptedge.quantize.prune import prune_matrix
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.cli import main
from gptedge.runtime.errors import InputError, QualityGateError


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return trained_bundle(tmp_path_factory.mktemp("trained"))


def _weights(bundle):
    model = onnx.load(str(bundle.model_path))
    return {lin.weight: get_array(model, lin.weight) for lin in linear_layers(model)}


def test_structured_pruning_shrinks_matrices_and_still_runs(trained, tmp_path):
    out = quantize(trained.bundle, PruneConfig(method="structured", sparsity=0.5), tmp_path / "s",
                   eval_text=trained.eval, max_ppl_increase=1000.0)
    width = load_bundle(trained.bundle).manifest.architecture.intermediate_size
    assert out.manifest.architecture.intermediate_size == width // 2
    weights = _weights(out)
    assert weights["layers.0.mlp.gate_up.weight_t"].shape[1] == width  # gate + up halves
    assert weights["layers.1.mlp.down.weight_t"].shape[0] == width // 2
    for role in ("model", "model_last"):
        onnx.checker.check_model(str(out.file(role)), full_check=True)
    quality = out.manifest.history[-1]["quality"]
    assert quality["size_mb"] < quality["size_mb_source"]
    assert np.isfinite(quality["ppl"]) and quality["ppl"] < 65  # worse, but far from uniform


def test_two_four_pattern_and_wanda_with_int8_after(trained, tmp_path):
    config = PruneConfig(method="2:4", sparsity=0.5, then=Int8Config(calib_windows=4))
    out = quantize(trained.bundle, config, tmp_path / "p", calib_text=trained.calib, max_ppl_increase=1000.0)
    assert out.manifest.precision["weights"] == "int8" and out.manifest.precision["sparsity"]["method"] == "2:4"
    model = onnx.load(str(out.model_path))
    q = numpy_helper.to_array(next(i for i in model.graph.initializer
                                   if i.name == "layers.0.mlp.down.weight_t_quantized"))
    groups = q.reshape(-1, 4, q.shape[1])
    assert np.all((groups != 0).sum(axis=1) <= 2)
    lm_head = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "lm_head.weight_t_quantized"))
    assert (lm_head == 0).mean() < 0.2  # the LM head stays dense


def test_prune_matrix_methods():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    magnitude = prune_matrix(w, "magnitude", 0.25, None)
    assert (magnitude == 0).sum() == 32 and np.abs(w[magnitude == 0]).max() <= np.abs(w[magnitude != 0]).min()
    norm = np.ones(16)
    norm[0] = 1e6  # a huge activation channel survives Wanda even with small weights
    wanda = prune_matrix(w * np.where(np.arange(16) == 0, 1e-3, 1.0)[:, None], "wanda", 0.5, norm)
    assert np.all(wanda[0] != 0) and np.all((wanda == 0).sum(axis=0) == 8)


def test_gate_failure_writes_nothing(trained, tmp_path):
    out = tmp_path / "fails"
    with pytest.raises(QualityGateError, match="budget"):
        quantize(trained.bundle, PruneConfig(method="structured", sparsity=0.75), out,
                 eval_text=trained.eval, max_ppl_increase=0.01)
    assert not out.exists() and not list(tmp_path.glob(".fails*"))


def test_prune_needs_explicit_budget(trained, tmp_path):
    with pytest.raises(InputError, match="max-ppl-increase"):
        quantize(trained.bundle, PruneConfig(), tmp_path / "x", eval_text=trained.eval)


@pytest.mark.parametrize("kind", ["missing", "empty", "short"])
def test_bad_calibration_files(trained, tmp_path, kind):
    path = {"missing": tmp_path / "nope.txt", "short": trained.short}.get(kind, tmp_path / "empty.txt")
    if kind == "empty":
        path.write_text("  \n", encoding="utf-8")
    with pytest.raises(InputError, match="--calib"):
        quantize(trained.bundle, Int8Config(), tmp_path / "out", calib_text=path)
    assert not (tmp_path / "out").exists()


def test_int8_static_needs_calibration_and_fp32_source(trained, tmp_path):
    with pytest.raises(InputError, match="--calib"):
        quantize(trained.bundle, Int8Config(), tmp_path / "a")
    fp16 = quantize(trained.bundle, Fp16Config(), tmp_path / "h")  # no text: gate skipped with a warning
    with pytest.raises(InputError, match="float32"):
        quantize(fp16.path, Int4Config(), tmp_path / "b")


@pytest.mark.parametrize("make", [
    lambda: Int8Config(calib_method="mse"), lambda: Int8Config(smoothquant_alpha=2.0),
    lambda: Int4Config(block_size=48), lambda: Int4Config(format="gptq"), lambda: Int4Config(algorithm="gptq"),
    lambda: Int4Config(format="qdq", zero_points="integer"), lambda: Int4Config(calib_windows=0),
    lambda: PruneConfig(method="2:4", sparsity=0.7), lambda: PruneConfig(sparsity=1.0),
    lambda: PruneConfig(then=PruneConfig()), lambda: Fp16Config(keep_fp32=("not an op",))])
def test_configs_validate_themselves(make):
    with pytest.raises(InputError):
        make()


def test_cli_quantize_and_eval(trained, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["quantize", str(trained.bundle), "-o", str(out), "--mode", "int4-qdq", "--block-size", "64",
                 "--eval", str(trained.eval), "--max-tokens", "1500"]) == 0
    assert "int4-qdq" in capsys.readouterr().out
    assert load_bundle(out).manifest.history[-1]["block_size"] == 64
    assert main(["eval", str(out), "--text", str(trained.eval), "--max-tokens", "500", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 499 and 1 < result["ppl"] < 65
    code = main(["quantize", str(trained.bundle), "-o", str(tmp_path / "g"), "--mode", "prune",
                 "--prune-method", "structured", "--sparsity", "0.75", "--eval", str(trained.eval),
                 "--max-ppl-increase", "0.01"])
    assert code == QualityGateError.exit_code and not (tmp_path / "g").exists()


def test_quantize_package_never_imports_torch():
    code = "import sys, gptedge.quantize, gptedge.quantize.registry as r; r.handler_for(gptedge.quantize.Fp16Config()); " \
           "assert 'torch' not in sys.modules and 'gptedge.exporter' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
