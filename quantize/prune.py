"""One-shot pruning of the transformer blocks' linear layers (the LM head stays dense).

Unstructured (``magnitude``, ``wanda``) and 2:4 pruning zero weights in place: the files keep
their size unless a precision step follows, and speed-ups need sparse kernels (TensorRT 2:4 on
Ampere+). ``structured`` removes whole MLP neurons — columns of up/gate_up (and bias), rows of
down — so the matrices really shrink and decode gets faster; ``architecture.intermediate_size``
is updated. Attention heads are not removed (the Reshape constants and GQA grouping would need
rewriting in both graphs; see README).

Quality drops without a recovery fine-tune; that step needs torch and lives in the exporter.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx

from gptedge.quantize.calibration import ActivationStats, calibration_span, collect_stats
from gptedge.quantize.config import PruneConfig
from gptedge.quantize.graph_utils import Linear, get_array, initializers, linear_layers, set_array
from gptedge.quantize.job import Job
from gptedge.quantize.registry import handler, handler_for
from gptedge.quantize.text import require_tokens
from gptedge.runtime.graph import GraphIndex

_MLP = re.compile(r"^layers\.(\d+)\.mlp\.(up|gate_up|down)\.weight_t$")


@handler(PruneConfig)
def prune(job: Job, config: PruneConfig) -> None:
    job.require_source_precision("pruning")
    stats = _calibration_stats(job, config)
    if config.method == "structured":
        kept = prune_mlp_neurons(job, config.sparsity, stats)
        job.architecture = dataclasses.replace(job.architecture, intermediate_size=kept)
        job.record["intermediate_size"] = kept
    else:
        zeroed = {}
        for lin in linear_layers(job.graphs["model"]):
            if not lin.weight.startswith("layers."):
                continue  # LM head stays dense
            weight = get_array(job.graphs["model"], lin.weight)
            norm = stats[lin.weight].channel_norm if stats else None
            pruned = prune_matrix(weight, config.method, config.sparsity, norm)
            zeroed[lin.weight] = float((pruned == 0).mean())
            for graph in job.graphs.values():
                set_array(graph, lin.weight, pruned)
        job.record["sparsity_by_layer"] = zeroed
    job.precision["sparsity"] = {"method": config.method, "fraction": config.sparsity}
    if config.then is not None:
        handler_for(config.then)(job, config.then)


def _calibration_stats(job: Job, config: PruneConfig) -> dict[str, ActivationStats] | None:
    if job.calib_ids is None:
        if config.method == "wanda":
            job.require_calibration("wanda pruning")
        return None
    require_tokens(job.calib_ids, calibration_span(job.bundle, None, 0), "--calib")
    return collect_stats(job.bundle, job.graphs["model"], job.calib_ids, windows=config.calib_windows,
                         decode_steps=0)


def prune_matrix(weight: np.ndarray, method: str, sparsity: float, norm: np.ndarray | None) -> np.ndarray:
    """``weight`` [in, out] with the entries :func:`keep_mask` drops set to 0."""
    return np.where(keep_mask(weight, method, sparsity, norm), weight, 0.0).astype(weight.dtype)


def keep_mask(weight: np.ndarray, method: str, sparsity: float, norm: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask [in, out] of the entries of ``weight`` [in, out] that survive pruning.

    Scores: |W|, times the input-channel activation norm (Wanda) when ``norm`` is given.
    ``magnitude``: global per matrix; ``wanda``: per output column; ``2:4``: best 2 of every 4
    consecutive inputs per output column. The exporter's torch-side pruning (``gptedge export
    --prune``) selects with this function too.
    """
    score = np.abs(weight) * (norm[:, None] if norm is not None else 1.0)
    keep = np.ones(weight.shape, bool)
    if method == "magnitude":
        k = int(round(weight.size * sparsity))
        if k:
            keep.ravel()[np.argsort(score, axis=None, kind="stable")[:k]] = False
    elif method == "wanda":
        k = int(round(weight.shape[0] * sparsity))
        order = np.argsort(score, axis=0, kind="stable")[:k]
        np.put_along_axis(keep, order, False, axis=0)
    elif method == "2:4":
        rows = weight.shape[0] - weight.shape[0] % 4
        groups = score[:rows].reshape(rows // 4, 4, -1)
        low = np.argsort(groups, axis=1, kind="stable")[:, :2, :]
        group_keep = np.ones(groups.shape, bool)
        np.put_along_axis(group_keep, low, False, axis=1)
        keep[:rows] = group_keep.reshape(rows, -1)
    else:
        raise ValueError(f"no unstructured pruning rule {method!r}")
    return keep


def neuron_keep_count(width: int, sparsity: float) -> int:
    """How many of ``width`` MLP neurons survive removing the ``sparsity`` fraction (at least one)."""
    return max(1, width - int(round(width * sparsity)))


def kept_neurons(down: np.ndarray, up_parts: list[np.ndarray], keep_count: int,
                 channel_norm: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the ``keep_count`` MLP neurons with the highest score.

    ``down`` is the down projection [I, H] and ``up_parts`` the up projection [H, I] (gate's and
    up's halves for gated MLPs), both [in, out]. Score: ||down row|| (what the neuron feeds out)
    times, with calibration, the neuron's activation norm ``channel_norm``, else ||column|| of
    every up part.
    """
    score = np.linalg.norm(down, axis=1)
    if channel_norm is not None:  # how much each neuron actually feeds down on real text
        score = score * channel_norm
    else:
        for part in up_parts:
            score = score * np.linalg.norm(part, axis=0)
    return np.sort(np.argsort(-score, kind="stable")[:keep_count])


def _bias_of(model: onnx.ModelProto, output: str) -> str | None:
    inits = initializers(model)
    for node in GraphIndex(model.graph.node).readers(output):
        if node.op_type == "Add":
            names = [n for n in node.input if n in inits and len(inits[n].dims) == 1]
            if names:
                return names[0]
    return None


def prune_mlp_neurons(job: Job, sparsity: float, stats: dict[str, ActivationStats] | None) -> int:
    """Remove the ``sparsity`` fraction of MLP neurons of every layer; returns the new width."""
    model = job.graphs["model"]
    width = job.architecture.intermediate_size
    keep_count = neuron_keep_count(width, sparsity)
    layers: dict[int, dict[str, Linear]] = {}
    for lin in linear_layers(model):
        match = _MLP.match(lin.weight)
        if match:
            layers.setdefault(int(match[1]), {})[match[2]] = lin
    for _index, parts in sorted(layers.items()):
        down = parts["down"]
        up = parts.get("up") or parts["gate_up"]
        w_up, w_down = get_array(model, up.weight), get_array(model, down.weight)
        gated = "gate_up" in parts
        columns = [w_up[:, :width], w_up[:, width:]] if gated else [w_up]
        norm = stats[down.weight].channel_norm if stats is not None else None
        keep = kept_neurons(w_down, columns, keep_count, norm)
        index_up = np.concatenate([keep, keep + width]) if gated else keep
        for graph in job.graphs.values():
            output = next(lin.output for lin in linear_layers(graph) if lin.weight == up.weight)
            up_bias = _bias_of(graph, output)
            set_array(graph, up.weight, w_up[:, index_up])
            set_array(graph, down.weight, w_down[keep, :])
            if up_bias:
                set_array(graph, up_bias, get_array(graph, up_bias)[index_up])
            if gated:
                _fix_split_sizes(graph, output, keep_count)
    return keep_count


def _fix_split_sizes(model: onnx.ModelProto, produced: str, half: int) -> None:
    """gate_up's output is split in two halves; a constant split-sizes input must shrink too."""
    inits = initializers(model)
    index = GraphIndex(model.graph.node)
    out = produced
    for node in index.readers(out):
        if node.op_type == "Add":  # bias add between MatMul and Split
            out = node.output[0]
    for node in index.readers(out):
        if node.op_type == "Split" and len(node.input) > 1 and node.input[1] in inits:
            set_array(model, node.input[1], np.array([half, half], np.int64))
