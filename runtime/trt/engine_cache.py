"""Engine files in a bundle's ``engines/`` folder: cache keys, a versioned header, atomic writes.

A TensorRT engine only runs on the TensorRT version and GPU that built it. Each engine file is
``<role>-<digest>.engine`` = our header + TensorRT's serialized plan:

    MAGIC (16 bytes) | header version (uint32 LE) | JSON length (uint32 LE) | JSON | plan bytes

The JSON holds the :class:`EngineKey` (TensorRT version, GPU name, compute capability, precision,
profiles, ONNX sha256, graph role) and the build options, so a stale engine is recognised — and the
exact rebuild command printed — before TensorRT is asked to deserialize it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

from gptedge.runtime.errors import EngineError

ENGINE_DIR = "engines"
MAGIC = b"GPTEDGE-TRTPLAN\x00"
HEADER_VERSION = 1
_FIXED = struct.Struct("<II")


@dataclass(frozen=True)
class Environment:
    """Where an engine is built or run: TensorRT version, GPU name, compute capability ("8.7")."""

    trt_version: str
    gpu_name: str
    compute_capability: str


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. ``precision`` is the manifest's weights/KV dtypes (the
    graph decides precision: strongly typed build); ``profiles`` is profiles_signature(...) as
    canonical JSON; ``onnx_sha256`` covers the graph file and its external weight files."""

    trt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    role: str
    profiles: str
    onnx_sha256: str

    @classmethod
    def create(cls, env: Environment, precision: str, role: str, profiles: list[dict[str, Any]],
               onnx_sha256: str) -> EngineKey:
        return cls(env.trt_version, env.gpu_name, env.compute_capability, precision, role,
                   json.dumps(profiles, sort_keys=True, separators=(",", ":")), onnx_sha256)

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]

    @property
    def filename(self) -> str:
        return f"{self.role}-{self.digest()}.engine"


def onnx_sha256(graph_path: Path) -> str:
    """sha256 over the graph file and every external-data file it references (sorted by name)."""
    h = hashlib.sha256()
    files = [graph_path]
    model = onnx.load(str(graph_path), load_external_data=False)
    locations = set()
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    files += [graph_path.parent / loc for loc in sorted(locations)]
    for path in files:
        h.update(path.name.encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def engine_dir(bundle_dir: str | os.PathLike[str]) -> Path:
    return Path(bundle_dir) / ENGINE_DIR


def encode_header(meta: dict[str, Any]) -> bytes:
    blob = json.dumps(meta, sort_keys=True).encode("utf-8")
    return MAGIC + _FIXED.pack(HEADER_VERSION, len(blob)) + blob


def write_engine(path: Path, meta: dict[str, Any], plan: bytes | memoryview) -> None:
    """Write header + plan to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_header(meta))
            f.write(plan)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Atomic write of a plain file (the timing cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(meta, offset of the plan bytes) of an engine file; EngineError when it is not ours."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + _FIXED.size)
        if len(head) < len(MAGIC) + _FIXED.size or not head.startswith(MAGIC):
            raise EngineError(f"{path}: not a gptedge engine file (no header); delete it and rebuild "
                              "with `gptedge build`")
        version, size = _FIXED.unpack(head[len(MAGIC):])
        if version > HEADER_VERSION:
            raise EngineError(f"{path}: engine header version {version} is newer than this gptedge "
                              f"reads ({HEADER_VERSION}); upgrade gptedge or rebuild the engine")
        blob = f.read(size)
    try:
        meta = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"{path}: corrupt engine header ({exc}); delete it and rebuild") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("key"), dict):
        raise EngineError(f"{path}: engine header has no key; delete it and rebuild")
    return meta, len(MAGIC) + _FIXED.size + size


def read_plan(path: Path) -> tuple[dict[str, Any], bytes]:
    meta, offset = read_header(path)
    with open(path, "rb") as f:
        f.seek(offset)
        return meta, f.read()


def mismatches(key: dict[str, Any], env: Environment, sha: str | None = None) -> list[str]:
    """What differs between an engine's key and this machine (empty list: usable here)."""
    out = []
    if key.get("trt_version") != env.trt_version:
        out.append(f"built with TensorRT {key.get('trt_version')}, this is TensorRT {env.trt_version}")
    if key.get("compute_capability") != env.compute_capability or key.get("gpu_name") != env.gpu_name:
        out.append(f"built for {key.get('gpu_name')} (sm {key.get('compute_capability')}), this GPU is "
                   f"{env.gpu_name} (sm {env.compute_capability})")
    if sha is not None and key.get("onnx_sha256") != sha:
        out.append("built from a different model.onnx / weights (the bundle changed since)")
    return out


def build_command(bundle_dir: str | os.PathLike[str], options: dict[str, Any] | None = None) -> str:
    """The exact ``gptedge build`` command (with the options an older engine was built with)."""
    parts = ["gptedge", "build", str(bundle_dir)]
    for flag in ("target", "max_batch", "max_context", "graph"):
        value = (options or {}).get(flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def find_engine(bundle_dir: str | os.PathLike[str], role: str, env: Environment, sha: str) -> Path:
    """The newest engine for ``role`` usable on ``env`` and built from the graph with ``sha``;
    otherwise EngineError saying why each engine found is unusable and the command that builds one."""
    folder = engine_dir(bundle_dir)
    candidates = sorted(folder.glob(f"{role}-*.engine"), key=lambda p: p.stat().st_mtime, reverse=True)
    reasons, options = [], None
    for path in candidates:
        try:
            meta, _ = read_header(path)
        except EngineError as exc:
            reasons.append(str(exc))
            continue
        problems = mismatches(meta["key"], env, sha)
        if not problems:
            return path
        options = options or meta.get("options")
        reasons.append(f"{path.name}: " + "; ".join(problems))
    command = build_command(bundle_dir, options)
    if not candidates:
        raise EngineError(f"no TensorRT engine for '{role}' in {folder}; build one on this device with: {command}")
    raise EngineError(f"no usable TensorRT engine in {folder} ({' | '.join(reasons)}); rebuild on this "
                      f"device with: {command}")
