"""Structured pruning of whole attention heads at export (``--prune structured --prune-heads F``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import TINY_GPT2, TINY_LLAMA
from onnx import numpy_helper

from gptedge.exporter import ExportConfig, export_loaded
from gptedge.exporter.checkpoints.synthetic import random_checkpoint
from gptedge.runtime import load


@pytest.mark.parametrize("arch, heads, kv_heads", [(TINY_GPT2, 2, 2), (TINY_LLAMA, 2, 2)],
                         ids=["multi-head: whole heads go", "grouped-query: query heads per group go"])
def test_heads_are_removed_and_the_graph_shrinks(tmp_path, arch, heads, kv_heads):
    config = ExportConfig(prune_method="structured", sparsity=0.25, prune_heads=0.5)
    bundle = export_loaded(random_checkpoint(arch, seed=3), config, tmp_path / "b")
    pruned = bundle.manifest.architecture
    assert (pruned.num_heads, pruned.num_kv_heads) == (heads, kv_heads)
    assert pruned.intermediate_size == arch.intermediate_size * 3 // 4
    assert bundle.manifest.parity["passed"]  # the ONNX graph reproduces the pruned decoder
    record = next(h for h in bundle.manifest.history if h.get("step") == "prune")
    assert record["num_heads"] == heads
    model = onnx.load(str(bundle.path / "model.onnx"))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qkv = weights["layers.0.attn.qkv.weight_t"]
    assert qkv.shape == (arch.hidden_size, (heads + 2 * kv_heads) * arch.head_dim)
    assert weights["layers.1.attn.out.weight_t"].shape == (heads * arch.head_dim, arch.hidden_size)
    result = load(bundle.path).generate([1, 2, 3, 4], max_new_tokens=5, ignore_eos=True)
    assert len(result.tokens) == 5 and np.all(np.array(result.tokens) < arch.vocab_size)


def test_kept_heads_are_the_strongest(tmp_path):
    checkpoint = random_checkpoint(TINY_GPT2, seed=4)
    out = checkpoint.state_dict["layers.0.attn.out.weight"]
    out[:, 8:16] *= 10.0  # head 1 of layer 0 feeds the residual stream ten times harder
    config = ExportConfig(prune_method="structured", sparsity=0.25, prune_heads=0.75, validate=False)
    bundle = export_loaded(checkpoint, config, tmp_path / "b")
    assert bundle.manifest.architecture.num_heads == 1
    model = onnx.load(str(bundle.path / "model.onnx"))
    kept = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "layers.0.attn.out.weight_t"))
    np.testing.assert_allclose(kept, out[:, 8:16].numpy().T, rtol=1e-6)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(prune_method="2:4", prune_heads=0.5), "--prune structured"),
    (dict(prune_method="structured", prune_heads=1.0), "fraction in [0, 1)"),
])
def test_config_refuses_bad_head_fractions(kwargs, fragment):
    from gptedge.runtime.errors import InputError

    with pytest.raises(InputError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        ExportConfig(**kwargs)
