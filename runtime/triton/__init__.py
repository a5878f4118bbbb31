"""Triton Inference Server support: ``gptedge triton`` writes a model repository
(:mod:`~gptedge.runtime.triton.repository`), :mod:`~gptedge.runtime.triton.python_model` is the
python-backend model it installs and :mod:`~gptedge.runtime.triton.step_client` the client loop
for its step models. Nothing here imports ``tritonclient`` until a gRPC client is created."""
