"""Backends behind one protocol: onnxruntime (CPU/CUDA) and TensorRT."""
