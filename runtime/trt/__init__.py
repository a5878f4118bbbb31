"""TensorRT support: lint (can TensorRT parse this bundle?), memory plan, optimization profiles,
engine cache, engine build and the backend that runs the engines (``backend.py``). Only
``build.py``, ``backend.py`` and ``cuda_mem.py`` touch ``tensorrt`` / CUDA, and only inside
functions, so everything else here runs (and is tested) on a CPU-only machine.
"""
