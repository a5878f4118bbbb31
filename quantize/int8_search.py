"""Static int8: which linear inputs stay float, chosen by measurement.

A few activations of a real model cannot be int8 per tensor: SmolLM2's ``down_proj`` inputs in
layers 11 and 28 carry "massive activations" (max |x| 3,200 against a typical 0.2), so one scale
either zeroes every ordinary value or clips the outlier the model relies on. Which ones matter is
measured, not guessed from ranges: a search copy of the graph carries every linear layer's int8
weights and, on every quantized activation ``x``,

    x + m[i] * (DequantizeLinear(QuantizeLinear(x)) - x)

with ``m`` a graph input, so one session scores any subset of int8 activations on calibration
windows. Each activation's sensitivity is the perplexity increase when it alone is int8; the most
sensitive are left float (their weights stay int8) until the whole set is within the search
budget. The result is recorded in the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gptedge.quantize.graph_io import session
from gptedge.quantize.graph_utils import linear_layers, tensor_array
from gptedge.quantize.switch import Scorer, fewest_kept, pct, source_nll, windows_of
from gptedge.runtime import contract
from gptedge.runtime.bundle import Bundle
from gptedge.runtime.graph import sort_graph

log = logging.getLogger(__name__)

MASK = "int8_search_mask"
QMAX = 127


@dataclass(frozen=True)
class SearchResult:
    """``sensitivity_pct``: activation (first weight name) -> perplexity increase (%) when it alone
    is int8; ``kept_float``: the activations left float, most sensitive first; ``estimate_pct``:
    the measured increase with every other activation int8 (weights int8 everywhere)."""

    sensitivity_pct: dict[str, float]
    kept_float: list[str]
    estimate_pct: float
    tokens: int
    trail: dict[int, float] | None = None  # activations kept float -> measured increase, each k tried


def fake_weight(weight: np.ndarray) -> np.ndarray:
    """The float values the int8 per-output-channel weight of ``weight`` [in, out] stands for."""
    scale = np.abs(weight).max(axis=0).astype(np.float32) / QMAX
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return (np.clip(np.rint(weight / scale), -QMAX, QMAX) * scale).astype(np.float32)


def search_graph(model: onnx.ModelProto, act_scales: dict[str, float]) -> tuple[onnx.ModelProto, list[str]]:
    """The switchable copy of ``model`` described in the module doc (logits its only output).

    Returns the graph and, for each entry of the mask input, the weight name of the first linear
    layer reading that activation."""
    layers = [lin for lin in linear_layers(model) if lin.weight in act_scales]
    weights = {lin.weight for lin in layers}
    graph = helper.make_graph([], model.graph.name, list(model.graph.input),
                              [o for o in model.graph.output if o.name == contract.LOGITS])
    for init in model.graph.initializer:
        if init.name in weights:
            graph.initializer.append(numpy_helper.from_array(fake_weight(tensor_array(init)), init.name))
        else:
            graph.initializer.append(init)
    slots: dict[str, int] = {}
    order: list[str] = []
    for lin in layers:
        if lin.activation not in slots:
            slots[lin.activation] = len(order)
            order.append(lin.weight)
            graph.node.extend(_switch(lin.activation, act_scales[lin.weight], slots[lin.activation]))
    rename = {act: f"{act}/int8_search" for act in slots}
    linear_nodes = {lin.node for lin in layers}
    for node in model.graph.node:
        copy = graph.node.add()
        copy.CopyFrom(node)
        if node.name in linear_nodes:
            copy.input[0] = rename[node.input[0]]
    graph.input.append(helper.make_tensor_value_info(MASK, onnx.TensorProto.FLOAT, [len(order)]))
    out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sort_graph(out.graph)
    return out, order


def _switch(x: str, scale: float, slot: int) -> list[onnx.NodeProto]:
    base = f"{x}/int8_search"
    consts = [helper.make_node("Constant", [], [f"{base}/scale"], value=numpy_helper.from_array(np.array(scale, np.float32))),
              helper.make_node("Constant", [], [f"{base}/zp"], value=numpy_helper.from_array(np.array(0, np.int8))),
              helper.make_node("Constant", [], [f"{base}/slot"], value=numpy_helper.from_array(np.array(slot, np.int64)))]
    return [*consts,
            helper.make_node("QuantizeLinear", [x, f"{base}/scale", f"{base}/zp"], [f"{base}/q"]),
            helper.make_node("DequantizeLinear", [f"{base}/q", f"{base}/scale", f"{base}/zp"], [f"{base}/dq"]),
            helper.make_node("Sub", [f"{base}/dq", x], [f"{base}/noise"]),
            helper.make_node("Gather", [MASK, f"{base}/slot"], [f"{base}/m"]),
            helper.make_node("Mul", [f"{base}/noise", f"{base}/m"], [f"{base}/scaled"]),
            helper.make_node("Add", [x, f"{base}/scaled"], [base])]


def search(bundle: Bundle, model: onnx.ModelProto, act_scales: dict[str, float], ids: np.ndarray,
           budget_pct: float, windows: int, seq_len: int, judge: np.ndarray | None = None) -> SearchResult:
    """Measure every activation's sensitivity on ``windows`` windows of ``seq_len`` calibration
    tokens and pick the fewest most sensitive to keep float so the rest stay within ``budget_pct``.

    ``judge`` [W, L]: evaluation windows on which the kept set is fitted instead, as the increase
    over the float source bundle (mixed precision); None: fitted on the calibration windows, as
    the increase over the int8-weight, float-activation graph."""
    judge_base = source_nll(bundle, judge) if judge is not None else 0.0  # before the search session exists
    graph, order = search_graph(model, act_scales)
    seq_len = min(seq_len, len(ids), bundle.manifest.architecture.max_context)
    sess = session(graph, consume=True)
    del graph
    scorer = Scorer(bundle, sess, windows_of(ids, seq_len, windows), MASK)
    n = len(order)
    fit = scorer if judge is None else Scorer(bundle, sess, judge, MASK)
    fit_base = judge_base if judge is not None else scorer.nll(np.zeros(n))
    every_int8 = pct(fit.nll(np.ones(n)), fit_base)
    if judge is None:
        sensitivity = {order[i]: pct(scorer.nll(np.eye(n)[i]), fit_base) for i in range(n)}
    elif every_int8 <= budget_pct:  # mixed precision: nothing to keep, no sensitivities needed
        sensitivity = {}
    else:  # mixed precision ranks by the KL divergence (gptedge.quantize.mixed says why)
        scorer.keep_reference(np.zeros(n))
        sensitivity = {order[i]: pct(scorer.kl(np.eye(n)[i]), 0.0) for i in range(n)}
    ranked = sorted(range(n), key=lambda i: -sensitivity.get(order[i], 0.0))
    kept, estimate, trail = fewest_kept(ranked, n, lambda mask: pct(fit.nll(mask), fit_base), budget_pct,
                                        {0: every_int8})
    log.info("int8 search: %d of %d activations kept float, %.2f %% measured", kept, n, estimate)
    return SearchResult(sensitivity_pct=sensitivity, kept_float=[order[i] for i in ranked[:kept]],
                        estimate_pct=estimate, tokens=scorer.count, trail=trail)
