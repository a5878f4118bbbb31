"""Per-input-channel mean squares of the linear layers' inputs on calibration text.

``E[x_k**2]`` over every token of ``windows`` calibration windows, for the activation-aware weight
search of :mod:`gptedge.quantize.blockquant` (the diagonal of each layer's ``X^T X``). The float
graph runs one window at a time with the layers' inputs added as outputs, so memory stays at one
window's activations on top of the session.
"""

from __future__ import annotations

import numpy as np
import onnx

from gptedge.quantize.graph_io import session
from gptedge.quantize.graph_utils import linear_layers
from gptedge.runtime import contract
from gptedge.runtime.bundle import Architecture


def input_mean_squares(model: onnx.ModelProto, arch: Architecture, ids: np.ndarray, windows: int,
                       seq_len: int | None = None) -> dict[str, np.ndarray]:
    """weight name -> ``E[x**2]`` [in] of its layer's input over the calibration windows.

    ``model``: the full-sequence float graph (left as it was); ``ids``: calibration token ids.
    Windows of ``seq_len`` tokens (default: the context, at most 256) are taken evenly from ``ids``."""
    layers = linear_layers(model)
    activations = sorted({lin.activation for lin in layers})
    length = min(seq_len or min(arch.max_context, 256), len(ids))
    starts = np.linspace(0, len(ids) - length, num=max(1, windows)).astype(int)
    added = len(model.graph.output)
    for name in activations:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    try:
        sess = session(model)
    finally:
        del model.graph.output[added:]
    sums = {name: np.zeros(0, np.float64) for name in activations}
    count = 0
    empty = np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), np.float32)
    for start in sorted(set(starts.tolist())):
        tokens = ids[start:start + length][None, :].astype(np.int64)
        feeds = {contract.INPUT_IDS: tokens, contract.ATTENTION_MASK: np.ones_like(tokens),
                 contract.POSITION_IDS: np.arange(tokens.shape[1], dtype=np.int64)[None, :],
                 **{name: empty for name in contract.past_names(arch.num_layers)}}
        for name, value in zip(activations, sess.run(activations, feeds), strict=True):
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name] = (sums[name] if sums[name].size else 0.0) + (x * x).sum(axis=0)
        count += tokens.shape[1]
    del sess
    return {lin.weight: (sums[lin.activation] / count).astype(np.float32) for lin in layers}
