"""Device and pinned host buffers and one CUDA stream, through cuda-python (``cuda.bindings``).

cuda-python is imported lazily, inside :func:`cudart`, so this module imports on any machine. Every
CUDA call returns ``(err, *values)``; :func:`check` turns a non-success into EngineError naming the
call. ``cuda.bindings.runtime`` is the module path since cuda-python 12.6; older releases exposed
``cuda.cudart`` — both work.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from gptedge.runtime.errors import BackendUnavailableError, EngineError

CUDA_PYTHON_HINT = ("install cuda-python matching the CUDA of this machine, e.g. on JetPack 6.1/6.2 "
                    "(CUDA 12.6): pip install 'cuda-python>=12.6,<12.7'; see README 'Jetson / TensorRT'")


def cudart() -> Any:
    """The cuda-python runtime module, or BackendUnavailableError with the install hint."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime  # cuda-python < 12.6
        return runtime
    except ImportError as exc:
        raise BackendUnavailableError(f"cuda-python is not installed ({exc}); {CUDA_PYTHON_HINT}") from exc


def check(result: Any, what: str) -> Any:
    """Unwrap ``(err, *values)``; raise EngineError naming ``what`` when err is not cudaSuccess."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _e, name = rt.cudaGetErrorName(err)
        raise EngineError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class GpuInfo:
    """The current CUDA device: name, compute capability ("8.7"), memory in bytes, integrated
    (a Jetson's GPU shares system RAM)."""

    name: str
    compute_capability: str
    total_bytes: int
    free_bytes: int
    integrated: bool


def gpu_info() -> GpuInfo:
    rt = cudart()
    device = check(rt.cudaGetDevice(), "cudaGetDevice")
    prop = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    free, total = check(rt.cudaMemGetInfo(), "cudaMemGetInfo")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(name.rstrip("\0").strip(), f"{prop.major}.{prop.minor}", int(total), int(free),
                   bool(prop.integrated))


class DeviceBuffer:
    """``nbytes`` of device memory at ``ptr`` (int), freed by :meth:`free` (idempotent)."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)  # a zero-size cudaMalloc returns a null pointer
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class PinnedArray:
    """A page-locked host array (fast async copies): ``array`` is a numpy view of it."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type):
        self.dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * self.dtype.itemsize, 1)
        self.ptr = int(check(cudart().cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))
        raw = (ctypes.c_byte * nbytes).from_address(self.ptr)
        # numpy's stubs leave out ctypes arrays, which numpy reads through the buffer protocol
        self.array = np.frombuffer(raw, dtype=self.dtype, count=int(np.prod(shape))).reshape(shape)  # type: ignore[call-overload]

    def free(self) -> None:
        if self.ptr:
            self.array = None
            check(cudart().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class Stream:
    """One CUDA stream; all copies and ``execute_async_v3`` calls of a backend go on it."""

    def __init__(self) -> None:
        self.handle = check(cudart().cudaStreamCreate(), "cudaStreamCreate")

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def h2d(self, dst: int, src: int, nbytes: int) -> None:
        rt = cudart()
        check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle),
              "cudaMemcpyAsync(host->device)")

    def d2h(self, dst: int, src: int, nbytes: int) -> None:
        rt = cudart()
        check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle),
              "cudaMemcpyAsync(device->host)")

    def d2h_rows(self, dst: int, src: int, row_bytes: int, src_pitch: int, rows: int) -> None:
        """Copy ``rows`` rows of ``row_bytes`` each, ``src_pitch`` apart on the device, to packed host
        memory (the last position's logits of every batch row in one call)."""
        rt = cudart()
        check(rt.cudaMemcpy2DAsync(dst, row_bytes, src, src_pitch, row_bytes, rows,
                                   rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle),
              "cudaMemcpy2DAsync(device->host)")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None
