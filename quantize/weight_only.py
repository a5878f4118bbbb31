"""Weight-only block quantization of every linear layer, the LM head and tied table included.

Shared by ``int4`` (4-bit, MatMulNBits or blocked QDQ) and ``int8-dynamic`` (8-bit MatMulNBits):
each weight is quantized once (:func:`~gptedge.quantize.blockquant.quantize_blocks`) and written
into every graph of the bundle (``model.onnx`` and ``model_last.onnx`` share their weights). The
LM head is always 8-bit and, when tied, serves the embedding lookup too
(:mod:`gptedge.quantize.tied_table`).

Algorithms (recorded in the manifest):
- ``activation-mse``: the block search weighted by each input channel's mean square on the
  calibration text (needs ``--calib``);
- ``mse``: the same search, unweighted (no calibration text);
- ``rtn``: plain asymmetric min/max rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from gptedge.quantize.act_stats import input_mean_squares
from gptedge.quantize.block_writers import replace_with_blocked_dq, replace_with_matmulnbits, write_high
from gptedge.quantize.blockquant import Blocks, quantize_blocks
from gptedge.quantize.graph_utils import get_array, linear_layers, remove_initializers
from gptedge.quantize.job import Job
from gptedge.quantize.tied_table import head_of, tie_matmulnbits, tie_qdq
from gptedge.runtime.errors import BundleError

log = logging.getLogger(__name__)

ALGORITHMS = ("activation-mse", "mse", "rtn")
HEAD_ACCURACY_LEVEL = 4  # 8-bit MatMulNBits has a fast kernel only with int8 compute


@dataclass(frozen=True)
class Plan:
    """What :func:`quantize_weights` does: ``form`` ``matmulnbits`` or ``qdq``; ``algorithm`` None
    picks ``activation-mse`` with calibration text and ``mse`` without."""

    bits: int
    block: int
    form: str
    accuracy_level: int
    algorithm: str | None
    calib_windows: int = 16
    integer_zero: bool = False  # uint zero points inside MatMulNBits (always at 8 bits) instead of the offset path


@dataclass
class Prepared:
    """A plan's weights before writing: ``blocks`` (linear weight -> its blocks, the LM head
    excepted), the per-input-channel ``importance`` and the ``algorithm`` that made them."""

    algorithm: str
    importance: dict[str, np.ndarray]
    blocks: dict[str, Blocks]


def prepare(job: Job, plan: Plan) -> Prepared:
    """Quantize every linear weight of ``job``'s model but the LM head (nothing written yet)."""
    model = job.graphs["model"]
    layers = linear_layers(model)
    head = head_of(model, layers)
    algorithm = _algorithm(job, plan)
    importance: dict[str, np.ndarray] = {}
    if algorithm == "activation-mse":
        calib = job.require_calibration(f"int{plan.bits} with algorithm activation-mse")
        assert job.architecture is not None
        importance = input_mean_squares(model, job.architecture, calib, plan.calib_windows)
    done: dict[str, Blocks] = {}
    for lin in layers:
        if head is not None and lin.weight == head.weight:
            continue
        weight = get_array(model, lin.weight).astype(np.float32)
        done[lin.weight] = quantize_blocks(weight, plan.block, plan.bits, importance.get(lin.weight),
                                           search=algorithm != "rtn", integer_zero=_integer(plan))
    return Prepared(algorithm, importance, done)


def quantize_weights(job: Job, plan: Plan, prepared: Prepared | None = None,
                     high: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantize every linear layer of ``job``'s graphs in place; returns the manifest record.

    ``prepared``: the result of :func:`prepare` (computed here when None); ``high``: weight name ->
    its higher-precision form (:func:`~gptedge.quantize.block_writers.write_high`), written instead
    of the plan's bits (mixed precision)."""
    model = job.graphs["model"]
    head = head_of(model, linear_layers(model))
    prepared = prepared or prepare(job, plan)
    algorithm, importance = prepared.algorithm, prepared.importance
    tied = _write(job, plan, prepared.blocks, head, importance, high or {})
    record: dict[str, Any] = {"algorithm": algorithm, "bits": plan.bits,
                              "zero_points": "integer" if _integer(plan) else "float (offset path)",
                              "block_size": plan.block, "format": plan.form}
    if head is not None:
        record["lm_head"] = {"weight": head.weight, "bits": 8, "tied_table_shared": tied,
                             "form": "MatMulNBits + GatherBlockQuantized" if plan.form == "matmulnbits"
                             else "int8 per-row DequantizeLinear (head and lookup)"}
    if algorithm == "activation-mse":
        record["calib_windows"] = plan.calib_windows
    return record


def _integer(plan: Plan) -> bool:
    return plan.form == "matmulnbits" and (plan.bits == 8 or plan.integer_zero)


def _algorithm(job: Job, plan: Plan) -> str:
    if plan.algorithm is not None:
        return plan.algorithm
    if job.calib_ids is None:
        log.warning("int%d: no --calib text; the weight search runs unweighted (algorithm 'mse'). "
                    "Pass --calib FILE for the activation-aware search", plan.bits)
        return "mse"
    return "activation-mse"


def _write(job: Job, plan: Plan, done: dict[str, Blocks], head, importance, high: dict[str, Any]) -> bool:
    head_table: Any = None
    tied = False
    for role, model in job.graphs.items():
        for lin in linear_layers(model):
            if head is not None and lin.weight == head.weight:
                continue
            if lin.weight not in done:
                raise BundleError(f"{role}: linear layer {lin.weight} is not in model.onnx; re-export the bundle")
            if lin.weight in high:
                write_high(model, lin, high[lin.weight])
            elif plan.form == "matmulnbits":
                replace_with_matmulnbits(model, lin, done[lin.weight], plan.accuracy_level,
                                         integer_zero=_integer(plan))
            else:
                replace_with_blocked_dq(model, lin, done[lin.weight])
        if head is not None:
            head_table, found = write_head(model, plan, head, head_table, importance)
            tied = tied or found
        drop_unused(model)
        left = [lin.weight for lin in linear_layers(model)]
        if left:
            raise BundleError(f"int{plan.bits} left linear layers in float: {left}; report this with the bundle")
    return tied


def write_head(model: onnx.ModelProto, plan: Plan, head, table, importance):
    """The LM head (and a tied lookup with it) in 8 bits; ``table``: its blocks from an earlier
    graph of the bundle or None. Returns (table, whether a tied lookup was found)."""
    current = next((lin for lin in linear_layers(model) if lin.weight == head.weight), None)
    if current is None:  # a graph without the head (never in a gptedge bundle)
        return table, False
    if plan.form == "matmulnbits":
        if table is None:
            weight = get_array(model, head.weight).astype(np.float32)
            table = quantize_blocks(weight, plan.block, 8, importance.get(head.weight), search=False,
                                    integer_zero=True)
        return table, tie_matmulnbits(model, current, table, HEAD_ACCURACY_LEVEL)
    has_untied = any(init.name == f"{head.weight}.untied" for init in model.graph.initializer)
    table = tie_qdq(model, current, table)
    return table, has_untied


def drop_unused(model: onnx.ModelProto) -> None:
    """Remove the initializers no node reads."""
    used = {name for node in model.graph.node for name in node.input}
    remove_initializers(model, {init.name for init in model.graph.initializer if init.name not in used})
