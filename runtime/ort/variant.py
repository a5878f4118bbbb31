"""``model_ort.onnx``: the generation graph rewritten for onnxruntime's fused contrib kernels.

The portable graph spells attention out in standard ops (split heads, RoPE, KV ``Concat``, masked
softmax): about 45 nodes per layer, and on a CPU each node costs a kernel dispatch. Once weights
are int8/int4 those dispatches are a third of a decode step. This module rewrites a bundle's
last-position graph so that each layer's attention becomes ONE ``com.microsoft.GroupQueryAttention``
node (rotary embedding inside it, packed QKV in, KV cache in the contract's BNSH layout), and lets
onnxruntime's own optimizer fuse the rest (``SkipSimplifiedLayerNormalization`` and friends).

The rewrite only rewires nodes: every linear layer, whatever its form (fp32/fp16 ``MatMul``,
``MatMulNBits``, int8 QDQ), is kept as it is, and the weights stay in the bundle's shared data file.
Inputs and outputs keep the contract's names and shapes, so the same KV cache feeds either graph.

The variant is onnxruntime-only (``portable: false`` in the manifest) and exact only for rows
without padding: ``GroupQueryAttention`` takes one valid length per row and no arbitrary mask, so
the ORT backend runs it when the attention mask is all ones and the positions continue the cache,
and the portable graph otherwise. The lengths come from ``position_ids`` (last position + 1);
``attention_mask`` stays an input, unread.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gptedge.runtime import contract
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import BundleError
from gptedge.runtime.graph import GraphIndex, live_nodes, toposort
from gptedge.runtime.ort import fusions
from gptedge.runtime.ort.parity import NP_DTYPES, check_parity
from gptedge.runtime.tolerances import ORT_VARIANT_PARITY_LIMITS

log = logging.getLogger(__name__)

ORT_MODEL_NAME = "model_ort.onnx"
ROLE = contract.ORT_VARIANT_ROLE
MANIFEST_ENTRY = {"path": ORT_MODEL_NAME, "portable": False,
                  "purpose": "onnxruntime-only generation graph (GroupQueryAttention; rows without padding)"}
MS_DOMAIN = "com.microsoft"
# Ops a value passes through between the packed QKV Split and the KV Concat (and after attention).
_PASS_THROUGH = {"Transpose", "Reshape", "Cast", "Identity", "QuantizeLinear", "DequantizeLinear"}
_INT64_MAX = np.iinfo(np.int64).max


class VariantError(BundleError):
    """The graph does not have the attention pattern the rewrite knows; no variant is written."""


def build(graph_path: Path, arch: Architecture, kv_dtype: str) -> onnx.ModelProto:
    """The ORT variant of the contract graph at ``graph_path`` (its weights are not loaded: the
    result refers to the same external data file, so save it in the same folder)."""
    model = onnx.load(str(graph_path), load_external_data=False)
    graph = model.graph
    index = GraphIndex(graph.node)
    shared = _shared_inputs(graph, arch, kv_dtype)
    attention = [_attention_node(index, arch, layer, shared) for layer in range(arch.num_layers)]
    replaced = {out for node in attention for out in node.output}
    nodes = shared.nodes + [node for node in graph.node if not replaced.intersection(node.output)] + attention
    nodes = _ordered(nodes, graph)
    nodes, fused = fusions.fuse_all(nodes, graph)
    nodes, fused["int8_lookup"] = fusions.int8_lookup(nodes, graph)
    log.debug("%s: fused %s", graph_path.name, fused)
    if _one_logits_row(graph):  # with every position's logits (prefill M = S) packing pays off
        nodes = fusions.unpacked_lm_head(nodes, graph)
    nodes = _ordered(nodes, graph)
    needed = {name for node in nodes for name in node.input}
    kept_initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale shapes of removed tensors; onnxruntime infers its own
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def write(folder: Path, arch: Architecture, kv_dtype: str, source: str = "model_last.onnx") -> Path:
    """Build the variant from ``folder/source`` and save it as ``folder/model_ort.onnx``."""
    model = build(Path(folder) / source, arch, kv_dtype)
    path = Path(folder) / ORT_MODEL_NAME
    onnx.save(model, str(path))
    return path


def unsupported(arch: Architecture) -> str | None:
    """Why onnxruntime's GroupQueryAttention cannot run ``arch``, or None."""
    scaling = arch.rope_scaling or {}
    if arch.head_dim % 16:
        return f"head_dim {arch.head_dim} is not a multiple of 16 (GroupQueryAttention needs it)"
    if arch.qk_norm != "none":
        return "q/k norms sit between the QKV projection and the rotary embedding GroupQueryAttention applies"
    if scaling.get("rope_type") == "longrope" and arch.max_context > scaling["original_max_position_embeddings"]:
        return "LongRoPE switches frequencies with the sequence length; GroupQueryAttention takes one cache"
    if arch.rope_local_theta is not None:
        return "layers with two RoPE bases (Gemma 3) need per-layer rotary caches"
    return None


