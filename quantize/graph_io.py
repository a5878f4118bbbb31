"""Load a bundle's graphs with their weights, save them with weights stored once, open sessions.

The saver mirrors the exporter's: every graph of a bundle points into one ``model.onnx.data`` and
identical tensors (the weights ``model.onnx`` and ``model_last.onnx`` share) are written once.
It is a copy, not an import, because gptedge.quantize must not depend on the exporter (torch).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import external_data_helper

from gptedge.runtime.bundle import Bundle
from gptedge.runtime.errors import BundleError

EXTERNAL_DATA_NAME = "model.onnx.data"
GRAPH_ROLES = ("model", "model_last")
_INLINE_LIMIT = 1024  # bytes; smaller tensors stay inside the .onnx file
_PROTO_LIMIT = 1_800_000_000  # protobuf cannot serialize 2 GiB; bigger graphs go through a file


def load_graphs(bundle: Bundle) -> dict[str, onnx.ModelProto]:
    """role -> graph with its weights in memory, for the roles in :data:`GRAPH_ROLES`."""
    graphs = {}
    for role in GRAPH_ROLES:
        path = bundle.file(role) or (bundle.model_path if role == "model" else None)
        if path is None:
            continue
        try:
            graphs[role] = onnx.load(str(path), load_external_data=True)
        except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError, ValueError) as exc:
            raise BundleError(f"{path}: cannot load the graph ({exc}); copy the whole bundle again") from exc
    return graphs


def save_graphs_shared(models: dict[Path, onnx.ModelProto], data_name: str = EXTERNAL_DATA_NAME) -> None:
    """Save graphs so their large tensors live once, in ``data_name`` beside the first graph.

    Tensors are written from their ``raw_data`` bytes (int4 stays packed). The models are modified
    in place (their tensors now point at the data file).
    """
    paths = list(models)
    written: dict[str, tuple[int, int]] = {}
    with open(paths[0].parent / data_name, "wb") as data_file:
        for path in paths:
            model = models[path]
            for tensor in model.graph.initializer:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    continue
                raw = _raw_bytes(tensor)
                if len(raw) <= _INLINE_LIMIT:
                    continue
                digest = hashlib.sha256(raw).hexdigest() + f":{tensor.data_type}:{list(tensor.dims)}"
                if digest not in written:
                    offset = data_file.tell()
                    data_file.write(raw)
                    data_file.write(b"\0" * (-len(raw) % 64))  # 64-byte alignment eases mmap
                    written[digest] = (offset, len(raw))
                offset, length = written[digest]
                external_data_helper.set_external_data(tensor, data_name, offset, length)
                for field in ("float_data", "int32_data", "int64_data", "double_data", "raw_data"):
                    tensor.ClearField(field)
                tensor.data_location = onnx.TensorProto.EXTERNAL
            onnx.save_model(model, str(path))


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if not tensor.HasField("raw_data"):
        # typed fields (float_data, ...) -> raw little-endian bytes, same dtype
        converted = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name)
        tensor.raw_data = converted.raw_data
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
    return tensor.raw_data


def session(model: onnx.ModelProto | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU InferenceSession for an in-memory graph or a file (big graphs go through a temp file)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if isinstance(model, Path):
        return ort.InferenceSession(str(model), options, providers=providers)
    if model.ByteSize() < _PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        save_graphs_shared({path: copy})
        return ort.InferenceSession(str(path), options, providers=providers)
