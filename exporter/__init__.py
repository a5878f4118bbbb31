"""gptedge.exporter: trained checkpoint (HF, nanoGPT, llama2.c) → ONNX bundle with KV cache."""

from gptedge.exporter.config import ExportConfig
from gptedge.exporter.export import export, export_loaded

__all__ = ["ExportConfig", "export", "export_loaded"]
