"""TensorRT support: lint (can TensorRT parse this bundle?), memory plan, optimization profiles,
engine cache and engine build. Only ``build.py`` and ``cuda_mem.py`` touch ``tensorrt`` / CUDA,
and only inside functions, so everything else here runs (and is tested) on a CPU-only machine.
"""
