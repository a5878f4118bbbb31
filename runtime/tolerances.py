"""Every numeric tolerance the library judges its own results by, in one place.

Each constant bounds one comparison; its docstring says what it bounds and why it has that value.
The tests keep their own tolerances (they check these checks). Numerical guards that only keep a
division away from zero (calibration and SmoothQuant epsilons) are not tolerances and stay with
their arithmetic.
"""

from __future__ import annotations

EXPORT_PARITY_NOISE_RATIO = 4.0
"""Export parity (:mod:`gptedge.exporter.validate`): an output of the exported graph fails when its
max-abs distance to the source model run in float64 exceeds this many times float32 torch's own
distance to it (+ :data:`EXPORT_PARITY_NOISE_FLOOR`). A correct graph only reorders float32
arithmetic, so it stays within a few times float32's own noise on any depth of model; the real
defects of tests/test_parity_criterion.py (a weight off by 0.1 %, swapped RoPE halves, positions
off by one) land far outside it."""

EXPORT_PARITY_NOISE_FLOOR = 1e-5
"""Export parity: absolute allowance added to the ratio above, so that a tiny model on which
float32 torch happens to match float64 exactly (noise 0) does not fail on a last-bit difference."""

ORT_VARIANT_PARITY_LIMITS: dict[str, float] = {"float32": 1e-3, "float16": 3e-2, "qdq": 5e-2}
"""``model_ort.onnx`` against the graph it was rewritten from (:mod:`gptedge.runtime.ort.variant`):
largest last-position logit difference allowed over a short prompt and decode, relative to
max |logit| (at least 1), per kind of graph arithmetic. The fused kernels reorder sums (float32:
last-bit differences), float16 compute carries ~1e-3 relative precision per op, and int8
activations (QDQ) turn the fused kernels' last-bit differences into whole rounding steps."""

QUALITY_BUDGET_PERCENT: dict[str, float] = {"fp16": 0.1, "int8-dynamic": 0.5, "int8": 1.5, "int4": 3.0}
"""Quantization quality gate (:mod:`gptedge.quantize.api`): perplexity increase, in percent, a mode
may cost when the caller gives no ``--max-ppl-increase`` (pruning has no default: its cost depends
on the sparsity asked for). The budgets issue 16 set for a real pretrained model, which each mode's
defaults meet on SmolLM2-135M-Instruct (``SMOLLM2_MEASURED_PCT`` in gptedge.quantize.config, the
README's table): fp16 +0.002 % against 0.1, int8-dynamic +0.46 % against 0.5, static int8 against
1.5, int4 +0.36 % and int4-qdq +0.53 % against 3 (``int4`` covers both formats)."""

GELU_CONSTANT_RTOL = 1e-4
"""Graph fusion (:mod:`gptedge.runtime.ort.fusions`): how close a graph constant must be to
sqrt(2/pi) for the tanh-GELU pattern to be recognised and fused into ``FastGelu``. It accepts the
float32 rounding torch's exporter writes (~3e-8 relative) and decimals written to 4-5 places,
while a different constant (another activation) is not mistaken for it."""