@dataclass(frozen=True)
class VariantResult:
    """What :func:`attach` hands the bundle writer: the file-table ``entries`` to add (role ->
    entry) and the ``parity`` figures of the check against the graph the variant was built from."""

    entries: Mapping[str, Mapping[str, Any]]
    parity: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"entries": {role: dict(entry) for role, entry in self.entries.items()}, "parity": dict(self.parity)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantResult:
        entries = {role: MappingProxyType(dict(entry)) for role, entry in data["entries"].items()}
        return cls(MappingProxyType(entries), MappingProxyType(dict(data["parity"])))


def attach(folder: Path, files: Mapping[str, Mapping[str, Any]], arch: Architecture,
           precision: Mapping[str, Any]) -> VariantResult | None:
    """Write ``model_ort.onnx`` into the bundle being built in ``folder`` from its last-position
    graph (``files``: the file table so far, read only; ``precision``: the manifest's precision
    section) and check it against that graph with onnxruntime. Returns the entry to record and the
    parity figures, or None (and writes nothing) when the architecture or graph does not allow the
    variant; the portable graphs serve alone then."""
    source = (files.get("model_last") or files["model"])["path"]
    kv_dtype = str(precision.get("kv_cache_dtype", "float32"))
    reason = unsupported(arch)
    if reason is None:
        try:
            path = write(folder, arch, kv_dtype, source)
        except VariantError as exc:
            reason = str(exc)
    if reason is not None:
        log.info("no %s for this bundle: %s", ORT_MODEL_NAME, reason)
        return None
    windows = [w for w in (arch.window_of(i) for i in range(arch.num_layers)) if w is not None]
    # a prompt longer than the shortest window, so the check sees the band cut
    prompt = max(5, min(min(windows, default=0) + 3, arch.max_context - 2))
    parity = check_parity(Path(folder) / source, path, arch, kv_dtype, prompt=prompt)
    kind = "qdq" if parity["qdq"] else kv_dtype
    limit = ORT_VARIANT_PARITY_LIMITS[kind] * max(1.0, parity["max_abs_logit"])
    if not parity["max_abs_diff"] <= limit:  # also catches NaN
        path.unlink()
        log.warning("%s differs from %s by %.3g (limit %.3g); not written", ORT_MODEL_NAME, source,
                    parity["max_abs_diff"], limit)
        return None
    entry = {**MANIFEST_ENTRY, "parity_max_abs_diff": parity["max_abs_diff"]}
    return VariantResult.from_dict({"entries": {ROLE: entry}, "parity": parity})


def attach_isolated(folder: Path, files: Mapping[str, Mapping[str, Any]], arch: Architecture,
                    precision: Mapping[str, Any]) -> VariantResult | None:
    """:func:`attach` in a child interpreter (same arguments and result). For the exporter: after
    tracing, torch keeps FX graphs holding ~2.4x the weights alive in its process (GPT-2 124M:
    1.2 GB), and the check's onnxruntime session would stack on top of them (export peak RSS 3.7x
    instead of 3.0x the weights)."""
    payload = json.dumps({"folder": str(folder), "files": {role: dict(entry) for role, entry in files.items()},
                          "arch": arch.to_dict(), "precision": dict(precision)})
    done = subprocess.run([sys.executable, "-m", "gptedge.runtime.ort.variant"], input=payload,
                          capture_output=True, text=True)
    if done.returncode:
        raise BundleError(f"{folder}: building {ORT_MODEL_NAME} failed in its child process: "
                          f"{done.stderr.strip()[-2000:]}; re-export with --no-ort-variant and report this")
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    for level, message in reply["log"]:
        log.log(level, "%s", message)
    return None if reply["result"] is None else VariantResult.from_dict(reply["result"])


