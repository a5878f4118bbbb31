"""Trace the decoder to ONNX with torch's dynamo exporter and tidy the graph for the contract.

Tidying: nodes are named by where they live (``/layers.3/attn/qkv/MatMul``) so a TensorRT or
quantizer message points at a layer; weight initializers get checkpoint-neutral names
(``layers.3.attn.qkv.weight_t``, stored [in, out]); IR version is capped for onnxruntime.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import warnings
from collections import Counter
from typing import cast

import numpy as np
import onnx
import onnx_ir as ir
import torch

from gptedge.exporter.model import Decoder
from gptedge.exporter.stamp import TRACED_LAYERS, first_layers, stamp_layers
from gptedge.runtime import contract
from gptedge.runtime.graph import GraphIndex
from gptedge.runtime.onnx_io import INLINE_LIMIT, SharedWeightsWriter

log = logging.getLogger(__name__)

_FINAL_NORM_SCOPE = "/norm/"  # tidy_graph names the final norm's nodes by its module, ``norm``
IR_VERSION = 10  # onnxruntime 1.2x–1.3x reads ≤ 10–13; TensorRT 10.3 parses 10.


class _FlatIO(torch.nn.Module):
    """Flat positional inputs/outputs so the ONNX names follow the contract exactly."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.m = decoder

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, presents = self.m(input_ids, attention_mask, position_ids, past)
        return (logits, *[t for pair in presents for t in pair])


def _example_inputs(decoder: Decoder):
    arch = decoder.arch
    batch, seq, past = 2, 3, 2
    input_ids = torch.zeros(batch, seq, dtype=torch.int64)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    position_ids = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = torch.zeros(batch, arch.num_kv_heads, past, arch.head_dim)
    return (input_ids, attention_mask, position_ids, *[kv.clone() for _ in range(2 * arch.num_layers)])


def _dynamic_shapes(num_layers: int, max_context: int):
    Dim = torch.export.Dim
    # past/total get their own dims: the exporter refuses a dim that is a sum of others.
    batch = Dim(contract.BATCH, min=1, max=4096)
    seq = Dim(contract.SEQ, min=1, max=max(max_context, 2))
    past = Dim(contract.PAST, min=0, max=max(max_context, 2))
    total = Dim(contract.TOTAL, min=1, max=2 * max(max_context, 2))
    kv = tuple({0: batch, 2: past} for _ in range(2 * num_layers))
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: seq}, "past_flat": kv}


def trace_to_onnx(decoder: Decoder, opset: int, writer: SharedWeightsWriter | None = None) -> onnx.ModelProto:
    """Export ``decoder`` (eval mode, fp32) to an ONNX model following the contract.

    With ``writer`` the large weights go straight to its shared data file and the returned graph
    references them, so no in-memory protobuf copy of the weights is ever made. Decoders deeper
    than two layers are traced at two layers and stamped out (:mod:`gptedge.exporter.stamp`).
    """
    if decoder.arch.num_layers > TRACED_LAYERS:
        model = _trace(first_layers(decoder), opset, writer)
        if stamp_layers(model, decoder.state_dict(), decoder.arch.num_layers, writer):
            return model
    return _trace(decoder, opset, writer)


def _trace(decoder: Decoder, opset: int, writer: SharedWeightsWriter | None) -> onnx.ModelProto:
    arch = decoder.arch
    wrapper = _FlatIO(decoder.eval())
    decoder.transposed_tied_table = True
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter_logs():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, _example_inputs(decoder), dynamo=True, opset_version=opset, optimize=True,
                dynamic_shapes=_dynamic_shapes(arch.num_layers, arch.max_context),
                input_names=contract.input_names(arch.num_layers),
                output_names=contract.output_names(arch.num_layers), verbose=False, report=False)
    finally:
        decoder.transposed_tied_table = False
    assert program is not None  # dynamo=True always returns an ONNXProgram
    if writer is not None:
        _externalize(program.model, writer)
    model = program.model_proto
    _release_weights(program.model)
    del program
    tidy_graph(model, arch.num_layers)
    fuse_friendly_rmsnorm(model.graph)
    return model


