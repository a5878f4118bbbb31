"""Load a bundle's graphs without their weights, save them with weights stored once, open sessions.

Graphs are loaded *lazily*: the weights stay in the source bundle's ``model.onnx.data`` and each
external tensor's location is made absolute, so a handler reads one weight at a time
(:func:`~gptedge.quantize.graph_utils.tensor_array`) and ``model.onnx`` and ``model_last.onnx``
(which share every weight) cost no memory for the weights they do not change. Saving goes through
the runtime's :class:`~gptedge.runtime.onnx_io.SharedWeightsWriter`, as the exporter's does: it
copies the untouched tensors' bytes from the source file, one tensor at a time, every graph of a
bundle points into one ``model.onnx.data`` and identical tensors are written once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from gptedge.runtime.bundle import Bundle
from gptedge.runtime.bundle_writer import GRAPH_ROLES
from gptedge.runtime.errors import BundleError
from gptedge.runtime.onnx_io import (
    EXTERNAL_DATA_NAME,
    SharedWeightsWriter,
    external_info,
    read_external_bytes,
)

_PROTO_LIMIT = 1_800_000_000  # protobuf cannot serialize 2 GiB; bigger graphs go through a file


def load_graphs(bundle: Bundle) -> dict[str, onnx.ModelProto]:
    """role -> graph for the roles in :data:`GRAPH_ROLES`, its weights left in the bundle's files
    (absolute locations; see the module docstring)."""
    graphs = {}
    for role in GRAPH_ROLES:
        path = bundle.file(role) or (bundle.model_path if role == "model" else None)
        if path is None:
            continue
        try:
            graphs[role] = load_lazy(path)
        except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError, ValueError) as exc:
            raise BundleError(f"{path}: cannot load the graph ({exc}); copy the whole bundle again") from exc
    return graphs


def release_freed_memory(collect: bool = True) -> None:
    """Hand the C heap's freed pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).
    glibc keeps what many few-MB arrays free once its mmap threshold has risen past their size, so
    RSS stays near its peak and each later stage (a gate, parity, a child interpreter) stacks on
    top: on SmolLM2 int8-dynamic the process sat at 956 MB after its handler and 99 MB after a trim.
    ``collect``: run the garbage collector first (slow in a big process: not for per-step calls).
    Shared by the exporter's stages."""
    if collect:
        gc.collect()  # protos caught in reference cycles hold whole graphs' bytes
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def load_lazy(path: Path) -> onnx.ModelProto:
    """The graph at ``path`` without its external data, every external location made absolute."""
    model = onnx.load(str(path), load_external_data=False)
    folder = Path(path).parent.resolve()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = str(folder / entry.value)
    return model


def load_weights(model: onnx.ModelProto) -> None:
    """Read a lazily loaded graph's external tensors into it (for tools that need every weight in
    the proto, such as onnxruntime's ``quantize_dynamic``)."""
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raw = read_external_bytes(tensor)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw


def save_graphs_shared(models: dict[Path, onnx.ModelProto], data_name: str = EXTERNAL_DATA_NAME) -> None:
    """Save graphs (all in one folder) so their large tensors live once, in ``data_name`` beside
    them. The models are modified in place (their tensors now point at the data file)."""
    paths = list(models)
    with SharedWeightsWriter(paths[0].parent, data_name) as writer:
        for path in paths:
            writer.save(models[path], path.name)


def session(model: onnx.ModelProto | Path, threads: int | None = None,
            consume: bool = False) -> ort.InferenceSession:
    """A CPU InferenceSession for an in-memory graph or a file. A graph with large in-memory
    tensors or lazily loaded weights is saved to a temporary folder first (its data files linked
    there, or copied where links cannot be made), so onnxruntime maps the weights from files
    instead of holding a serialized copy of them; the folder lives as long as the session.
    ``consume``: ``model`` is a throwaway, rewritten in place (see :func:`save_for_session`)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Calibration and search sessions run a few big batches: no arena that keeps their peak
    # reserved, no prepacked second copy of every weight (both measured on SmolLM2's int8 run).
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False  # see gptedge.quantize.evaluate.scoring_session
    options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if isinstance(model, Path):
        return ort.InferenceSession(str(model), options, providers=providers)
    lazy = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if not lazy and model.ByteSize() < _PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    folder = tempfile.TemporaryDirectory(prefix="gptedge-session-")
    path = save_for_session(model, Path(folder.name), consume=consume)
    sess = ort.InferenceSession(str(path), options, providers=providers)
    sess.gptedge_folder = folder  # removed with the session
    return sess


def save_for_session(model: onnx.ModelProto, folder: Path, consume: bool = False) -> Path:
    """Save ``model`` into ``folder`` as ``graph.onnx`` for onnxruntime (which reads external
    data only from the graph's own folder): the files of its absolute external locations are
    linked in, its large in-memory tensors written to ``graph.onnx.data``. ``consume``: ``model``
    itself is rewritten (a throwaway graph: its tensors' memory is freed as they are written)."""
    target = model
    if not consume:
        target = onnx.ModelProto()
        target.CopyFrom(model)
    linked: dict[str, str] = {}
    with SharedWeightsWriter(folder, "graph.onnx.data") as writer:
        for tensor in target.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                writer.externalize(tensor)
                continue
            location = external_info(tensor)["location"]
            if not Path(location).is_absolute():
                raise BundleError(f"tensor {tensor.name!r}: external data {location!r} has no folder; load "
                                  "the graph with gptedge.quantize.graph_io.load_lazy")
            if location not in linked:
                linked[location] = f"weights{len(linked)}.data"
                _link_or_copy(Path(location), folder / linked[location])
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = linked[location]
        onnx.save_model(target, folder / "graph.onnx")
    return folder / "graph.onnx"


def _link_or_copy(source: Path, link: Path) -> None:
    """A hard link (no bytes copied) where the file system allows it, else a copy."""
    try:
        os.link(source, link)
    except OSError:
        shutil.copyfile(source, link)


class ScratchWeights:
    """Weights a pass rewrites (SmoothQuant's scaled norms and linear weights), kept on disk in one
    temporary data file instead of in the graphs' protos: every graph that holds the tensor points
    at the same bytes, so ``model.onnx`` and ``model_last.onnx`` cost one copy on disk and none in
    memory (SmolLM2's smoothed weights held ~0.5 GB per graph before). The bytes go through the
    runtime's :class:`SharedWeightsWriter` (aligned, identical tensors once); sessions link the file
    like any weight file and the bundle writer copies from it. The file goes with :meth:`close`."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="gptedge-scratch-")
        self._writer = SharedWeightsWriter(Path(self._folder.name), "scratch.data")
        self.path = self._writer.folder / self._writer.data_name

    def put(self, graphs: Iterable[onnx.ModelProto], name: str, value: np.ndarray) -> None:
        """Store ``value`` as initializer ``name`` of every graph in ``graphs`` that has it."""
        array = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        offset, length = self._writer.store(array.tobytes(), data_type)
        self._writer.flush()
        tensor = onnx.TensorProto(name=name, dims=array.shape, data_location=onnx.TensorProto.EXTERNAL,
                                  data_type=data_type)
        for key, entry in (("location", str(self.path)), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=entry)
        for graph in graphs:
            for init in graph.graph.initializer:
                if init.name == name:
                    init.CopyFrom(tensor)

    def close(self) -> None:
        self._writer.close()
        self._folder.cleanup()
