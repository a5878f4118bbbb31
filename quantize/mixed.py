"""Budget-driven mixed precision: the fewest, most sensitive units stay at the higher precision
until the perplexity increase on the evaluation text fits the budget.

Units and precisions: ``int4`` / ``int4-qdq``: every linear layer but the LM head (which is int8
in every plan), int4 or, kept, int8 (``MatMulNBits`` 8-bit blocks; in ``int4-qdq`` float16 weights,
see :func:`~gptedge.quantize.block_writers.write_high`). ``int8`` static: every linear
input, int8 or float (its weights stay int8: on SmolLM2 the all-weights-int8, all-activations-float
floor is -0.10 %, the loss is in the activations), through :mod:`gptedge.quantize.int8_search`.

The sensitivity of a unit is the KL divergence of the next-token distributions, on calibration
windows, from everything-high to that unit alone at the low precision, reported as the perplexity
increase it predicts (``100 * (exp(KL) - 1)``: on text the model fits, the expected increase of
the loss *is* that KL). Why this measure: a layer's own output error costs one forward pass for
all layers but is blind to what the rest of the network does with the error (SmolLM2's
massive-activation ``down_proj`` inputs and a layer whose output the residual stream swamps look
alike to it); the perplexity change on the calibration labels is the budget's own quantity but,
on the few hundred tokens one can afford per unit, a signed, label-driven sample (on the test's
tiny model the layer that costs +5.5 % on the evaluation text scored -7.4 % on its 63 calibration
tokens); the KL looks at every token's whole distribution, is never negative and converges on
far fewer tokens. It costs one forward pass per unit, all in one session of a *switch graph* that
holds both precisions of every unit, in the very kernels the bundle will run (for int4: the int4
and the 8-bit ``MatMulNBits`` of each layer, ~0.45x the float weights), blended by a ``mask``
input::

    y = y_high + mask[i] * (y_low - y_high)

The kept set is then the ``k`` most sensitive with ``k`` the smallest for which the *evaluation*
text's increase over the float source, measured in that graph, is within the budget (doubling,
then bisection). A budget that even all-high cannot meet raises ``QualityGateError`` with what was
reached. The plan goes into the manifest (``mixed_plan``); the quality gate then scores the
written bundle on the same windows.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gptedge.quantize.block_writers import (
    Float16Weight,
    replace_with_blocked_dq,
    replace_with_matmulnbits,
    write_high,
)
from gptedge.quantize.blockquant import Blocks, quantize_blocks
from gptedge.quantize.config import Int4Config, Int8Config, MixedConfig
from gptedge.quantize.graph_io import session
from gptedge.quantize.graph_utils import Linear, get_array, linear_layers
from gptedge.quantize.int4 import apply_int4, int4_plan
from gptedge.quantize.int8 import apply_int8
from gptedge.quantize.job import Job
from gptedge.quantize.registry import handler
from gptedge.quantize.switch import Scorer, fewest_kept, pct, source_nll, windows_of
from gptedge.quantize.tied_table import head_of
from gptedge.quantize.weight_only import Plan, Prepared, drop_unused, prepare, write_head
from gptedge.runtime import contract
from gptedge.runtime.errors import InputError, QualityGateError
from gptedge.runtime.graph import sort_graph

log = logging.getLogger(__name__)

MASK = "mixed_mask"


@handler(MixedConfig)
def to_mixed(job: Job, config: MixedConfig) -> None:
    ids = job.require_calibration(f"--max-ppl-increase with --mode {config.base.mode}")
    if job.eval_ids is None:
        raise InputError("mixed precision fits its plan on evaluation text: pass --eval FILE (eval_text=...)")
    judge = windows_of(job.eval_ids, min(config.eval_window, job.bundle.manifest.architecture.max_context))
    if isinstance(config.base, Int8Config):
        base = replace(config.base, search_windows=config.search_windows, search_seq_len=config.search_seq_len)
        apply_int8(job, base, judge, config.max_ppl_increase)
        found = job.record["int8_search"]
        _check(config, found["estimate_pct"], "linear input", "float")
        job.record["mixed_plan"] = _plan_record(
            config, judge, "linear input", "float activation, int8 weight",
            {e["weight"]: e["sensitivity_pct"] for e in found["kept_float"]}, found["estimate_pct"],
            {int(k): v for k, v in found["trail"].items()}, len(job.record["layers_quantized"]))
        return
    _int4_mixed(job, config, config.base, ids, judge)


def _int4_mixed(job: Job, config: MixedConfig, base: Int4Config, ids: np.ndarray, judge: np.ndarray) -> None:
    plan = int4_plan(job, base)
    prepared = prepare(job, plan)
    model = job.graphs["model"]
    high = {w: _high_form(get_array(model, w).astype(np.float32), plan) for w in prepared.blocks}
    judge_base = source_nll(job.bundle, judge)  # the float source's session is gone before the switch's exists
    graph, order = switch_graph(model, plan, prepared, high)
    sensitivity, ranked, (k, estimate, trail) = _measure(job, config, graph, order, ids, judge, judge_base)
    kept_as = "int8 weights" if plan.form == "matmulnbits" else "float16 weights"
    _check(config, estimate, "linear layer", kept_as)
    kept = [order[i] for i in ranked[:k]]
    log.info("mixed int4: %d of %d linear layers kept (%s), %.2f %% measured", k, len(order), kept_as, estimate)
    apply_int4(job, base, plan, prepared, {w: high[w] for w in kept})
    job.record["mixed_plan"] = _plan_record(config, judge, "linear layer", kept_as,
                                            {w: sensitivity[w] for w in kept}, estimate, trail, len(order))
    job.record["mixed_plan"]["sensitivity_pct"] = {w: round(v, 4) for w, v in sensitivity.items()}


def _measure(job: Job, config: MixedConfig, graph: onnx.ModelProto, order: list[str], ids: np.ndarray,
             judge: np.ndarray, judge_base: float):
    """Sensitivities on calibration windows, then the fewest kept on the evaluation windows
    (``graph`` is consumed: only its session lives on, until this returns)."""
    sess = session(graph)
    graph.Clear()
    n = len(order)
    fit = Scorer(job.bundle, sess, judge, MASK)
    every_low = pct(fit.nll(np.ones(n)), judge_base)
    if every_low <= config.max_ppl_increase:  # nothing to keep: the unit sensitivities are not needed
        return {}, [], (0, every_low, {0: every_low})
    length = min(config.search_seq_len, job.bundle.manifest.architecture.max_context)
    calib = Scorer(job.bundle, sess, windows_of(ids, length, config.search_windows), MASK)
    calib.keep_reference(np.zeros(n))
    sensitivity = {order[i]: pct(calib.kl(np.eye(n)[i]), 0.0) for i in range(n)}
    ranked = sorted(range(n), key=lambda i: -sensitivity[order[i]])
    return sensitivity, ranked, fewest_kept(ranked, n, lambda mask: pct(fit.nll(mask), judge_base),
                                            config.max_ppl_increase)


def _high_form(weight: np.ndarray, plan: Plan) -> Blocks | Float16Weight:
    if plan.form == "matmulnbits":  # 8-bit blocks as int8-dynamic writes them (plain rounding is enough at 8 bits)
        return quantize_blocks(weight, plan.block, 8, search=False, integer_zero=True)
    return Float16Weight(weight.astype(np.float16))


def _check(config: MixedConfig, reached: float, unit: str, high: str) -> None:
    if reached > config.max_ppl_increase:
        raise QualityGateError(
            f"--max-ppl-increase {config.max_ppl_increase:g}: cannot be met by mixing precisions; with every "
            f"{unit} at {high} the evaluation text's perplexity still rises {reached:.2f} %. "
            "No bundle written. Raise the budget or choose a gentler mode (int8-dynamic, fp16)")


def _plan_record(config: MixedConfig, judge: np.ndarray, unit: str, high: str, kept: dict[str, float],
                 estimate: float, trail: dict[int, float], units: int) -> dict[str, Any]:
    return {"budget_pct": config.max_ppl_increase, "unit": unit, "kept_as": high, "units": units,
            "kept": [{"name": w, "sensitivity_pct": round(v, 4)} for w, v in kept.items()],
            "measured_pct": round(estimate, 4), "eval_windows": [int(judge.shape[0]), int(judge.shape[1])],
            "search_windows": [config.search_windows, config.search_seq_len],
            "trail": {str(k): round(v, 4) for k, v in sorted(trail.items())}}


def switch_graph(model: onnx.ModelProto, plan: Plan, prepared: Prepared,
                 high: dict[str, Blocks | Float16Weight]) -> tuple[onnx.ModelProto, list[str]]:
    """The full-sequence graph (logits only) holding both precisions of every layer in ``high``,
    blended by the ``mask`` input (module doc); returns it and the weight name of each mask slot."""
    layers = linear_layers(model)
    head = head_of(model, layers)
    units = [lin for lin in layers if lin.weight in high]
    skip = {lin.weight for lin in units}
    graph = helper.make_graph([], model.graph.name, list(model.graph.input),
                              [o for o in model.graph.output if o.name == contract.LOGITS])
    graph.initializer.extend(init for init in model.graph.initializer if init.name not in skip)
    graph.node.extend(model.graph.node)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    for slot, lin in enumerate(units):
        _switch_layer(out, plan, lin, slot, prepared.blocks[lin.weight], high[lin.weight])
    if head is not None:
        write_head(out, plan, head, None, prepared.importance)
    drop_unused(out)
    out.graph.input.append(helper.make_tensor_value_info(MASK, onnx.TensorProto.FLOAT, [len(units)]))
    sort_graph(out.graph)
    return out, [lin.weight for lin in units]


def _switch_layer(model: onnx.ModelProto, plan: Plan, lin: Linear, slot: int, low: Blocks,
                  high: Blocks | Float16Weight) -> None:
    low_lin = Linear(lin.node, lin.activation, lin.weight, f"{lin.output}/low")
    if plan.form == "matmulnbits":
        replace_with_matmulnbits(model, low_lin, low, plan.accuracy_level, integer_zero=plan.integer_zero)
    else:
        replace_with_blocked_dq(model, low_lin, low)
    high_lin = Linear(f"{lin.node}/high", lin.activation, f"{lin.weight}.high", f"{lin.output}/high")
    model.graph.node.append(helper.make_node("MatMul", [lin.activation, high_lin.weight], [high_lin.output],
                                             name=high_lin.node))
    write_high(model, high_lin, high)
    base = f"{lin.output}/mixed"
    model.graph.node.extend([
        helper.make_node("Constant", [], [f"{base}/slot"], value=numpy_helper.from_array(np.array(slot, np.int64))),
        helper.make_node("Gather", [MASK, f"{base}/slot"], [f"{base}/m"]),
        helper.make_node("Sub", [low_lin.output, high_lin.output], [f"{base}/delta"]),
        helper.make_node("Mul", [f"{base}/delta", f"{base}/m"], [f"{base}/scaled"]),
        helper.make_node("Add", [high_lin.output, f"{base}/scaled"], [lin.output])])
