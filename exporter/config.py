"""Options of one export, as a frozen dataclass (argparse lives only in the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptedge.runtime.errors import InputError

MIN_OPSET, MAX_OPSET = 18, 20


@dataclass(frozen=True)
class ExportConfig:
    """How to export a checkpoint.

    - ``max_context``: tokens (prompt + generated) the bundle supports; default: the checkpoint's own.
    - ``opset``: ONNX opset, 18..20 (18 is the lowest torch's exporter writes, 20 the highest
      TensorRT 10.3 parses).
    - ``tokenizer``: a tokenizer file/folder overriding the one found next to the checkpoint.
    - ``allow_missing_tokenizer``: export a bundle that generates from token ids only.
    - ``validate``: run the parity check against the source model after exporting.
    - ``last_logits_variant``: also write ``model_last.onnx`` (LM head on the last position only).
    """

    max_context: int | None = None
    opset: int = 18
    tokenizer: Path | None = None
    allow_missing_tokenizer: bool = False
    validate: bool = True
    last_logits_variant: bool = True
    overwrite: bool = False
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise InputError(f"--opset {self.opset}: must be between {MIN_OPSET} and {MAX_OPSET}")
        if self.max_context is not None and self.max_context < 2:
            raise InputError(f"--max-context {self.max_context}: must be at least 2 tokens")
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", Path(self.tokenizer))
