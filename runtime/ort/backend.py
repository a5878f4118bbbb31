"""ONNX Runtime backend (CPU, or CUDA with onnxruntime-gpu).

Generation runs ``model_ort.onnx`` when the bundle has it (onnxruntime's fused attention and norm
kernels, see :mod:`gptedge.runtime.ort.variant`) for rows without padding, and ``model_last.onnx``
(LM head on the last position; ``model.onnx`` when absent) otherwise: a left-padded batch, or when
``GPTEDGE_ORT_VARIANT=0``. Both graphs keep the same cache layout, so a state may switch between them.

The KV cache never goes through numpy. On the variant (CPU) past and present are bound to the SAME
preallocated buffers and the attention kernel appends in place; on the portable graph each step
binds the previous step's ``present.*`` OrtValues as ``past_key_values.*`` with IO binding and
lets onnxruntime allocate the new presents on the device. Only the logits come back to numpy.
Scoring (:meth:`OrtBackend.full_logits`) uses ``model.onnx``, loaded on first use.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gptedge.runtime import contract
from gptedge.runtime.bundle import Bundle
from gptedge.runtime.errors import BackendUnavailableError, BundleError, GenerationError
from gptedge.runtime.ort.session_options import physical_cores, session_options

log = logging.getLogger(__name__)

GPU_INSTALL = "pip install gptedge[gpu] (onnxruntime-gpu replaces onnxruntime: uninstall onnxruntime first)"
_KV_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class OrtState:
    """The KV cache of one generation: ``past`` holds one OrtValue per ``past_key_values.*``
    input (on the backend's device), ``bindings`` the IO binding this state reuses every step
    (one per session it ran on)."""

    batch: int
    past: list[Any]
    bindings: dict[int, Any]
    length: int = 0
    # In-place mode (model_ort on the CPU): one [B, kv_heads, capacity, head_dim] numpy buffer per
    # past input that onnxruntime reads AND writes (``past`` wraps them); ``bound`` once the
    # variant's binding points at them.
    buffers: list[np.ndarray] | None = None
    logits: np.ndarray | None = None  # [B, V] view of the [B, 1, V] output buffer of the last-position variant
    bound: bool = False
    # the [B, 1] input_ids / position_ids arrays (and the mask) bound for one-token steps (see _bind_token)
    token_inputs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


class OrtBackend:
    """One onnxruntime session for generation, one (lazy) for scoring; see the module doc."""

    def __init__(self, bundle: Bundle, threads: int | None = None, device: str = "cpu") -> None:
        self.bundle = bundle
        self.device = device
        self.name = "ort-cuda" if device == "cuda" else "ort-cpu"
        self.threads = threads or physical_cores()
        arch = bundle.manifest.architecture
        self.kv_dtype = _KV_DTYPES.get(bundle.manifest.kv_cache_dtype)
        if self.kv_dtype is None:
            raise BundleError(f"{bundle.path}: manifest.precision.kv_cache_dtype="
                              f"{bundle.manifest.kv_cache_dtype!r} is not float32/float16; re-export")
        self.kv_shape = (arch.num_kv_heads, 0, arch.head_dim)
        self.past_names = contract.past_names(arch.num_layers)
        self.present_names = contract.present_names(arch.num_layers)
        last = bundle.file("model_last")
        self.padded_path = last if last is not None and last.is_file() else bundle.model_path
        self.model_path = self._variant_path() or self.padded_path
        self.session = self._open(self.model_path)
        self.last_only = self.model_path != bundle.model_path
        self.has_variant = self.model_path != self.padded_path
        self._padded_session = self.session if not self.has_variant else None
        self.max_context = bundle.manifest.architecture.max_context
        logits_shape = next(o.shape for o in self.session.get_outputs() if o.name == contract.LOGITS)
        self.one_logits_row = len(logits_shape) == 3 and logits_shape[1] == 1
        self._full_session: ort.InferenceSession | None = None
        self._lock = threading.Lock()
        log.info("%s: %s with %d threads (providers %s)", self.name, self.model_path.name, self.threads,
                 self.session.get_providers())

    def _variant_path(self) -> Path | None:
        """``model_ort.onnx`` when present and wanted here (its attention kernel exists on the CPU
        in fp32/fp16 and on CUDA in fp16 only)."""
        path = self.bundle.file(contract.ORT_VARIANT_ROLE)
        if path is None or not path.is_file() or os.environ.get("GPTEDGE_ORT_VARIANT") == "0":
            return None
        if self.device == "cuda" and self.bundle.manifest.kv_cache_dtype != "float16":
            return None
        return path

    def _open(self, path: os.PathLike[str]) -> ort.InferenceSession:
        options = session_options(self.threads)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" \
            else ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"{path}: onnxruntime cannot load the graph ({exc}); re-export the bundle") from exc
        if self.device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            raise BackendUnavailableError(
                "onnxruntime could not start its CUDA provider (CUDA/cuDNN libraries missing or no GPU); "
                "check `nvidia-smi` and the CUDA/cuDNN versions onnxruntime-gpu needs, or use backend ort-cpu")
        _check_io(session, path, self.past_names)
        return session

    # -- the Backend protocol -------------------------------------------------------------------
    def new_state(self, batch: int) -> OrtState:
        """An empty cache (past length 0) for ``batch`` rows, with its own IO binding."""
        shape = [batch, *self.kv_shape]
        past = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0)
                for _ in self.past_names]
        return OrtState(batch=batch, past=past, bindings={})

    def step(self, state: OrtState, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        """Run ``input_ids [B, S]``; the presents replace ``state.past``; returns logits ``[B, V]``."""
        seq = input_ids.shape[1]
        if attention_mask.shape[1] != state.length + seq:
            raise GenerationError(f"attention_mask has {attention_mask.shape[1]} columns; the cache holds "
                                  f"{state.length} tokens and {seq} are new: pass [batch, {state.length + seq}]")
        # count_nonzero: a quarter of the cost of .all() (a ufunc reduction), paid every step
        fits = self.has_variant and np.count_nonzero(attention_mask) == attention_mask.size \
            and self._variant_positions(state, input_ids, position_ids)
        if fits and self.device == "cpu":
            return self._step_in_place(state, input_ids, attention_mask, position_ids)
        padded = self.has_variant and not fits
        if state.buffers is not None:
            self._leave_buffers(state)
        session = self._padded() if padded else self.session
        binding = self._binding(state, session)
        _bind_inputs(binding, input_ids, attention_mask, position_ids)
        for name, value in zip(self.past_names, state.past):
            binding.bind_ortvalue_input(name, value)
        # Outputs are re-bound every step: their shapes grow, so onnxruntime must allocate them.
        binding.clear_binding_outputs()
        binding.bind_output(contract.LOGITS, "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device, 0)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        state.past = [outputs[i + 1] for i in range(len(self.present_names))]
        state.length += seq
        return _last_row(outputs[0].numpy())

    @staticmethod
    def _variant_positions(state: OrtState, input_ids: np.ndarray, position_ids: np.ndarray) -> bool:
        """Whether ``position_ids`` are what the variant derives its lengths from: each row's last
        position is the cache length so far + S - 1. Arrays still bound (see _bind_token) are read
        too: the caller rewrites them in place and may write other positions, which the portable
        graph must then take. One row (the decode hot path) costs an item read, not a reduction."""
        target = state.length + input_ids.shape[1] - 1
        if position_ids.shape[0] == 1:
            return position_ids.item(-1) == target
        return bool((position_ids[:, -1] == target).all())

    def _step_in_place(self, state: OrtState, input_ids: np.ndarray, attention_mask: np.ndarray,
                       position_ids: np.ndarray) -> np.ndarray:
        """A step of the variant with past and present bound to the SAME buffers: its attention
        kernel appends the new keys/values in place (no per-step copy or allocation of the cache)."""
        if state.buffers is None or attention_mask.shape[1] > state.buffers[0].shape[2]:
            self._grow_buffers(state, attention_mask.shape[1])
        binding = self._binding(state, self.session)
        if not state.bound:
            binding.clear_binding_outputs()
            if self.one_logits_row:  # a fixed [B, 1, V] logits buffer: nothing to allocate or wrap per step
                buffer = np.empty((state.batch, 1, self.bundle.manifest.architecture.vocab_size), np.float32)
                binding.bind_ortvalue_output(contract.LOGITS, ort.OrtValue.ortvalue_from_numpy(buffer))
                state.logits = buffer[:, 0, :]
            else:
                binding.bind_output(contract.LOGITS, "cpu")
            for past, present, value in zip(self.past_names, self.present_names, state.past):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            state.bound = True
        if input_ids.shape[1] == 1:
            self._bind_token(state, binding, input_ids, attention_mask, position_ids)
        else:
            _bind_inputs(binding, input_ids, attention_mask, position_ids)
            state.token_inputs = None
        self.session.run_with_iobinding(binding)
        state.length += input_ids.shape[1]
        if state.logits is not None:
            return state.logits  # a view: valid until this state's next step (see Backend.step)
        return _last_row(binding.get_outputs()[0].numpy())

    @staticmethod
    def _bind_token(state: OrtState, binding: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
                    position_ids: np.ndarray) -> None:
        """Bind a decode step's inputs. The generate loop passes the SAME ids and positions arrays
        every step, rewritten in place; bound memory is read at run time, so they are bound once,
        and so is the mask, which the variant does not read (its lengths come from the positions).
        (Right after a step has streamed the weights through the caches every Python/numpy call
        costs ~20 us, a measurable share of a 3.5 ms int4 step.)"""
        if _still_bound(state, input_ids, position_ids):
            return
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        positions = np.ascontiguousarray(position_ids, dtype=np.int64)
        binding.bind_cpu_input(contract.INPUT_IDS, ids)
        binding.bind_cpu_input(contract.POSITION_IDS, positions)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        binding.bind_cpu_input(contract.ATTENTION_MASK, mask)
        # only arrays bound as they are (no converted copy) may be reused by identity; the tuple also
        # keeps the bound memory alive
        state.token_inputs = (input_ids, position_ids, mask) if ids is input_ids and positions is position_ids \
            else None

    def _grow_buffers(self, state: OrtState, needed: int) -> None:
        """(Re)allocate the in-place buffers for at least ``needed`` tokens (doubling, at most
        max_context) and copy the cache so far into them."""
        capacity = min(self.max_context, max(needed, 256, 2 * (state.buffers[0].shape[2] if state.buffers else 0)))
        old = state.buffers or [value.numpy() for value in state.past]
        shape = (state.batch, self.kv_shape[0], capacity, self.kv_shape[2])
        state.buffers = []
        for previous in old:
            buffer = np.zeros(shape, dtype=self.kv_dtype)
            buffer[:, :, :state.length] = previous[:, :, :state.length]
            state.buffers.append(buffer)
        # ortvalue_from_numpy shares the numpy memory: onnxruntime writes straight into the buffers
        state.past = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in state.buffers]
        state.bound = False

    def _leave_buffers(self, state: OrtState) -> None:
        """Back to per-step presents (a padded step on the portable graph): exact-length copies."""
        state.past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(buffer[:, :, :state.length]))
                      for buffer in state.buffers or []]
        state.buffers, state.bound = None, False

    @staticmethod
    def _binding(state: OrtState, session: ort.InferenceSession) -> Any:
        binding = state.bindings.get(id(session))
        if binding is None:
            binding = state.bindings[id(session)] = session.io_binding()
        return binding

    def _padded(self) -> ort.InferenceSession:
        """The portable last-position session, opened the first time a padded batch needs it."""
        with self._lock:
            if self._padded_session is None:
                self._padded_session = self._open(self.padded_path)
            return self._padded_session

    def full_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                    position_ids: np.ndarray) -> np.ndarray:
        """Logits of every position ``[B, S, V]`` (float32) from an empty cache, via ``model.onnx``."""
        with self._lock:
            if self._full_session is None:
                self._full_session = self._open(self.bundle.model_path) if self.last_only else self.session
        empty = np.zeros((input_ids.shape[0], *self.kv_shape), dtype=self.kv_dtype)
        feeds = {contract.INPUT_IDS: input_ids, contract.ATTENTION_MASK: attention_mask,
                 contract.POSITION_IDS: position_ids, **{name: empty for name in self.past_names}}
        (logits,) = self._full_session.run([contract.LOGITS], feeds)
        return logits.astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
        self._padded_session = self._full_session = None

    def __enter__(self) -> OrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _still_bound(state: OrtState, input_ids: np.ndarray, position_ids: np.ndarray) -> bool:
    """Whether these very arrays are the ones bound for one-token steps (see _bind_token)."""
    bound = state.token_inputs
    return bound is not None and bound[0] is input_ids and bound[1] is position_ids


def _bind_inputs(binding: Any, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> None:
    # bind_cpu_input uses the numpy memory as is (no copy), so it must be contiguous int64.
    binding.bind_cpu_input(contract.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
    binding.bind_cpu_input(contract.ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
    binding.bind_cpu_input(contract.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))


def _last_row(logits: np.ndarray) -> np.ndarray:
    """[B, S, V] -> the last position [B, V] as float32."""
    return logits[:, -1, :].astype(np.float32, copy=False)


def _check_io(session: ort.InferenceSession, path: os.PathLike[str], past_names: list[str]) -> None:
    names = {i.name for i in session.get_inputs()}
    wanted = {contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS, *past_names}
    if names != wanted:
        missing, extra = sorted(wanted - names), sorted(names - wanted)
        raise BundleError(f"{path}: graph inputs do not follow the gptedge contract (missing {missing[:4]}, "
                          f"unexpected {extra[:4]}); re-export the bundle")


def cpu_availability(bundle: Bundle) -> str | None:
    """The CPU provider is in every onnxruntime build."""
    if "CPUExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CPUExecutionProvider; pip install onnxruntime"
    return None


def cuda_availability(bundle: Bundle) -> str | None:
    """None when onnxruntime-gpu and a CUDA GPU are present and the bundle may run on a GPU."""
    if bundle.manifest.cpu_only:
        return ("the bundle is CPU-only (manifest.precision.cpu_only, e.g. int8 dynamic quantization); "
                "use backend ort-cpu or quantize for the GPU")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                f"{', '.join(ort.get_available_providers())}); {GPU_INSTALL}")
    count, why = cuda_device_count()
    if count == 0:
        return f"no CUDA GPU found ({why}); check the NVIDIA driver with `nvidia-smi`"
    return None


def cuda_device_count() -> tuple[int, str]:
    """Number of CUDA devices via the driver library (no torch needed), and why it is 0."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0, "the CUDA driver library libcuda is not installed"
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0:
        return 0, "cuInit failed: the driver found no usable GPU"
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0, "cuDeviceGetCount failed"
    return count.value, "the driver reports 0 devices" if count.value == 0 else ""


def create_cpu(bundle: Bundle, threads: int | None = None) -> OrtBackend:
    return OrtBackend(bundle, threads, device="cpu")


def create_cuda(bundle: Bundle, threads: int | None = None) -> OrtBackend:
    return OrtBackend(bundle, threads, device="cuda")
