"""Static int8's measured float fallback on a tiny trained model: an activation the test makes
outlier-heavy (same float function) is the one the search keeps float, and the manifest says so."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from quantize_helpers import trained_bundle

from gptedge.quantize import Int8Config, quantize
from gptedge.quantize.graph_io import save_graphs_shared
from gptedge.runtime.bundle import load_bundle

NORM, LINEAR = "layers.1.mlp_norm.weight", "layers.1.mlp.gate_up.weight_t"
CHANNEL, FACTOR = 3, 300.0


@pytest.fixture(scope="module")
def outlier_bundle(tmp_path_factory):
    """The trained bundle with one channel of layer 1's MLP input made ``FACTOR`` times larger (the
    norm's gain) and the matching weight row ``FACTOR`` times smaller: the same model, but one
    int8 scale for that input now zeroes every other channel."""
    trained = trained_bundle(tmp_path_factory.mktemp("trained"))
    out = tmp_path_factory.mktemp("outlier") / "bundle"
    shutil.copytree(trained.bundle, out)
    source = load_bundle(out)
    graphs = {out / source.manifest.files[role]["path"]: onnx.load(str(out / source.manifest.files[role]["path"]))
              for role in ("model", "model_last")}
    for model in graphs.values():
        for init in model.graph.initializer:
            if init.name in (NORM, LINEAR):
                value = numpy_helper.to_array(init).copy()
                if init.name == NORM:
                    value[CHANNEL] *= FACTOR
                else:
                    value[CHANNEL] /= FACTOR
                init.CopyFrom(numpy_helper.from_array(value, init.name))
    save_graphs_shared(graphs)
    return trained, out


def test_outlier_input_is_kept_float_and_recorded(outlier_bundle, tmp_path):
    trained, bundle = outlier_bundle
    config = Int8Config(calib_windows=4, smoothquant_alpha=None, float_search_budget=0.5, search_windows=2,
                        search_seq_len=64)
    out = quantize(bundle, config, tmp_path / "int8", calib_text=trained.calib, eval_text=trained.eval,
                   max_ppl_increase=2.0)
    entry = out.manifest.history[-1]
    kept = entry["int8_search"]["kept_float"]
    assert kept[0]["weight"] == LINEAR
    assert kept[0]["amax_over_rms"] > 10 and kept[0]["sensitivity_pct"] > 2.0
    assert len(kept) <= 3  # the rest of the model still runs int8 activations
    # SwiGLU down inputs stay float by rule (int8.ALWAYS_FLOAT), recorded apart from the search's picks
    downs = {w for w in entry["layers_quantized"] if ".mlp.down." in w}
    assert downs and downs == {k["weight"] for k in kept if ".mlp.down." in k["weight"]} | set(
        entry["int8_search"]["kept_float_by_rule"])
    assert entry["quality"]["ppl_increase_pct"] <= 2.0
    model = onnx.load(str(out.model_path))
    gate_up = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == LINEAR + "_dequantized")
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers[gate_up.input[0]] != "DequantizeLinear"  # the activation is float ...
    assert producers[gate_up.input[1]] == "DequantizeLinear"  # ... its weight int8
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) >= 4


def test_without_the_search_every_input_is_int8_and_the_outlier_costs(outlier_bundle, tmp_path):
    trained, bundle = outlier_bundle
    config = Int8Config(calib_windows=4, smoothquant_alpha=None, float_search_budget=None)
    out = quantize(bundle, config, tmp_path / "int8", calib_text=trained.calib, eval_text=trained.eval,
                   max_ppl_increase=1000.0)
    entry = out.manifest.history[-1]
    assert "int8_search" not in entry
    assert entry["quality"]["ppl_increase_pct"] > 2.0  # what the search above avoids
    model = onnx.load(str(out.model_path))
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in
                {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}]
    assert np.isfinite(entry["quality"]["ppl"])


def test_smoothquant_keeps_the_float_function_and_its_weights_on_disk(outlier_bundle):
    """SmoothQuant rewrites norms and weights so the float model computes the same logits; the
    rewritten tensors live once in the scratch file (both graphs point at the same bytes), not in
    the protos."""
    from gptedge.quantize.calibration import collect_stats
    from gptedge.quantize.evaluate import empty_feeds
    from gptedge.quantize.graph_io import ScratchWeights, load_graphs, session
    from gptedge.quantize.smoothquant import smooth

    _, bundle_dir = outlier_bundle
    bundle = load_bundle(bundle_dir)
    ids = np.arange(4, 36, dtype=np.int64) % bundle.manifest.architecture.vocab_size
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, ids.size), np.int64),
             "position_ids": np.arange(ids.size)[None]}

    def logits(graph):
        sess = session(graph)
        return sess.run(["logits"], {**feeds, **empty_feeds(bundle, sess, 1)})[0]

    graphs = load_graphs(bundle)
    before = logits(graphs["model"])
    stats = collect_stats(bundle, graphs["model"], np.tile(ids, 4), windows=2, seq_len=16, decode_steps=2)
    store = ScratchWeights()
    try:
        smoothed = smooth(graphs, stats, 0.5, store)
        assert LINEAR in smoothed
        located = {role: {i.name: tuple(e.value for e in i.external_data) for i in g.graph.initializer
                          if i.name in (NORM, LINEAR)} for role, g in graphs.items()}
        assert located["model"] == located["model_last"] and str(store.path) in located["model"][LINEAR]
        np.testing.assert_allclose(logits(graphs["model"]), before, rtol=1e-4, atol=1e-4)
    finally:
        store.close()
