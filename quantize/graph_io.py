"""Load a bundle's graphs with their weights, save them with weights stored once, open sessions.

Saving goes through the runtime's :class:`~gptedge.runtime.onnx_io.SharedWeightsWriter`, as the
exporter's does: every graph of a bundle points into one ``model.onnx.data`` and identical tensors
(the weights ``model.onnx`` and ``model_last.onnx`` share) are written once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from gptedge.runtime.bundle import Bundle
from gptedge.runtime.bundle_writer import GRAPH_ROLES
from gptedge.runtime.errors import BundleError
from gptedge.runtime.onnx_io import EXTERNAL_DATA_NAME, SharedWeightsWriter

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
    """Save graphs (all in one folder) so their large tensors live once, in ``data_name`` beside
    them. The models are modified in place (their tensors now point at the data file)."""
    paths = list(models)
    with SharedWeightsWriter(paths[0].parent, data_name) as writer:
        for path in paths:
            writer.save(models[path], path.name)


def session(model: onnx.ModelProto | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU InferenceSession for an in-memory graph or a file (big graphs go through a temp file)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Calibration and search sessions run a few big batches: no arena that keeps their peak
    # reserved, no prepacked second copy of every weight (both measured on SmolLM2's int8 run).
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "1")
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
