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
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gptedge.quantize.evaluate import empty_feeds, summed_nll
from gptedge.quantize.graph_io import session
from gptedge.quantize.graph_utils import linear_layers, tensor_array
from gptedge.runtime import contract
from gptedge.runtime.bundle import Bundle
from gptedge.runtime.graph import sort_graph

log = logging.getLogger(__name__)

MASK = "int8_search_mask"
NLL_CHUNK = 64  # positions per float64 log-softmax
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


class _Scorer:
    """Mean next-token NLL of fixed calibration windows under a given mask. ``model`` is consumed
    (its in-memory weights move to the session's files). One window per run and the NLL in chunks
    of positions: a batch's full logits (4 x 256 x 49k on SmolLM2: 200 MB, five times that in the
    float64 softmax) were the search's peak."""

    def __init__(self, bundle: Bundle, model: onnx.ModelProto, tokens: np.ndarray) -> None:
        self.sess = session(model, consume=True)
        self.tokens = tokens
        length = tokens.shape[1]
        self.feeds = {contract.ATTENTION_MASK: np.ones((1, length), np.int64),
                      contract.POSITION_IDS: np.arange(length, dtype=np.int64)[None, :],
                      **empty_feeds(bundle, self.sess, 1)}
        self.targets = tokens[:, 1:]

    def nll(self, mask: np.ndarray) -> float:
        total = 0.0
        for row in self.tokens:
            feeds = {**self.feeds, contract.INPUT_IDS: row[None, :], MASK: mask.astype(np.float32)}
            (logits,) = self.sess.run([contract.LOGITS], feeds)
            for begin in range(0, len(row) - 1, NLL_CHUNK):
                end = min(begin + NLL_CHUNK, len(row) - 1)
                total += summed_nll(logits[0, begin:end], row[begin + 1:end + 1])
        return total / self.targets.size


def search(bundle: Bundle, model: onnx.ModelProto, act_scales: dict[str, float], ids: np.ndarray,
           budget_pct: float, windows: int, seq_len: int) -> SearchResult:
    """Measure every activation's sensitivity on ``windows`` windows of ``seq_len`` calibration
    tokens and pick the fewest most sensitive to keep float so the rest stay within ``budget_pct``."""
    graph, order = search_graph(model, act_scales)
    seq_len = min(seq_len, len(ids), bundle.manifest.architecture.max_context)
    starts = np.linspace(0, len(ids) - seq_len, num=windows).astype(np.int64)
    scorer = _Scorer(bundle, graph, np.stack([ids[s:s + seq_len] for s in starts]))
    del graph
    n = len(order)
    base = scorer.nll(np.zeros(n))

    def increase(mask: np.ndarray) -> float:
        return 100.0 * math.expm1(scorer.nll(mask) - base)

    sensitivity = {order[i]: increase(np.eye(n)[i]) for i in range(n)}
    ranked = sorted(range(n), key=lambda i: -sensitivity[order[i]])
    kept, estimate = _fewest_float(ranked, n, increase, budget_pct)
    log.info("int8 search: %d of %d activations kept float, %.2f %% estimated", kept, n, estimate)
    return SearchResult(sensitivity_pct=sensitivity, kept_float=[order[i] for i in ranked[:kept]],
                        estimate_pct=estimate, tokens=int(scorer.targets.size))


def _fewest_float(ranked: list[int], n: int, increase, budget_pct: float) -> tuple[int, float]:
    """Smallest k such that keeping ``ranked[:k]`` float is within budget (doubling, then bisection;
    the increase shrinks as k grows, up to noise)."""
    def measured(k: int) -> float:
        mask = np.ones(n)
        mask[ranked[:k]] = 0.0
        return increase(mask)

    results = {0: measured(0)}
    if results[0] <= budget_pct:
        return 0, results[0]
    low, high = 0, 1
    while high < n:
        results[high] = measured(high)
        if results[high] <= budget_pct:
            break
        low, high = high, min(n, high * 2)
    if high >= n:
        high = n
        results[n] = measured(n) if n not in results else results[n]
    while high - low > 1:
        mid = (low + high) // 2
        results[mid] = measured(mid)
        low, high = (low, mid) if results[mid] <= budget_pct else (mid, high)
    return high, results[high]
