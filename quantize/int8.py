"""Static int8 in QDQ form: ``Q/DQ`` on the linear layers' inputs and weights only, zero-point 0.

Quantizing every activation (the attention-mask path included, as stock ``quantize_static``
does) collapses a model, so this pass inserts its own nodes, and only these, before every linear
MatMul (LM head included)::

    x -> QuantizeLinear(s_x, 0) -> DequantizeLinear(s_x, 0) -\
                                                               MatMul -> y
    W_int8 [in, out] -> DequantizeLinear(s_w[out], 0, axis=1) -/

Activations: symmetric per tensor, scale from calibration (prefill + decode). Weights: symmetric
per output channel; a tied embedding is looked up from the LM head's int8 weight (one copy, one
scale per vocabulary row: :func:`~gptedge.quantize.tied_table.share_lookup`; SmoothQuant leaves
that head alone). Only standard ONNX ops (opset >= 13 for per-axis DQ); TensorRT and the ORT CPU
both run it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gptedge.quantize.calibration import ActivationStats, calibration_span, collect_stats
from gptedge.quantize.config import Int8Config
from gptedge.quantize.graph_utils import (
    linear_layers,
    opset_version,
    remove_initializers,
    set_opset,
    tensor_array,
)
from gptedge.quantize.int8_search import search
from gptedge.quantize.job import Job
from gptedge.quantize.registry import handler
from gptedge.quantize.smoothquant import smooth
from gptedge.quantize.text import require_tokens
from gptedge.quantize.tied_table import head_of, share_lookup, tied_lookup

QMAX = 127
# SwiGLU down-projection inputs carry SmolLM2's "massive activations" (max |x| / rms up to 740).
# The search on 4 windows kept 24 of 30 float; the other 6 cost 1.16 points of wiki.test perplexity
# (+2.03 % -> +0.87 %), so they stay float by rule, whatever the search measures (their weights stay int8).
ALWAYS_FLOAT = (".mlp.down.",)


@handler(Int8Config)
def to_int8(job: Job, config: Int8Config) -> None:
    apply_int8(job, config)


def apply_int8(job: Job, config: Int8Config, judge: np.ndarray | None = None, budget_pct: float = 0.0) -> None:
    """Static int8 of ``job``. ``judge`` [W, L]: evaluation windows on which the linear inputs kept
    float are chosen so the increase over the source is at most ``budget_pct`` (mixed precision);
    None: chosen on calibration windows by ``config.float_search_budget``."""
    job.require_source_precision("int8")
    ids = job.require_calibration("int8 (static)")
    require_tokens(ids, calibration_span(job.bundle, config.calib_seq_len, config.calib_decode_steps), "--calib")
    head = head_of(job.graphs["model"], linear_layers(job.graphs["model"]))
    tied = frozenset([head.weight] if head is not None and tied_lookup(job.graphs["model"], head) else [])
    if config.smoothquant_alpha is not None:  # a tied head keeps its values: they are the lookup table too
        stats = _stats(job, config, ids)
        job.record["smoothquant_layers"] = smooth(job.graphs, stats, config.smoothquant_alpha, job.scratch(),
                                                   keep=tied)
    stats = _stats(job, config, ids)
    scales: dict[str, float | None] = {
        w: max(s.threshold(config.calib_method, config.percentile), 1e-8) / QMAX for w, s in stats.items()}
    tokens = int(sum(s.tokens for s in stats.values()) // max(len(stats), 1))
    if config.float_search_budget is not None or judge is not None:
        budget = budget_pct if judge is not None else config.float_search_budget or 0.0
        scales = _keep_float(job, config, ids, stats, scales, judge, budget)
    del stats
    for model in job.graphs.values():
        insert_qdq(model, scales)
        if tied and head is not None and head.weight in scales:  # one int8 table: head and lookup (issue 16)
            share_lookup(model, head, head.weight + "_quantized", head.weight + "_scale")
    if head is not None:
        job.record["lm_head"] = {"weight": head.weight, "bits": 8, "tied_table_shared": bool(tied),
                                 "form": "int8 per-channel DequantizeLinear (head and lookup)"}
    job.precision.update(weights="int8", activations="int8", cpu_only=False)
    job.record.update(calib_method=config.calib_method, layers_quantized=sorted(scales), calib_tokens=tokens)


def _keep_float(job: Job, config: Int8Config, ids: np.ndarray, stats: dict[str, ActivationStats],
                scales: dict[str, float | None], judge: np.ndarray | None, budget: float) -> dict[str, float | None]:
    """Measure which linear inputs stay float (int8_search), add those kept by rule
    (:data:`ALWAYS_FLOAT`) and record both in the manifest."""
    found = search(job.bundle, job.graphs["model"], {w: s for w, s in scales.items() if s is not None}, ids,
                   budget, config.search_windows, config.search_seq_len, judge)
    job.record["int8_search"] = {
        "tokens": found.tokens, "budget_pct": budget, "estimate_pct": round(found.estimate_pct, 3),
        "fitted_on": "calibration windows" if judge is None else f"evaluation windows ({judge.shape[0]} x {judge.shape[1]})",
        "trail": {str(k): round(v, 3) for k, v in sorted((found.trail or {}).items())},
        "kept_float": [{"weight": w, "sensitivity_pct": round(found.sensitivity_pct[w], 3),
                        "amax": round(stats[w].amax, 3), "amax_over_rms": round(stats[w].amax_over_rms, 1)}
                       for w in found.kept_float],
        "kept_float_by_rule": sorted(w for w in scales if any(p in w for p in ALWAYS_FLOAT) and w not in found.kept_float)}
    kept = set(found.kept_float) | set(job.record["int8_search"]["kept_float_by_rule"])
    return {w: None if w in kept else s for w, s in scales.items()}


def _stats(job: Job, config: Int8Config, ids: np.ndarray):
    return collect_stats(job.bundle, job.graphs["model"], ids, windows=config.calib_windows,
                         seq_len=config.calib_seq_len, decode_steps=config.calib_decode_steps)


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 of ``weight`` [in, out] -> (int8 [in, out], scale [out])."""
    scale = np.abs(weight).max(axis=0).astype(np.float32) / QMAX
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale


