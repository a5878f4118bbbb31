"""Give freed heap memory back to the operating system between export stages.

glibc serves the many few-MB arrays of a load or a trace from its heap once its dynamic mmap
threshold has risen past their size, and keeps what they free: the process's RSS then stays near
its highest point, so each later stage (the parity check, the onnxruntime variant's child
interpreter) would stack on top of memory nobody uses. ``malloc_trim(0)`` returns every free
page of every arena. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from functools import cache

log = logging.getLogger(__name__)


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def release_freed_memory() -> None:
    """Collect garbage, then hand the heap's free pages back to the OS (glibc only)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
