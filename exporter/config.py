"""Options of one export, as a frozen dataclass (argparse lives only in the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptedge.runtime.errors import InputError
from gptedge.runtime.tolerances import EXPORT_PARITY_NOISE_FLOOR, EXPORT_PARITY_NOISE_RATIO

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
    - ``parity_noise_ratio``, ``parity_noise_floor``: the parity criterion (the project's export
      tolerances): an output fails when the graph's max-abs distance to the source model run in
      float64 exceeds ``parity_noise_ratio`` x float32 torch's own distance + ``parity_noise_floor``
      (the floor keeps tiny models, where float32 may be exact, from dividing by zero).
    - ``last_logits_variant``: also write ``model_last.onnx`` (LM head on the last position only).
    - ``ort_variant``: also write ``model_ort.onnx``, the onnxruntime-only generation graph with fused
      attention (see :mod:`gptedge.runtime.ort.variant`); skipped where the architecture cannot use it.
    - ``prune_method``: prune the blocks' linear layers before tracing: ``magnitude``, ``2:4``
      (``sparsity`` 0.5) or ``structured`` (removes that fraction of MLP neurons); see
      :mod:`gptedge.exporter.training.prune`. ``finetune_steps`` AdamW steps at peak ``finetune_lr`` on
      ``finetune_text`` (tokenized with the checkpoint's tokenizer) then recover quality with the
      pruning masks held fixed (see :mod:`gptedge.exporter.training.finetune`). ``prune_heads``: with
      ``structured``, also remove this fraction of every layer's attention heads.
    """

    max_context: int | None = None
    opset: int = 18
    tokenizer: Path | None = None
    allow_missing_tokenizer: bool = False
    validate: bool = True
    last_logits_variant: bool = True
    ort_variant: bool = True
    overwrite: bool = False
    parity_noise_ratio: float = EXPORT_PARITY_NOISE_RATIO
    parity_noise_floor: float = EXPORT_PARITY_NOISE_FLOOR
    prune_method: str | None = None
    sparsity: float = 0.5
    finetune_steps: int = 0
    finetune_text: Path | None = None
    finetune_lr: float = 5e-4
    prune_heads: float = 0.0

    def __post_init__(self) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise InputError(f"--opset {self.opset}: must be between {MIN_OPSET} and {MAX_OPSET}")
        if self.max_context is not None and self.max_context < 2:
            raise InputError(f"--max-context {self.max_context}: must be at least 2 tokens")
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", Path(self.tokenizer))
        if self.finetune_text is not None:
            object.__setattr__(self, "finetune_text", Path(self.finetune_text))
        self._check_pruning()

    def _check_pruning(self) -> None:
        methods = ("magnitude", "2:4", "structured")  # gptedge.exporter.training.prune.PRUNE_METHODS
        problems = []
        if self.prune_method is not None and self.prune_method not in methods:
            problems.append(f"--prune {self.prune_method!r}: must be one of {', '.join(methods)}")
        if not 0.0 < self.sparsity < 1.0:
            problems.append(f"--sparsity {self.sparsity}: must be between 0 and 1 (exclusive)")
        elif self.prune_method == "2:4" and self.sparsity != 0.5:
            problems.append(f"--sparsity {self.sparsity}: 2:4 pruning removes exactly half; pass 0.5")
        if not isinstance(self.finetune_steps, int) or self.finetune_steps < 0:
            problems.append(f"--finetune-steps {self.finetune_steps!r}: must be a whole number >= 0")
        elif self.finetune_steps and self.finetune_text is None:
            problems.append("--finetune-steps needs --finetune-text (the text to fine-tune on)")
        if self.prune_method is None and (self.finetune_steps or self.finetune_text is not None):
            problems.append("--finetune-steps/--finetune-text recover from pruning; add --prune METHOD")
        if not 0.0 <= self.prune_heads < 1.0:
            problems.append(f"--prune-heads {self.prune_heads}: must be a fraction in [0, 1)")
        elif self.prune_heads and self.prune_method != "structured":
            problems.append("--prune-heads removes whole attention heads: use it with --prune structured")
        if not self.finetune_lr > 0:
            problems.append(f"--finetune-lr {self.finetune_lr}: must be > 0")
        if problems:
            raise InputError("; ".join(problems))
