"""gptedge.quantize: bundle -> smaller bundle (fp16, int8, int4, pruning), with a quality gate.

``quantize(bundle_dir, config, out_dir, calib_text=..., eval_text=...)`` with one of the configs
below; ``perplexity(bundle_dir, text_path)`` scores any bundle. Imports onnx, onnxruntime and
numpy only (never torch).
"""

from gptedge.quantize.api import quantize
from gptedge.quantize.config import (
           Fp16Config,
           Int4Config,
           Int8Config,
           Int8DynamicConfig,
           MixedConfig,
           PruneConfig,
)
from gptedge.quantize.evaluate import PerplexityResult, perplexity

__all__ = ["Fp16Config", "Int4Config", "Int8Config", "Int8DynamicConfig", "MixedConfig", "PerplexityResult", "PruneConfig",
           "perplexity", "quantize"]