def last_position_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the full-logits graph whose final norm and LM head see only the last position.

    ``x[:, -1:, :]`` before the final norm, inserted as a Slice: a protobuf copy instead of a second
    trace (torch.export's symbolic shapes made each trace of a 30-layer model take 1.5 min).
    Logits become [batch, 1, vocab].
    """
    last = onnx.ModelProto()
    last.CopyFrom(model)
    graph = last.graph
    norm_nodes = [node for node in graph.node if node.name.startswith(_FINAL_NORM_SCOPE)]
    if not norm_nodes:  # no final norm (OPT-350m): the nodes after the last layer that read its output
        end = max(i for i, node in enumerate(graph.node) if node.name.startswith("/layers."))
        made_by_layers = {out for node in graph.node[:end + 1] for out in node.output}
        norm_nodes = [node for node in graph.node[end + 1:] if made_by_layers.intersection(node.input)]
    made_inside = {out for node in norm_nodes for out in node.output}
    hidden = {name for node in norm_nodes for name in node.input[:1] if name not in made_inside}
    if len(hidden) != 1:
        raise RuntimeError(f"gptedge bug: cannot find the final norm's input in the traced graph (found {sorted(hidden)})")
    source = hidden.pop()
    sliced = f"{source}_last_position"
    constants = {"starts": -1, "ends": 2**63 - 1, "axes": 1}
    for key, value in constants.items():
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([value], np.int64), f"last_position_{key}"))
    slice_node = onnx.helper.make_node("Slice", [source, *[f"last_position_{k}" for k in constants]], [sliced],
                                       name="/last_position/Slice")
    for node in norm_nodes:
        node.input[:] = [sliced if name == source else name for name in node.input]
    first = min(i for i, node in enumerate(graph.node) if any(node is n for n in norm_nodes))
    graph.node.insert(first, slice_node)
    for value in graph.output:
        if value.name == contract.LOGITS:
            value.type.tensor_type.shape.dim[1].Clear()
            value.type.tensor_type.shape.dim[1].dim_value = 1
    return last


def fuse_friendly_rmsnorm(graph: onnx.GraphProto) -> int:
    """Rewrite ``x * Reciprocal(Sqrt(v))`` (how ``torch.rsqrt`` exports) as ``x / Sqrt(v)``.

    Same maths, standard ops; but Pow-ReduceMean-Add-Sqrt-Div-Mul is the pattern onnxruntime fuses
    into one SimplifiedLayerNormalization kernel, which it does not do for the Reciprocal form
    (benchmarks/NOTES.md). Returns the number of rewrites.
    """
    index = GraphIndex(graph.node)
    dropped, count = set(), 0
    for node in graph.node:
        if node.op_type != "Mul":
            continue
        for slot in (0, 1):
            recip = index.producer.get(node.input[slot])
            if recip is None or recip.op_type != "Reciprocal" or len(index.readers(recip.output[0])) != 1:
                continue
            sqrt = index.producer.get(recip.input[0])
            if sqrt is None or sqrt.op_type != "Sqrt":
                continue
            node.op_type = "Div"
            node.name = node.name.replace("Mul", "Div")
            node.input[:] = [node.input[1 - slot], sqrt.output[0]]
            dropped.add(recip.name)
            count += 1
            break
    kept = [node for node in graph.node if node.name not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    return count


def _externalize(model: ir.Model, writer: SharedWeightsWriter) -> None:
    """Move each large initializer's bytes to the writer's file, one tensor at a time; the folded
    copies the exporter made (transposed weights) are freed as they are replaced."""
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= INLINE_LIMIT:
            continue
        offset, length = writer.store(tensor.tobytes(), int(tensor.dtype))
        value.const_value = ir.ExternalTensor(writer.data_name, offset, length, tensor.dtype,
                                              shape=cast(ir.Shape, tensor.shape), name=name,
                                              base_dir=str(writer.folder))


def _release_weights(model: ir.Model) -> None:
    """Drop the traced graph's references to the decoder's weights once the protobuf is made.

    The exported graph outlives the export: onnxscript 0.7's module-level rewrite rules keep the
    last graph they matched (``SimplePatternMatcher._graph``), and onnx_ir 1.1's graph inputs keep
    every value that was ever an input in a reference counter (keys of count 0 are not removed),
    among them the parameters the exporter first lifts as inputs. Each such value holds its
    parameter; for a checkpoint read through a memory map (safetensors) one live parameter keeps
    the whole file resident: SmolLM2 carried 540 MB more through parity. The counter is private,
    so it is read defensively; without it only the public values are released."""
    graph = model.graph
    lifted = getattr(graph.inputs, "_ref_counter", None) or {}
    for value in [*graph.inputs, *graph.initializers.values(), *lifted]:
        value.const_value = None
    graph.initializers.clear()


@contextlib.contextmanager
def _quiet_exporter_logs():
    """torch's exporter and its optimizer log every rewrite at INFO; keep the user's log readable."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _scope_of(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            # ['', 'm', 'm.layers.0', 'm.layers.0.attn', ..., 'linear_3'] -> ['layers.0', 'attn']
            parts = [s.split(".")[-1] if not s.startswith("m.layers.") or s.count(".") > 2
                     else s[2:] for s in scopes[2:-1]]
            return parts
    return []


def tidy_graph(model: onnx.ModelProto, num_layers: int) -> None:
    """Rename nodes and weights by scope, drop tracing metadata, fix IR version and dim names."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    used: Counter[str] = Counter()
    renames: dict[str, str] = {}
    for node in graph.node:
        scope = _scope_of(node)
        base = "/" + "/".join([*scope, node.op_type])
        used[base] += 1
        node.name = base if used[base] == 1 else f"{base}_{used[base] - 1}"
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in initializers:
            if node.input[1] not in renames and scope:
                renames[node.input[1]] = ".".join(scope) + ".weight_t"
        if node.op_type == "Gather" and node.input[0] in initializers:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if axis == 1:  # the tied [C, V] table: embedding lookup and LM head share it
                renames.setdefault(node.input[0], "lm_head.weight_t")
            elif scope:
                renames.setdefault(node.input[0], ".".join(scope) + ".weight")  # embed / pos_embed tables
        del node.metadata_props[:]
    del model.metadata_props[:]
    del graph.value_info[:]
    for name in initializers:  # remaining parameters: drop the tracing wrapper's "m." prefix
        if name.startswith("m.") and name not in renames:
            renames[name] = name[2:]
    taken = set(initializers)
    for old, new in renames.items():
        if new in taken:
            continue
        initializers[old].name = new
        taken.add(new)
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
    model.ir_version = IR_VERSION
    model.producer_name = "gptedge"
    _name_dynamic_dims(graph)


def _name_dynamic_dims(graph: onnx.GraphProto) -> None:
    """Give the logits' dims contract names (the exporter may call them s0, s1...)."""
    for value in graph.output:
        if value.name == contract.LOGITS:
            dims = value.type.tensor_type.shape.dim
            for dim, name in zip(dims, (contract.BATCH, contract.SEQ)):
                if not dim.HasField("dim_value"):
                    dim.dim_param = name
