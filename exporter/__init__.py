"""gptedge.exporter: trained checkpoint (HF, nanoGPT, llama2.c) → ONNX bundle with KV cache.

``ExportConfig``, ``export`` and ``export_loaded`` are resolved on first use, so importing this
package (or its torch-free parts: ``config``, ``preflight``, ``checkpoints.detect``) does not import
torch; ``export`` and ``export_loaded`` live in :mod:`gptedge.exporter.pipeline`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptedge.exporter.config import ExportConfig
    from gptedge.exporter.pipeline import export, export_loaded

__all__ = ["ExportConfig", "export", "export_loaded"]

_HOMES = {"ExportConfig": "gptedge.exporter.config", "export": "gptedge.exporter.pipeline",
          "export_loaded": "gptedge.exporter.pipeline"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