def _child_main() -> None:
    """``python -m gptedge.runtime.ort.variant``: attach() on the JSON read from stdin; prints
    ``{"result", "log"}`` as the last stdout line."""
    request = json.loads(sys.stdin.read())
    records: list[tuple[int, str]] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.levelno, record.getMessage()))

    log.addHandler(_Keep())
    log.setLevel(logging.INFO)
    log.propagate = False
    result = attach(Path(request["folder"]), request["files"], Architecture.from_dict(request["arch"]),
                    request["precision"])
    # the reply to attach_isolated (a machine protocol on stdout, not a message to the user)
    reply = {"result": None if result is None else result.to_dict(), "log": records}
    sys.stdout.write(json.dumps(reply) + "\n")


class _Shared:
    """Nodes and tensor names every layer's attention node reads."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.seqlens_k = "gqa.seqlens_k"
        self.total_length = "gqa.total_sequence_length"
        self.cos: str = ""
        self.sin: str = ""


def _shared_inputs(graph: onnx.GraphProto, arch: Architecture, kv_dtype: str) -> _Shared:
    """Lengths for GroupQueryAttention from ``position_ids``, not from the mask: in a row without
    padding the last position is the valid length - 1. Reading the mask would make the caller bind
    a new ``[B, total]`` array every step (20 us of a 3 ms int4 step); the position array can stay
    bound and be rewritten in place."""
    shared = _Shared()
    axis1 = _constant(graph, "gqa.axis1", np.array([1], dtype=np.int64))
    last = _constant(graph, "gqa.last", np.array([-1], dtype=np.int64))
    end = _constant(graph, "gqa.end", np.array([_INT64_MAX], dtype=np.int64))
    one = _constant(graph, "gqa.one", np.array(1, dtype=np.int32))
    shared.nodes += [
        # seqlens_k = valid tokens per row - 1 = last position; total = its maximum + 1 (int32, as the op wants)
        helper.make_node("Slice", [contract.POSITION_IDS, last, end, axis1], ["gqa.last_position"],
                         name="/gqa/Slice"),
        helper.make_node("Squeeze", ["gqa.last_position", axis1], ["gqa.seqlens_k64"], name="/gqa/Squeeze"),
        helper.make_node("Cast", ["gqa.seqlens_k64"], [shared.seqlens_k], to=TensorProto.INT32, name="/gqa/Cast"),
        helper.make_node("ReduceMax", [shared.seqlens_k], ["gqa.max_seqlen_k"], keepdims=0, name="/gqa/ReduceMax"),
        helper.make_node("Add", ["gqa.max_seqlen_k", one], [shared.total_length], name="/gqa/Add"),
    ]
    if arch.position == "rope":
        cos, sin = _rope_caches(graph, arch, kv_dtype)
        shared.cos = _constant(graph, "gqa.cos_cache", cos)
        shared.sin = _constant(graph, "gqa.sin_cache", sin)
    return shared


def _rope_caches(graph: onnx.GraphProto, arch: Architecture, kv_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_context, head_dim/2] from the graph's own ``inv_freq`` (scaling already applied)."""
    found = [t for t in graph.initializer if t.name == "inv_freq"]
    if not found:
        raise VariantError("the graph has no 'inv_freq' initializer to build the rotary caches from")
    inv_freq = numpy_helper.to_array(found[0]).astype(np.float64).reshape(-1)
    if inv_freq.size * 2 != arch.head_dim:
        raise VariantError(f"inv_freq has {inv_freq.size} entries, head_dim {arch.head_dim} needs "
                           f"{arch.head_dim // 2}; partial rotary embeddings are not supported by the variant")
    # fp32 angles, as the portable graph computes them (position * inv_freq in float32)
    angles = np.arange(arch.max_context, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    dtype = NP_DTYPES[kv_dtype]
    # YaRN / LongRoPE scale cos and sin; scaled caches rotate q and k exactly as the portable graph does
    factor = np.float32((arch.rope_scaling or {}).get("attention_factor", 1.0))
    return (np.cos(angles) * factor).astype(dtype), (np.sin(angles) * factor).astype(dtype)


def _attention_node(index: GraphIndex, arch: Architecture, layer: int,
                    shared: _Shared) -> onnx.NodeProto:
    """One GroupQueryAttention node that replaces ``layer``'s attention (its outputs take over the
    names of the old attention output and of the two presents)."""
    key_out, value_out = contract.present_name(layer, "key"), contract.present_name(layer, "value")
    value_concat = _concat_of_cache(index.producer, value_out, contract.past_name(layer, "value"))
    _concat_of_cache(index.producer, key_out, contract.past_name(layer, "key"))
    split = _walk_back_to(index.producer, value_concat.input[1], "Split")
    if len(split.output) != 3:
        raise VariantError(f"layer {layer}: the QKV split has {len(split.output)} outputs, expected 3")
    attn_output = _attention_output(index.consumers, value_out, layer)
    rotary = arch.position == "rope" and layer not in (arch.nope_layers or ())
    window = arch.window_of(layer)
    extra: dict[str, Any] = {"softcap": float(arch.attn_softcap)} if arch.attn_softcap is not None else {}
    inputs = [split.input[0], "", "", contract.past_name(layer, "key"), contract.past_name(layer, "value"),
              shared.seqlens_k, shared.total_length, shared.cos if rotary else "", shared.sin if rotary else "",
              contract.POSITION_IDS if rotary else ""]
    while inputs[-1] == "":  # trailing optional inputs are left out, not named ""
        inputs.pop()
    return helper.make_node(
        "GroupQueryAttention", inputs, [attn_output, key_out, value_out], domain=MS_DOMAIN,
        name=f"/layers.{layer}/attn/GroupQueryAttention", num_heads=arch.num_heads,
        kv_num_heads=arch.num_kv_heads, do_rotary=int(rotary), rotary_interleaved=int(arch.rope_interleaved),
        scale=float(arch.attn_scale if arch.attn_scale is not None else arch.head_dim ** -0.5),
        # the window counts the query itself, like transformers' (checked by attach's parity run)
        local_window_size=window if window is not None else -1, **extra)


def _concat_of_cache(producers: dict[str, onnx.NodeProto], present: str, past: str) -> onnx.NodeProto:
    node = producers.get(present)
    if node is None or node.op_type != "Concat" or list(node.input[:1]) != [past] or len(node.input) != 2:
        raise VariantError(f"'{present}' is not Concat('{past}', new); the graph is not a gptedge export")
    return node


def _walk_back_to(producers: dict[str, onnx.NodeProto], tensor: str, op_type: str) -> onnx.NodeProto:
    for _ in range(16):
        node = producers.get(tensor)
        if node is None:
            break
        if node.op_type == op_type:
            return node
        if node.op_type not in _PASS_THROUGH:
            break
        tensor = node.input[0]
    raise VariantError(f"no {op_type} found upstream of '{tensor}'; the graph is not a gptedge export")


def _attention_output(consumers: dict[str, list[onnx.NodeProto]], present_value: str, layer: int) -> str:
    """The tensor that leaves ``layer``'s attention core: the probs x V MatMul's output, followed
    through its head-merging Transpose/Reshape chain."""
    matmuls = [n for n in _through_qdq(consumers, present_value) if n.op_type == "MatMul"]
    if len(matmuls) != 1:
        raise VariantError(f"layer {layer}: expected one MatMul reading '{present_value}', found {len(matmuls)}")
    tensor = matmuls[0].output[0]
    for _ in range(8):
        users = consumers.get(tensor, [])
        if len(users) != 1 or users[0].op_type not in ("Transpose", "Reshape"):
            return tensor
        tensor = users[0].output[0]
    raise VariantError(f"layer {layer}: the attention output chain is longer than expected")


def _through_qdq(consumers: dict[str, list[onnx.NodeProto]], tensor: str) -> Iterable[onnx.NodeProto]:
    for node in consumers.get(tensor, []):
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast"):
            yield from _through_qdq(consumers, node.output[0])
        else:
            yield node


def _constant(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _one_logits_row(graph: onnx.GraphProto) -> bool:
    logits = next(o for o in graph.output if o.name == contract.LOGITS)
    dims = logits.type.tensor_type.shape.dim
    return len(dims) == 3 and dims[1].HasField("dim_value") and dims[1].dim_value == 1


def _ordered(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The live nodes (those some graph output depends on) in a valid order."""
    try:
        return toposort(live_nodes(nodes, graph), graph)
    except ValueError as exc:
        raise VariantError(f"the rewritten graph is broken: {exc}") from exc


if __name__ == "__main__":
    _child_main()
