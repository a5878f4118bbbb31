"""gptedge.runtime: read a bundle and generate text with ONNX Runtime (CPU default) or TensorRT.

Importing this package never imports torch or tensorrt, so apps on a Jetson can embed it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from gptedge.runtime.bundle import Architecture, Bundle, Manifest, load_bundle  # noqa: E402
from gptedge.runtime.errors import (  # noqa: E402
    BackendUnavailableError,
    BundleError,
    GenerationError,
    GptEdgeError,
    InputError,
)
from gptedge.runtime.generate import Generator, load  # noqa: E402
from gptedge.runtime.results import GenerationResult  # noqa: E402
from gptedge.runtime.sampling import SamplingOptions  # noqa: E402

__all__ = [
    "Architecture",
    "BackendUnavailableError",
    "Bundle",
    "BundleError",
    "GenerationError",
    "GenerationResult",
    "Generator",
    "GptEdgeError",
    "InputError",
    "Manifest",
    "SamplingOptions",
    "__version__",
    "load",
    "load_bundle",
]
