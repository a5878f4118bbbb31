"""The state a quantization handler works on: the graphs in memory plus manifest fields to update."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from gptedge.quantize.graph_io import ScratchWeights
from gptedge.runtime.bundle import Architecture, Bundle
from gptedge.runtime.errors import InputError


@dataclass
class Job:
    """``graphs``: role (``model``, ``model_last``) -> graph, modified in place by handlers.
    ``calib_ids``: calibration token ids or None; ``eval_ids``: the quality gate's token ids or None
    (mixed precision fits its plan on them). ``record``: facts the handler adds to the
    manifest history entry (block size, calibration method, layers quantized...). Rewritten tensors
    that every graph shares go to :meth:`scratch` (on disk) instead of the protos."""

    bundle: Bundle
    graphs: dict[str, onnx.ModelProto]
    calib_ids: np.ndarray | None = None
    eval_ids: np.ndarray | None = None
    architecture: Architecture | None = None
    precision: dict[str, Any] = field(default_factory=dict)
    io: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    _scratch: ScratchWeights | None = None

    def __post_init__(self) -> None:
        manifest = self.bundle.manifest
        self.architecture = self.architecture or manifest.architecture
        self.precision = self.precision or dict(manifest.precision)
        self.io = self.io or dict(manifest.io)

    def scratch(self) -> ScratchWeights:
        """The on-disk store for tensors a pass rewrites in every graph (made on first use)."""
        if self._scratch is None:
            self._scratch = ScratchWeights()
        return self._scratch

    def close(self) -> None:
        """Remove the scratch store (once the graphs that point into it are written)."""
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None

    def require_calibration(self, what: str) -> np.ndarray:
        if self.calib_ids is None:
            raise InputError(f"{what} needs calibration text: pass --calib FILE (calib_text=...)")
        return self.calib_ids

    def require_source_precision(self, what: str) -> None:
        weights = self.precision.get("weights", "float32")
        if weights != "float32":
            raise InputError(f"{what} needs a float32 bundle, this one is already {weights}; "
                             "quantize the exported (float32) bundle instead")
