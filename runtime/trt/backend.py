# Reviewed against (API review without hardware, 2026-11; TensorRT never ran in our CI):
# - TensorRT Python API 10.x, Runtime/ICudaEngine/IExecutionContext pages and python/src/infer/pyCore.cpp:
#   deserialize_cuda_engine(buffer) -> engine | None; num_io_tensors/get_tensor_name/get_tensor_dtype;
#   create_execution_context(ExecutionContextAllocationStrategy) (10.0+); set_optimization_profile_async(
#   index, stream int) raises RuntimeError on failure; set_input_shape/set_tensor_address(name, int) ->
#   bool; get_tensor_shape; execute_async_v3(stream int) -> bool. Tensors are named once per engine
#   (no per-profile suffixes in the name-based API); each context selects its own profile.
# - samples/python/common_runtime.py (TensorRT 10) and cuda-python (cuda.bindings.runtime, 12.x/13.x):
#   every call returns (cudaError_t, *values); cudaMalloc/cudaMallocHost -> int pointer;
#   cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyKind, stream); cudaMemcpy2DAsync(dst, dpitch, src, spitch,
#   width, height, kind, stream); cudaStream_t converts with int().
"""TensorRT backend: runs an engine built by ``gptedge build`` from the bundle's ``engines/``.

Per backend: one CUDA stream, one execution context per optimization profile (prefill, decode;
see trt/profiles.py), device buffers for the inputs and the logits, pinned host staging. Per
state (one generation): two preallocated KV buffer sets sized for the engine's max context. Step
t reads ``past`` from set ``cur`` and writes ``present`` into set ``1 - cur``; step t+1 swaps, so
the cache never moves and nothing is allocated per step. Per step only the token ids/mask/positions
go up and the last position's logits row comes back. ``tensorrt`` and CUDA are imported inside.

The TensorRT code paths were written against TensorRT's documented 10.x Python API and have not
run on real hardware in our CI (see README 'Jetson / TensorRT').
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptedge.runtime import contract
from gptedge.runtime.bundle import Bundle
from gptedge.runtime.errors import EngineError, GenerationError
from gptedge.runtime.trt import engine_cache as ec
from gptedge.runtime.trt.build import current_environment, import_tensorrt, resolve_graph, trt_logger
from gptedge.runtime.trt.cuda_mem import CUDA_PYTHON_HINT, DeviceBuffer, PinnedArray, Stream
from gptedge.runtime.trt.profiles import profile_for

log = logging.getLogger(__name__)

NOT_INSTALLED = "tensorrt is not installed (on a Jetson it comes with JetPack; see README 'Jetson')"


def unavailable_reason(has_tensorrt: bool, has_cuda_python: bool, bundle: Bundle) -> str | None:
    """Why the backend cannot run ``bundle`` here (None: it can try). Cheap: no import, no hashing."""
    if not has_tensorrt:
        return NOT_INSTALLED
    if not has_cuda_python:
        return f"cuda-python is not installed; {CUDA_PYTHON_HINT}"
    if bundle.manifest.cpu_only:
        return "the bundle is cpu_only (onnxruntime-specific operators); TensorRT cannot run it"
    if not any(ec.engine_dir(bundle.path).glob("*.engine")):
        return f"no TensorRT engine built for this bundle; build one with: {ec.build_command(bundle.path)}"
    return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # parent package missing
        return False


def availability(bundle: Bundle) -> str | None:
    has_cuda = _has_module("cuda.bindings") or _has_module("cuda.cudart")
    return unavailable_reason(_has_module("tensorrt"), has_cuda, bundle)


# TensorRT DataType member name -> numpy dtype. Our own table, not trt.nptype: nptype raises a bare
# TypeError (naming no tensor) for types numpy lacks (BF16, FP8, INT4, FP4), and pre-10 tables lack INT64.
_NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
                 "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}


def numpy_dtype(tensor: str, trt_dtype: Any) -> np.dtype:
    """numpy dtype of an engine I/O tensor of TensorRT type ``trt_dtype`` (a ``trt.DataType`` or its
    member name); EngineError naming the tensor when numpy has no such type."""
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype).split(".")[-1])
    if name not in _NUMPY_DTYPES:
        raise EngineError(f"engine tensor '{tensor}' has TensorRT type {name}, which the backend cannot stage "
                          "through numpy; export the bundle with float32/float16 inputs and outputs")
    return np.dtype(_NUMPY_DTYPES[name])


def kv_step(cur: int, past: int, seq: int, batch: int, kv_heads: int, head_dim: int
            ) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """One step of the ping-pong: (set read as ``past``, set written as ``present``, past shape,
    present shape), shapes ``[B, kv_heads, length, head_dim]``.

    Each tensor is bound PACKED (dense, row-major) at its current shape from the start of its buffer:
    TensorRT takes a base address per I/O tensor and assumes the dense layout of the shape set for it,
    so a ``[B, K, P, D]`` view inside a ``[B, K, max_context, D]`` layout would be read wrongly whenever
    ``B * K > 1``. No strides are needed: present of step t has exactly the shape that past of step
    t+1 is bound with, and it sits in the set step t+1 reads, so the cache is never copied or re-packed.
    Each buffer is sized for ``max_batch * K * max_context * D`` elements, the largest packed present.
    """
    return cur, 1 - cur, (batch, kv_heads, past, head_dim), (batch, kv_heads, past + seq, head_dim)


@dataclass
class TrtState:
    """One generation's KV cache: ``kv[0]``/``kv[1]`` are the two buffer sets (one DeviceBuffer per
    ``past_key_values.*``), ``cur`` the set holding the past, ``length`` the past length in tokens."""

    batch: int
    kv: list[list[DeviceBuffer]]
    cur: int = 0
    length: int = 0
    freed: bool = field(default=False, repr=False)

    def free(self) -> None:
        if not self.freed:
            _free_all(self.kv)
            self.freed = True


def _free_all(kv: list[list[DeviceBuffer]]) -> None:
    for buffers in kv:
        for buffer in buffers:
            buffer.free()  # idempotent


class _Runner:
    """One deserialized engine with its contexts and I/O buffers (all sized once, at load)."""

    def __init__(self, trt: Any, path: Path, meta: dict[str, Any], plan: bytes, bundle: Bundle, stream: Stream):
        arch = bundle.manifest.architecture
        self.trt, self.stream, self.path = trt, stream, path
        self.max_batch, self.max_context = int(meta["max_batch"]), int(meta["max_context"])
        self.role = meta["key"]["role"]
        self.logger = trt_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(f"{path}: TensorRT refused to deserialize this engine (other TensorRT build or "
                              f"GPU?); rebuild with: {ec.build_command(bundle.path, meta.get('options'))}")
        self.past = contract.past_names(arch.num_layers)
        self.present = contract.present_names(arch.num_layers)
        self.dtype = {n: numpy_dtype(n, self.engine.get_tensor_dtype(n))
                      for n in (self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors))}
        self.kv_shape = (arch.num_kv_heads, arch.head_dim)
        self.kv_bytes = (self.max_batch * arch.num_kv_heads * self.max_context * arch.head_dim
                         * self.dtype[self.past[0]].itemsize)
        self.vocab = arch.vocab_size
        self.contexts = [self._context(i) for i in range(self.engine.num_optimization_profiles)]
        cells = self.max_batch * self.max_context
        self.host = {n: PinnedArray((cells,), self.dtype[n]) for n in contract.input_names(0)}
        self.dev = {n: DeviceBuffer(cells * self.dtype[n].itemsize) for n in contract.input_names(0)}
        rows = 1 if self.role == "model_last" else self.max_context
        self.logits_item = self.dtype[contract.LOGITS].itemsize
        self.dev[contract.LOGITS] = DeviceBuffer(self.max_batch * rows * self.vocab * self.logits_item)
        self.host_logits = PinnedArray((self.max_batch, self.vocab), self.dtype[contract.LOGITS])

    def _context(self, profile: int) -> Any:
        strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
        context = (self.engine.create_execution_context(strategy.ON_PROFILE_CHANGE) if strategy is not None
                   else self.engine.create_execution_context())
        try:  # 10.x bindings raise RuntimeError when the profile cannot be set (older ones return False)
            ok = context is not None and context.set_optimization_profile_async(profile, self.stream.ptr)
        except RuntimeError as exc:
            raise EngineError(f"{self.path}: cannot select optimization profile {profile}: {exc}") from exc
        if not ok:
            raise EngineError(f"{self.path}: cannot create an execution context for profile {profile} "
                              "(out of GPU memory?)")
        return context

    def new_state(self, batch: int) -> TrtState:
        if not 1 <= batch <= self.max_batch:
            raise GenerationError(f"batch {batch}: this engine was built for 1..{self.max_batch} rows; "
                                  f"rebuild with --max-batch {batch}")
        state = TrtState(batch, [[DeviceBuffer(self.kv_bytes) for _ in self.past] for _ in range(2)])
        # The protocol has no "free state": release the KV buffers when the state is collected,
        # but not at interpreter exit (CUDA may already be torn down then).
        weakref.finalize(state, _free_all, state.kv).atexit = False  # must not reference state
        return state

    def run(self, state: TrtState, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray,
            all_rows: np.ndarray | None = None) -> None:
        """Enqueue one step on the stream and the logits copy back; the caller synchronizes.
        Copies the last position's row into ``host_logits``, or every row into ``all_rows``."""
        batch, seq = ids.shape
        past = state.length
        if batch != state.batch or mask.shape != (batch, past + seq) or pos.shape != (batch, seq):
            raise GenerationError(f"shapes input_ids {ids.shape}, attention_mask {mask.shape}, position_ids "
                                  f"{pos.shape} do not match a state of {state.batch} rows and {past} past tokens")
        if past + seq > self.max_context:
            raise GenerationError(f"{past + seq} tokens exceed the engine's max context {self.max_context}; "
                                  f"rebuild with a larger --max-context (bundle max {self.max_context})")
        context = self.contexts[min(profile_for(seq), len(self.contexts) - 1)]
        for name, value in ((contract.INPUT_IDS, ids), (contract.ATTENTION_MASK, mask), (contract.POSITION_IDS, pos)):
            staged = self.host[name].array[: value.size]
            staged[:] = value.reshape(-1)  # converts to the engine's integer type (int64 or int32)
            self.stream.h2d(self.dev[name].ptr, self.host[name].ptr, staged.nbytes)
            self._shape(context, name, value.shape)
            self._bind(context, name, self.dev[name].ptr)
        read, write, past_shape, present_shape = kv_step(state.cur, past, seq, batch, *self.kv_shape)
        for name_in, name_out, src, dst in zip(self.past, self.present, state.kv[read], state.kv[write]):
            self._shape(context, name_in, past_shape)
            self._bind(context, name_in, src.ptr)
            self._bind(context, name_out, dst.ptr)
        got = tuple(context.get_tensor_shape(self.present[0]))
        if got != present_shape:  # the ping-pong needs present = concat(past, new) along the length axis
            raise EngineError(f"{self.path}: {self.present[0]} has shape {got}, expected {present_shape}; "
                              "the graph does not follow the gptedge KV contract")
        self._bind(context, contract.LOGITS, self.dev[contract.LOGITS].ptr)
        if not context.execute_async_v3(self.stream.ptr):
            raise EngineError(f"{self.path}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        row = self.vocab * self.logits_item
        rows_out = 1 if self.role == "model_last" else seq
        if all_rows is not None:
            self.stream.d2h(all_rows.ctypes.data, self.dev[contract.LOGITS].ptr, batch * rows_out * row)
        elif rows_out == 1:
            self.stream.d2h(self.host_logits.ptr, self.dev[contract.LOGITS].ptr, batch * row)
        else:  # full-logits engine: only the last position of every row comes back
            self.stream.d2h_rows(self.host_logits.ptr, self.dev[contract.LOGITS].ptr + (seq - 1) * row,
                                 row, seq * row, batch)
        state.cur, state.length = write, past + seq

    def _shape(self, context: Any, name: str, shape: tuple[int, ...]) -> None:
        if not context.set_input_shape(name, tuple(int(d) for d in shape)):
            raise GenerationError(f"{name} shape {tuple(shape)} is outside the engine's profile "
                                  f"(batch <= {self.max_batch}, context <= {self.max_context})")

    def _bind(self, context: Any, name: str, ptr: int) -> None:
        # set_tensor_address returns False (and logs) for a name the engine lacks or a misaligned pointer
        if not context.set_tensor_address(name, ptr):
            raise EngineError(f"{self.path}: TensorRT refused the address of '{name}' (not an I/O tensor of "
                              "this engine?); rebuild the engine from this bundle")

    def close(self) -> None:
        for buffer in [*self.host.values(), *self.dev.values(), self.host_logits]:
            buffer.free()
        self.contexts, self.engine, self.runtime = [], None, None


def _load_runner(trt: Any, bundle: Bundle, role: str, graph_path: Path, stream: Stream) -> _Runner:
    env, _gpu = current_environment(trt)
    path = ec.find_engine(bundle.path, role, env, ec.onnx_sha256(graph_path))
    meta, plan = ec.read_plan(path)
    log.info("tensorrt: %s (TensorRT %s, %s)", path.name, env.trt_version, env.gpu_name)
    return _Runner(trt, path, meta, plan, bundle, stream)


class TrtBackend:
    """The Backend protocol over a TensorRT engine (see the module docstring)."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        self.bundle = bundle
        self.trt = import_tensorrt()
        role, graph_path = resolve_graph(bundle, "auto")
        self.stream = Stream()
        try:
            self.runner = self._first_runner(role, graph_path)
        except BaseException:
            self.stream.destroy()
            raise
        self._full: _Runner | None = self.runner if self.runner.role == "model" else None
        self._lock = threading.Lock()

    def _first_runner(self, role: str, graph_path: Path) -> _Runner:
        try:
            return _load_runner(self.trt, self.bundle, role, graph_path, self.stream)
        except EngineError as first:
            if role == "model":
                raise
            # No usable model_last engine: a full-graph engine also generates (last row copied back).
            try:
                return _load_runner(self.trt, self.bundle, "model", self.bundle.model_path, self.stream)
            except EngineError:
                raise first from None  # the model_last problem is the one to report

    def new_state(self, batch: int) -> TrtState:
        return self.runner.new_state(batch)

    def step(self, state: TrtState, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        """One prefill or decode step; returns the last position's logits ``[B, V]`` float32."""
        with self._lock:  # one stream and shared I/O buffers: steps of several states take turns
            self.runner.run(state, input_ids, attention_mask, position_ids)
            self.stream.synchronize()
            return self.runner.host_logits.array[: state.batch].astype(np.float32)

    def full_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                    position_ids: np.ndarray) -> np.ndarray:
        """Logits ``[B, S, V]`` from an empty cache; needs an engine built with ``--graph model``."""
        with self._lock:
            if self._full is None:
                try:
                    self._full = _load_runner(self.trt, self.bundle, "model", self.bundle.model_path, self.stream)
                except EngineError as exc:
                    raise EngineError(f"scoring needs full logits: {exc} (add --graph model)") from exc
            runner = self._full
            batch, seq = input_ids.shape
            state = runner.new_state(batch)
            out = PinnedArray((batch, seq, runner.vocab), runner.dtype[contract.LOGITS])
            try:
                runner.run(state, input_ids, attention_mask, position_ids, all_rows=out.array)
                self.stream.synchronize()
                return out.array.astype(np.float32)
            finally:
                out.free()
                state.free()

    def close(self) -> None:
        if self._full is not None and self._full is not self.runner:
            self._full.close()
        self.runner.close()
        self.stream.destroy()

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create(bundle: Bundle, threads: int | None = None) -> TrtBackend:
    return TrtBackend(bundle, threads)
