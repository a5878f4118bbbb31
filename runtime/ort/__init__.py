"""onnxruntime support: the backend that runs a bundle (``backend.py``, session settings in
``session_options.py``) and the build of ``model_ort.onnx``, the graph rewritten for onnxruntime's
fused kernels (``variant.py``, its fusions in ``fusions.py``, its parity check in ``parity.py``).
Nothing is imported here, so ``import gptedge.runtime`` stays light.
"""
