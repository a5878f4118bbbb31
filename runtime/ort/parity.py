"""Parity of ``model_ort.onnx`` with the graph it was rewritten from, checked with onnxruntime
before the variant is written into a bundle (see :mod:`gptedge.runtime.ort.variant`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from gptedge.runtime import contract
from gptedge.runtime.bundle import Architecture

# numpy dtype of each manifest kv_cache_dtype
NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def check_parity(reference: Path, variant: Path, arch: Architecture, kv_dtype: str,
                 prompt: int = 5, decode_steps: int = 2, seed: int = 0) -> dict[str, float]:
    """Largest logit difference between the two graphs over a random prompt and a few decode steps
    (batch 1, fed step by step through each graph's own presents). ``MatMulNBits`` run with float
    compute here (accuracy level 0): at level 4 they quantize their activations per call, and a
    last-bit difference upstream flips roundings (about 1 % of the logits), which would hide the
    rewrite's own error. ``qdq`` says whether the graphs quantize activations regardless."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    steps = [rng.integers(0, arch.vocab_size, (1, prompt))] + \
        [rng.integers(0, arch.vocab_size, (1, 1)) for _ in range(decode_steps)]
    runs, qdq = [], False
    for path in (reference, variant):
        model = onnx.load(str(path), load_external_data=False)
        qdq = qdq or any(node.op_type == "QuantizeLinear" for node in model.graph.node)
        exact = path.with_name(f".parity-{path.name}")  # beside it: the external data path is relative
        onnx.save(_float_compute(model), str(exact))
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            # no pre-packed copies of the weights: a few steps do not need them, the export's peak RSS does
            options.add_session_config_entry("session.disable_prepacking", "1")
            session = ort.InferenceSession(str(exact), options, providers=["CPUExecutionProvider"])
            runs.append(_run_steps(session, steps, arch, NP_DTYPES[kv_dtype]))
            del session
        finally:
            exact.unlink()
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(*runs))
    return {"max_abs_diff": diff, "max_abs_logit": max(float(np.max(np.abs(a))) for a in runs[0]), "qdq": qdq}


def _float_compute(model: onnx.ModelProto) -> onnx.ModelProto:
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 0
    return model


def _run_steps(session, steps: list[np.ndarray], arch: Architecture, dtype) -> list[np.ndarray]:
    """Last-position logits ``[1, V]`` of each step, fed through the graph's own presents."""
    presents = contract.present_names(arch.num_layers)
    past = [np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), dtype)] * len(presents)
    length, logits = 0, []
    for ids in steps:
        total = length + ids.shape[1]
        feeds = {contract.INPUT_IDS: ids.astype(np.int64), contract.ATTENTION_MASK: np.ones((1, total), np.int64),
                 contract.POSITION_IDS: np.arange(length, total, dtype=np.int64)[None],
                 **dict(zip(contract.past_names(arch.num_layers), past))}
        out = session.run([contract.LOGITS, *presents], feeds)
        logits.append(out[0][:, -1].astype(np.float32))
        past, length = out[1:], total
    return logits
