"""Save several ONNX graphs of one bundle so that their weights live once, in one external file.

Used by the exporter (``model.onnx`` + ``model_last.onnx``) and the quantizer. Graphs are written one
at a time, so only one graph's tensors need to be in memory at once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import external_data_helper

EXTERNAL_DATA_NAME = "model.onnx.data"
INLINE_LIMIT = 1024  # bytes; smaller tensors stay inside the .onnx file
_ALIGN = 64  # bytes; aligned tensors can be memory-mapped


class SharedWeightsWriter:
    """Append the large initializers of each saved graph to ``folder/model.onnx.data``; a tensor
    whose bytes and dtype were already written is pointed at the existing byte range."""

    def __init__(self, folder: Path, data_name: str = EXTERNAL_DATA_NAME):
        self.folder = Path(folder)
        self.data_name = data_name
        self._written: dict[str, tuple[int, int]] = {}
        self._file = open(self.folder / data_name, "wb")  # noqa: SIM115 - closed in close()

    def save(self, model: onnx.ModelProto, name: str) -> Path:
        """Move ``model``'s large tensors to the shared file (emptying them in ``model``) and save
        the graph as ``folder/name``."""
        for tensor in model.graph.initializer:
            self.externalize(tensor)
        self.flush()
        path = self.folder / name
        onnx.save_model(model, path)
        return path

    def externalize(self, tensor: onnx.TensorProto) -> None:
        """Move a large ``tensor``'s bytes to the shared file (small ones are left). An external
        tensor whose location is an absolute path (a graph loaded lazily from another folder, see
        ``gptedge.quantize.graph_io``) has its bytes copied from there; other external ones are left."""
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if not Path(external_info(tensor).get("location", "")).is_absolute():
                return
            raw = read_external_bytes(tensor)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
        elif tensor_nbytes(tensor) <= INLINE_LIMIT:
            return
        else:
            raw = _raw_bytes(tensor)
        offset, length = self.store(raw, tensor.data_type)
        if not tensor.HasField("raw_data"):
            tensor.raw_data = raw  # set_external_data insists on raw_data being present
        external_data_helper.set_external_data(tensor, self.data_name, offset, length)
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
        tensor.data_location = onnx.TensorProto.EXTERNAL

    def find(self, raw: bytes, data_type: int) -> tuple[int, int] | None:
        """(offset, length) of identical bytes of ``data_type`` already in the file, else None."""
        return self._written.get(self._key(raw, data_type))

    @staticmethod
    def _key(raw: bytes, data_type: int) -> str:
        return hashlib.sha256(raw).hexdigest() + f":{data_type}"

    def store(self, raw: bytes, data_type: int) -> tuple[int, int]:
        """Write ``raw`` (a tensor's bytes of ONNX ``data_type``) unless identical bytes of that type
        are already in the file; return its (offset, length) there."""
        key = self._key(raw, data_type)
        if key not in self._written:
            offset = self._file.tell()
            self._file.write(raw)
            self._file.write(b"\0" * (-len(raw) % _ALIGN))
            self._written[key] = (offset, len(raw))
        return self._written[key]

    def flush(self) -> None:
        """Make the bytes stored so far readable by other readers of the file."""
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SharedWeightsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data (int4/uint4 packed two per byte)."""
    count = 1
    for dim in tensor.dims:
        count *= dim
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """A tensor's external-data entries (location, offset, length) as a dict."""
    return {entry.key: entry.value for entry in tensor.external_data}


def read_external_bytes(tensor: onnx.TensorProto, folder: Path | None = None) -> bytes:
    """The bytes of an external ``tensor`` (its location relative to ``folder``, or absolute)."""
    info = external_info(tensor)
    path = Path(info["location"]) if folder is None else Path(folder) / info["location"]
    with open(path, "rb") as file:
        file.seek(int(info.get("offset", 0)))
        raw = file.read(int(info.get("length", tensor_nbytes(tensor))))
    if len(raw) != int(info.get("length", tensor_nbytes(tensor))):
        from gptedge.runtime.errors import BundleError
        raise BundleError(f"{path}: truncated (tensor {tensor.name!r}); copy the whole bundle folder again")
    return raw


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    # typed fields (float_data, int32_data ...) -> ONNX's raw little-endian layout (int4 stays packed)
    return onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name).raw_data


def check_external_data(model_path: Path, root: Path | None = None) -> None:
    """Refuse a graph whose external data could read outside the bundle, before any runtime opens it.

    Reads only the graph (``load_external_data=False``), then checks every tensor stored outside it
    (initializers, sparse initializers and attribute tensors, subgraphs included): its location must
    be a plain relative path, must resolve (symlinks followed) inside ``root`` (default: the graph's
    folder), must exist, and ``offset + length`` must lie within the file. Raises BundleError.
    """
    from gptedge.runtime.bundle import check_relative_path
    from gptedge.runtime.errors import BundleError

    model_path = Path(model_path)
    base = Path(root or model_path.parent).resolve()
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: a truncated or foreign file
        raise BundleError(f"{model_path}: not a readable ONNX graph ({exc}); copy the whole bundle "
                          "folder again or re-export it") from exc
    for tensor in _stored_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        where = f"{model_path} (tensor {tensor.name!r})"
        location = info.get("location", "")
        check_relative_path(location, where)
        target = model_path.parent / location
        if not target.resolve().is_relative_to(base):
            raise BundleError(f"{where}: external data {location!r} is a link that leads outside the bundle "
                              f"folder {base}; copy the real file into the bundle")
        if not target.is_file():
            raise BundleError(f"{where}: external data file {target} is missing; copy the whole bundle "
                              "folder again")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", tensor_nbytes(tensor)))
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{where}: malformed external data offset/length ({exc}); re-export") from exc
        size = target.stat().st_size
        if offset < 0 or length < 0 or offset + length > size:
            raise BundleError(f"{where}: needs bytes {offset}..{offset + length} of {target.name}, which has "
                              f"only {size}; the file is truncated: copy the whole bundle folder again")


def external_data_locations(model_path: Path) -> list[str]:
    """The files (relative to the graph's folder) holding a graph's external data, sorted; the
    graph itself is read without them. Call :func:`check_external_data` first on untrusted graphs."""
    model = onnx.load(str(model_path), load_external_data=False)
    return sorted({entry.value for tensor in _stored_tensors(model.graph)
                   if tensor.data_location == onnx.TensorProto.EXTERNAL
                   for entry in tensor.external_data if entry.key == "location"})


def _stored_tensors(graph: onnx.GraphProto):
    """Every TensorProto a graph stores: initializers, sparse ones, attribute tensors, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            for sparse in attr.sparse_tensors:
                yield from (sparse.values, sparse.indices)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _stored_tensors(sub)