def insert_qdq(model: onnx.ModelProto, act_scales: dict[str, float | None]) -> None:
    """Insert activation Q/DQ and int8 weight DQ before every linear layer whose weight is in
    ``act_scales`` (weight name -> activation scale; None: the activation stays float and only
    the weight is int8). The float weights are removed."""
    if opset_version(model) < 13:
        set_opset(model, 13)
    inits = {init.name: init for init in model.graph.initializer}
    done_acts: dict[str, str] = {}
    new_nodes, new_inits, dropped = [], [], set()
    targets = {lin.node: lin for lin in linear_layers(model) if lin.weight in act_scales}
    for node in model.graph.node:
        lin = targets.get(node.name)
        if lin is not None:
            act_scale = act_scales[lin.weight]
            if act_scale is None:
                done_acts.setdefault(lin.activation, lin.activation)
            elif lin.activation not in done_acts:
                nodes, tensors, dq_name = _activation_qdq(lin.activation, act_scale, lin.weight)
                new_nodes += nodes
                new_inits += tensors
                done_acts[lin.activation] = dq_name
            weight = tensor_array(inits[lin.weight]).astype(np.float32)
            q, scale = quantize_weight(weight)
            base = lin.weight
            new_inits += [numpy_helper.from_array(q, base + "_quantized"),
                          numpy_helper.from_array(scale, base + "_scale"),
                          numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + "_zero_point")]
            new_nodes.append(helper.make_node("DequantizeLinear", [base + "_quantized", base + "_scale",
                                                                   base + "_zero_point"], [base + "_dequantized"],
                                              axis=1, name=node.name + "/weight/DequantizeLinear"))
            node.input[0], node.input[1] = done_acts[lin.activation], base + "_dequantized"
            dropped.add(lin.weight)
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    remove_initializers(model, dropped)
    model.graph.initializer.extend(new_inits)


def _activation_qdq(tensor: str, scale: float, weight: str):
    prefix = weight.removesuffix(".weight_t").removesuffix("_t")
    scale_name, zp_name = f"{prefix}.input_scale", f"{prefix}.input_zero_point"
    q_name, dq_name = f"{tensor}_quantized", f"{tensor}_dequantized"
    node_base = "/" + prefix.replace(".", "/").replace("layers/", "layers.") + "/input"
    nodes = [helper.make_node("QuantizeLinear", [tensor, scale_name, zp_name], [q_name], name=node_base + "/QuantizeLinear"),
             helper.make_node("DequantizeLinear", [q_name, scale_name, zp_name], [dq_name],
                              name=node_base + "/DequantizeLinear")]
    tensors = [numpy_helper.from_array(np.array(scale, np.float32), scale_name),
               numpy_helper.from_array(np.array(0, np.int8), zp_name)]
    return nodes, tensors, dq_name
