"""SmoothQuant: move activation outliers into the preceding norm's weights before int8.

For a linear layer fed directly by a norm (qkv after attn_norm, up/gate_up after mlp_norm) and
each input channel j: ``s_j = max|X_j|^a / max|W_j|^(1-a)``; the norm's weight (and bias) are
divided by ``s`` and the weight rows multiplied by ``s``. The float model computes the same
function; the activations become easier to quantize per tensor. Done on the ONNX initializers, in
every graph of the bundle (they share the names).
"""

from __future__ import annotations

import numpy as np
import onnx

from gptedge.quantize.calibration import ActivationStats
from gptedge.quantize.graph_io import ScratchWeights
from gptedge.quantize.graph_utils import get_array, initializers, linear_layers
from gptedge.runtime.graph import GraphIndex


def norm_scale_inputs(model: onnx.ModelProto, tensor: str) -> list[str] | None:
    """Initializer names (weight, then bias if any) of the norm that produces ``tensor``, or None."""
    node = GraphIndex(model.graph.node).producer.get(tensor)
    inits = initializers(model)
    if node is None:
        return None
    if node.op_type == "LayerNormalization":
        return [name for name in node.input[1:3] if name in inits]
    if node.op_type == "Mul":  # RMSNorm: x * rsqrt(mean(x^2) + eps) * weight
        names = [n for n in node.input if n in inits and len(inits[n].dims) == 1 and n.endswith("norm.weight")]
        return names or None
    return None


def smooth(graphs: dict[str, onnx.ModelProto], stats: dict[str, ActivationStats], alpha: float,
           store: ScratchWeights, keep: frozenset[str] = frozenset()) -> list[str]:
    """Apply SmoothQuant with strength ``alpha`` to every graph; returns the smoothed weight names.
    The rewritten tensors go to ``store`` (on disk, one copy for all graphs). ``keep``: weights that
    must keep their values (a tied LM head that is also the lookup table)."""
    model = graphs["model"]
    users = GraphIndex(model.graph.node)
    groups: dict[str, list[str]] = {}
    for lin in linear_layers(model):
        groups.setdefault(lin.activation, []).append(lin.weight)
    plan: list[tuple[list[str], list[str], np.ndarray]] = []
    for activation, weights in groups.items():
        norm_inputs = norm_scale_inputs(model, activation)
        if not norm_inputs or len(users.readers(activation)) != len(weights) or keep.intersection(weights):
            continue  # another op reads the norm output too: scaling would change it
        x_max = np.maximum(stats[weights[0]].channel_amax, 1e-5)
        w_max = np.maximum(np.max([np.abs(get_array(model, w)).max(axis=1) for w in weights], axis=0), 1e-5)
        s = np.clip(x_max ** alpha / w_max ** (1.0 - alpha), 1e-4, 1e4).astype(np.float32)
        plan.append((norm_inputs, weights, s))
    for norm_inputs, weights, s in plan:  # the graphs share these tensors: computed once, stored once
        for name in norm_inputs:
            store.put(graphs.values(), name, get_array(model, name) / s)
        for name in weights:
            store.put(graphs.values(), name, get_array(model, name) * s[:, None])
    return sorted(w for _n, weights, _s in plan for w in weights)
