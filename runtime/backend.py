"""Backends behind one protocol: onnxruntime (CPU/CUDA) and TensorRT.

A backend runs the bundle's graph on new tokens and keeps the KV cache in its own memory (an
onnxruntime OrtValue, a CUDA buffer ...) inside an opaque state object, so the generate loop never
moves the cache through numpy. The generate loop knows nothing else about the backend.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Protocol, runtime_checkable

import numpy as np

from gptedge.runtime.bundle import Bundle
from gptedge.runtime.errors import BackendUnavailableError

log = logging.getLogger(__name__)


@runtime_checkable
class Backend(Protocol):
    """One small class per engine (Polygraphy style): build once, run many, close."""

    name: str

    def new_state(self, batch: int) -> Any:
        """An empty KV cache (past length 0) for ``batch`` rows. Each call gets its own state, so
        several threads can generate at once on one backend."""
        ...

    def step(self, state: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        """Run the model on ``input_ids [B, S]`` (int64) with ``attention_mask [B, past + S]`` and
        ``position_ids [B, S]``; append the new keys/values to ``state``; return the last position's
        logits ``[B, vocab]`` as float32 numpy. The array may be a view of the backend's output
        buffer: it is valid until the next ``step`` on the same state (copy it to keep it).

        Array-reuse rule (a performance contract both sides keep): for one-token decode steps the
        generate loop passes the SAME ``input_ids`` and ``position_ids`` objects every step,
        rewritten in place (``attention_mask`` is a new, one column longer view of one buffer). A
        backend may recognise them by identity and keep them bound instead of copying them in
        again (the onnxruntime backend does), but must read their contents every step; a caller
        must never hand a backend a fresh array with the expectation of a rebind being skipped,
        nor mutate an array it passed except to prepare the next step of the same state."""
        ...

    def full_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                    position_ids: np.ndarray) -> np.ndarray:
        """Logits of every position ``[B, S, vocab]`` (float32) from an empty cache (scoring)."""
        ...

    def close(self) -> None:
        ...


# name -> (module, factory function name, availability probe name). Modules are imported lazily
# so that importing the runtime never imports tensorrt or CUDA libraries.
REGISTRY: dict[str, tuple[str, str, str]] = {
    "tensorrt": ("gptedge.runtime.trt.backend", "create", "availability"),
    "ort-cuda": ("gptedge.runtime.ort.backend", "create_cuda", "cuda_availability"),
    "ort-cpu": ("gptedge.runtime.ort.backend", "create_cpu", "cpu_availability"),
}
AUTO_ORDER = ("tensorrt", "ort-cuda", "ort-cpu")


def availability(name: str, bundle: Bundle) -> str | None:
    """None when backend ``name`` can run ``bundle`` here, else the reason and what to install."""
    if name not in REGISTRY:
        return f"unknown backend {name!r}; choose one of {', '.join(['auto', *REGISTRY])}"
    module_name, _factory, probe = REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        return f"backend {name} is not built into this gptedge ({exc})"
    return getattr(module, probe)(bundle)


def create_backend(name: str, bundle: Bundle, threads: int | None = None) -> Backend:
    """Instantiate backend ``name`` (or the best available for ``"auto"``) for ``bundle``."""
    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER:
            reason = availability(candidate, bundle)
            if reason is None:
                log.info("backend auto -> %s", candidate)
                return create_backend(candidate, bundle, threads)
            reasons.append(f"{candidate}: {reason}")
        raise BackendUnavailableError("no backend can run this bundle: " + "; ".join(reasons))
    reason = availability(name, bundle)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} unavailable: {reason}")
    module_name, factory, _probe = REGISTRY[name]
    return getattr(importlib.import_module(module_name), factory)(bundle, threads)
