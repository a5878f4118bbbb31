"""One set of pruning rules: `gptedge export --prune` (torch, before the trace) and `gptedge quantize
--mode prune` (numpy, on the graph) keep the same weights and neurons of the same model.

The slow twin in test_prune_finetune.py checks whole bundles of a trained model; these run on random
tiny checkpoints, GELU and gated (SwiGLU) MLPs both."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import TINY_GPT2, TINY_LLAMA
from onnx import numpy_helper

from gptedge.exporter import ExportConfig, export_loaded
from gptedge.exporter.checkpoints.synthetic import random_checkpoint
from gptedge.exporter.pipeline import build_decoder
from gptedge.exporter.training.prune import prunable_weights, prune_unstructured
from gptedge.quantize import PruneConfig, quantize
from gptedge.quantize.prune import prune_matrix

FAST = dict(validate=False, last_logits_variant=False, ort_variant=False)


def block_weights(bundle) -> dict[str, np.ndarray]:
    model = onnx.load(str(bundle / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("layers.")}


@pytest.mark.parametrize("arch", [TINY_GPT2, TINY_LLAMA], ids=lambda a: a.activation)
@pytest.mark.parametrize("method, sparsity", [("magnitude", 0.3), ("magnitude", 0.6), ("2:4", 0.5)])
def test_export_masks_are_the_quantize_masks(arch, method, sparsity):
    checkpoint = random_checkpoint(arch, seed=5)
    decoder = build_decoder(arch, checkpoint.state_dict, "random")
    dense = {name: p.detach().numpy().T.copy() for name, p in prunable_weights(decoder).items()}  # [in, out]
    masks = prune_unstructured(decoder, method, sparsity)
    assert masks.keys() == dense.keys() and len(masks) == 4 * arch.num_layers
    for name, weight in dense.items():
        theirs = prune_matrix(weight, method, sparsity, None) != 0
        np.testing.assert_array_equal(masks[name].numpy().T, theirs, err_msg=name)
        assert float((~theirs).mean()) == pytest.approx(sparsity, abs=0.01)  # something really went
    pruned = dict(decoder.named_parameters())
    assert all((pruned[name].detach().numpy().T == np.where(masks[name].numpy().T, weight, 0)).all()
               for name, weight in dense.items())


@pytest.mark.parametrize("arch, sparsity", [(TINY_GPT2, 0.5), (TINY_LLAMA, 0.75)], ids=lambda v: getattr(v, "activation", v))
def test_structured_export_keeps_the_neurons_quantize_keeps(bundle_factory, tmp_path, arch, sparsity):
    dense = bundle_factory(arch)  # random_checkpoint(arch, seed=0), exported (shared with other tests)
    ours = export_loaded(random_checkpoint(arch, seed=0),
                         ExportConfig(prune_method="structured", sparsity=sparsity, **FAST), tmp_path / "export")
    theirs = quantize(dense, PruneConfig(method="structured", sparsity=sparsity), tmp_path / "quantize")
    exported, quantized = block_weights(ours.path), block_weights(theirs.path)
    assert exported.keys() == quantized.keys()
    for name, weight in quantized.items():
        np.testing.assert_array_equal(exported[name], weight, err_msg=name)
    width = arch.intermediate_size - int(round(arch.intermediate_size * sparsity))
    assert exported["layers.0.mlp.down.weight_t"].shape == (width, arch.hidden_size)  # really shrank
    assert ours.manifest.architecture.intermediate_size == theirs.manifest.architecture.intermediate_size == width
