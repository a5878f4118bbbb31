"""``gptedge lint``: would TensorRT's ONNX parser accept every node of a bundle's graphs?

A static check on the CPU, against the support table of one TensorRT version (support.py). It
does not replace a real parse on the target; it catches the usual reasons a parse fails before
the bundle is copied to a Jetson: onnxruntime-only operators (``com.microsoft``), dynamic integer
quantization, Q/DQ with non-zero zero-points or unsigned types, too-new opsets / IR versions,
``If`` on the decode path, and types TensorRT has no tensors for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from gptedge.runtime.bundle import MODEL_NAME, check_relative_path, read_manifest
from gptedge.runtime.errors import BundleError
from gptedge.runtime.graph import GraphIndex
from gptedge.runtime.trt.support import (
    FORBIDDEN_DTYPES,
    KNOWN_UNSUPPORTED,
    QUANTIZED_DTYPES,
    STANDARD_DOMAINS,
    UNSIGNED_QUANT,
    TrtVersionSupport,
    dtype_name,
    support_for,
)

ERROR, WARNING = "error", "warning"
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_AXES_INPUT_OPS = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                   "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare"}


@dataclass(frozen=True)
class Finding:
    """One reason a graph may not parse. ``severity`` is ``"error"`` (the parser refuses it) or
    ``"warning"`` (it parses, with a caveat). ``rule`` is a short stable id for tests and tables."""

    graph: str
    node: str
    op: str
    severity: str
    rule: str
    message: str


@dataclass
class LintReport:
    """Every finding for every graph file checked against one TensorRT version."""

    trt: TrtVersionSupport
    graphs: list[str] = field(default_factory=list)
    nodes_checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        """True when every node would parse (warnings allowed)."""
        return not self.errors

    def rules(self) -> set[str]:
        return {f.rule for f in self.findings}


def lint_bundle(bundle_dir: str | os.PathLike[str], trt_version: str) -> LintReport:
    """Check ``model.onnx`` and every other portable ``.onnx`` file listed in the bundle's manifest.

    The generation graph (``model_last`` when present, else ``model``) is the decode path: an ``If``
    there is an error; elsewhere a warning.
    """
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    support = support_for(trt_version)
    report = LintReport(support)
    graphs = {"model": MODEL_NAME}
    for role, entry in manifest.files.items():
        if entry["path"].endswith(".onnx") and entry.get("portable", True):
            graphs[role] = entry["path"]
    decode_role = "model_last" if "model_last" in graphs else "model"
    for role, rel in graphs.items():
        check_relative_path(rel, str(root / "manifest.json"))
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{path}: listed in manifest.json but missing; copy the whole bundle again")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError / various; report the file either way
            raise BundleError(f"{path}: not a readable ONNX file ({exc}); re-export the bundle") from exc
        report.graphs.append(rel)
        count, findings = lint_model(model, support, name=rel, decode_path=(role == decode_role),
                                     base_dir=root)
        report.nodes_checked += count
        report.findings.extend(findings)
    return report


def lint_model(model: onnx.ModelProto, support: TrtVersionSupport, name: str = "model.onnx",
               decode_path: bool = True, base_dir: Path | None = None) -> tuple[int, list[Finding]]:
    """Lint one in-memory model; returns (nodes checked, findings)."""
    findings: list[Finding] = []

    def add(node: str, op: str, severity: str, rule: str, message: str) -> None:
        findings.append(Finding(name, node, op, severity, rule, message))

    if model.ir_version > support.max_ir_version:
        add("-", "-", ERROR, "ir-version", f"IR version {model.ir_version} is newer than {support.label} "
            f"reads (<= {support.max_ir_version}); set model.ir_version = {support.max_ir_version}")
    opset = None
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS:
            opset = imp.version
    if opset is None or not support.min_opset <= opset <= support.max_opset:
        add("-", "-", ERROR, "opset", f"default-domain opset {opset} is outside {support.label}'s "
            f"{support.min_opset}..{support.max_opset}; re-export with --opset {min(support.max_opset, 18)}")
    functions = {(f.domain, f.name): f for f in model.functions}
    ctx = _Context(support, decode_path, base_dir, _constants(model.graph), functions, add)
    count = ctx.graph(model.graph, top=True)
    return count, findings


@dataclass
class _Context:
    support: TrtVersionSupport
    decode_path: bool
    base_dir: Path | None
    constants: dict[str, TensorProto]
    functions: dict
    add: Callable[[str, str, str, str, str], None]
    q_of_const: set[str] = field(default_factory=set)  # outputs of Q nodes fed by constants (weights)

    def graph(self, graph: onnx.GraphProto, top: bool = False) -> int:
        if not top:
            self.constants.update(_constants(graph))
        self.dtypes(graph, GraphIndex(graph.node), top)
        count = 0
        for node in graph.node:
            count += 1 + self.node(node)
        return count

    def node(self, node: onnx.NodeProto) -> int:
        add, label = self.add, node.name or node.output[0]
        if node.domain not in STANDARD_DOMAINS:
            function = self.functions.get((node.domain, node.op_type))
            if function is not None:  # a model-local function: the parser inlines its body
                return sum(1 + self.node(inner) for inner in function.node)
            add(label, node.op_type, ERROR, "domain", f"operator domain {node.domain!r} is not standard "
                "ONNX (onnxruntime contrib/custom op); TensorRT's parser only knows ai.onnx — re-quantize "
                "or re-export for TensorRT (QDQ format, no contrib ops)")
            return 0
        if node.op_type not in self.support.ops:
            reason = KNOWN_UNSUPPORTED.get(node.op_type, f"not in {self.support.label}'s ONNX operator table")
            add(label, node.op_type, ERROR, "op", f"{node.op_type}: {reason}")
        if node.op_type == "If":
            sev = ERROR if self.decode_path else WARNING
            add(label, "If", sev, "if-decode", "data-dependent `If` on the decode path: TensorRT builds "
                "both branches and cannot keep one engine per profile; export without control flow")
        if node.op_type in _QDQ:
            self.qdq(node, label)
        if node.op_type in _AXES_INPUT_OPS and len(node.input) > 1 and node.input[1]:
            if node.input[1] not in self.constants:
                add(label, node.op_type, ERROR, "axes-constant", f"{node.op_type}: `axes` must be an "
                    "initializer or Constant for TensorRT; fold it (onnxsim/polygraphy surgeon sanitize)")
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None:
                self.dtype_rule(label, "Cast", int(to), "Cast target")
        inner = 0
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                inner += self.graph(attr.g)
            for sub in attr.graphs:
                inner += self.graph(sub)
        return inner

    def qdq(self, node: onnx.NodeProto, label: str) -> None:
        add, op = self.add, node.op_type
        scale = node.input[1] if len(node.input) > 1 else ""
        zp = node.input[2] if len(node.input) > 2 else ""
        attrs = {a.name: a for a in node.attribute}
        if scale not in self.constants:
            add(label, op, ERROR, "qdq-scale", f"{op}: scale {scale!r} must be a build-time constant")
            scale_size = 1
        else:
            scale_size = int(np.prod(self.constants[scale].dims)) if self.constants[scale].dims else 1
        if zp:
            tensor = self.constants.get(zp)
            if tensor is None:
                add(label, op, ERROR, "qdq-zero-point", f"{op}: zero-point {zp!r} must be an initializer")
            else:
                if tensor.data_type in UNSIGNED_QUANT:
                    add(label, op, ERROR, "qdq-unsigned", f"{op}: {dtype_name(tensor.data_type)} zero-point; "
                        "TensorRT quantizes to signed int8/int4 only (use QuantType.QInt8, symmetric)")
                values = self.array(tensor)
                if values is not None and np.any(values.astype(np.float64) != 0):
                    add(label, op, ERROR, "qdq-zero-point", f"{op}: zero-point must be 0 for TensorRT "
                        f"(found {int(np.count_nonzero(values))} non-zero, max |zp| "
                        f"{float(np.abs(values.astype(np.float64)).max()):g}); quantize symmetrically")
        elif op == "QuantizeLinear" and "output_dtype" not in attrs:
            add(label, op, ERROR, "qdq-unsigned", "QuantizeLinear without zero-point outputs uint8 by "
                "the ONNX spec; give an int8 zero-point of 0")
        block = attrs["block_size"].i if "block_size" in attrs else 0
        data_const = self.is_constant_data(node)
        if block:
            if op != "DequantizeLinear" or not data_const:
                add(label, op, ERROR, "qdq-block", f"{op}: block quantization only on DequantizeLinear of "
                    "constant weights (weight-only int4)")
            elif not self.support.block_quant:
                add(label, op, ERROR, "qdq-block", f"{op}: block-quantized (int4) weights are not supported "
                    f"by {self.support.label}; use int8 per-channel or fp16 weights there")
        elif scale_size > 1 and not data_const:
            add(label, op, ERROR, "qdq-per-axis", f"{op}: per-axis scales ({scale_size}) on an activation; "
                "TensorRT quantizes activations per-tensor only (per-channel is for weights)")

    def is_constant_data(self, node: onnx.NodeProto) -> bool:
        return bool(node.input) and (node.input[0] in self.constants or node.input[0] in self.q_of_const)

    def dtypes(self, graph: onnx.GraphProto, index: GraphIndex, top: bool) -> None:
        self.q_of_const |= {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input
                            and n.input[0] in self.constants}
        for init in _iter_constants(graph):
            users = index.readers(init.name)
            if init.data_type in QUANTIZED_DTYPES and not all(_quantized_use_ok(u, init.name) for u in users):
                self.add(init.name, "initializer", ERROR, "dtype", f"{dtype_name(init.data_type)} tensor "
                         f"{init.name!r} feeds {sorted({u.op_type for u in users})}: TensorRT accepts "
                         "quantized types only as DequantizeLinear input")
            elif init.data_type == TensorProto.UINT8 and any(u.op_type not in _QDQ for u in users):
                self.add(init.name, "initializer", ERROR, "dtype", f"uint8 constant {init.name!r}: TensorRT "
                         "uses uint8 only for network inputs/outputs")
            elif init.data_type == TensorProto.INT4 and not self.support.block_quant:
                self.add(init.name, "initializer", ERROR, "dtype", f"int4 weights {init.name!r} are not "
                         f"supported by {self.support.label}")
            else:
                self.dtype_rule(init.name, "initializer", init.data_type, f"constant {init.name!r}")
        for value in [*graph.input, *graph.output, *graph.value_info]:
            elem = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
            if elem and not (top and elem == TensorProto.UINT8):
                self.dtype_rule(value.name, "tensor", elem, f"tensor {value.name!r}")

    def dtype_rule(self, where: str, op: str, elem: int, what: str) -> None:
        if elem in FORBIDDEN_DTYPES:
            self.add(where, op, ERROR, "dtype", f"{what} has type {dtype_name(elem)}, which TensorRT lacks")
        elif elem == TensorProto.DOUBLE:
            self.add(where, op, WARNING, "dtype-double", f"{what} is double: TensorRT casts it down to "
                     "float32 (clamped to +-FLT_MAX); export float32")

    def array(self, tensor: TensorProto) -> np.ndarray | None:
        try:
            return numpy_helper.to_array(tensor, str(self.base_dir) if self.base_dir else "")
        except (OSError, ValueError) as exc:
            self.add(tensor.name, "initializer", WARNING, "unread", f"could not read {tensor.name!r} ({exc})")
            return None


def _quantized_use_ok(node: onnx.NodeProto, name: str) -> bool:
    """A quantized-type tensor may be DequantizeLinear's input or QuantizeLinear's zero-point."""
    if node.op_type == "DequantizeLinear":
        return True
    return node.op_type == "QuantizeLinear" and list(node.input).index(name) == 2


def _iter_constants(graph: onnx.GraphProto) -> Iterable[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value":
                    tensor = TensorProto()
                    tensor.CopyFrom(attr.t)
                    tensor.name = node.output[0]
                    yield tensor


def _constants(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    return {t.name: t for t in _iter_constants(graph)}
