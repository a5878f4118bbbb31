"""TensorRT and CUDA on a real GPU: skipped (with the reason) where tensorrt, cuda-python or a GPU
is missing — which is everywhere in our CI. Run on a Jetson / GPU box: pytest -m gpu tests/test_trt_gpu.py"""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
from conftest import TINY_LLAMA

from gptedge.runtime.ort.backend import cuda_device_count

pytestmark = pytest.mark.gpu


def _has(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


GPUS, WHY_NO_GPU = cuda_device_count()
NEED_CUDA = pytest.mark.skipif(not (_has("cuda.bindings") or _has("cuda.cudart")) or GPUS == 0,
                               reason="needs cuda-python and a CUDA GPU: "
                                      + (WHY_NO_GPU or "cuda-python is not installed"))
NEED_TRT = pytest.mark.skipif(not _has("tensorrt") or GPUS == 0,
                              reason="needs tensorrt and a CUDA GPU: "
                                     + ("tensorrt is not installed" if not _has("tensorrt") else WHY_NO_GPU))


@NEED_CUDA
def test_cuda_helpers_roundtrip():
    from gptedge.runtime.trt.cuda_mem import DeviceBuffer, PinnedArray, Stream, gpu_info

    info = gpu_info()
    assert info.total_bytes > 0 and "." in info.compute_capability
    stream = Stream()
    host = PinnedArray((3, 5), np.float32)
    host.array[:] = np.arange(15, dtype=np.float32).reshape(3, 5)
    device = DeviceBuffer(host.array.nbytes)
    back = PinnedArray((3, 2), np.float32)
    try:
        stream.h2d(device.ptr, host.ptr, host.array.nbytes)
        # the last two columns of every row, as the backend copies the last logits row of each batch row
        stream.d2h_rows(back.ptr, device.ptr + 3 * 4, 2 * 4, 5 * 4, 3)
        stream.synchronize()
        np.testing.assert_array_equal(back.array, host.array[:, 3:])
    finally:
        for b in (host, back, device):
            b.free()
        stream.destroy()


@NEED_TRT
def test_engine_generates_like_onnxruntime(llama_bundle, tmp_path):
    from gptedge.runtime.backend import create_backend
    from gptedge.runtime.bundle import load_bundle
    from gptedge.runtime.trt.build import BuildConfig, build_engine

    folder = shutil.copytree(llama_bundle, tmp_path / "b")
    result = build_engine(folder, BuildConfig(max_batch=2, max_context=TINY_LLAMA.max_context))
    assert result.path.is_file() and not result.reused
    assert build_engine(folder, BuildConfig(max_batch=2, max_context=TINY_LLAMA.max_context)).reused
    bundle = load_bundle(folder)
    trt_backend, ort_backend = create_backend("tensorrt", bundle), create_backend("ort-cpu", bundle)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY_LLAMA.vocab_size, size=(2, 7))
    states = [b.new_state(2) for b in (trt_backend, ort_backend)]
    tokens = {0: [], 1: []}
    step_ids, length = ids, 0
    for _ in range(12):
        seq = step_ids.shape[1]
        mask = np.ones((2, length + seq), np.int64)
        pos = np.arange(length, length + seq)[None].repeat(2, 0)
        outs = [b.step(s, step_ids, mask, pos) for b, s in zip((trt_backend, ort_backend), states)]
        # fp32 graph, but TensorRT may use TF32 matmuls: compare at fp16-like tolerance
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-2, atol=1e-2)
        for i, logits in enumerate(outs):
            tokens[i].append(logits.argmax(-1))
        length += seq
        step_ids = outs[1].argmax(-1)[:, None]  # both follow the reference tokens
    assert np.array_equal(np.stack(tokens[0]), np.stack(tokens[1]))
    trt_backend.close()
    ort_backend.close()


@NEED_TRT
def test_example_05_jetson(llama_bundle, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    folder = shutil.copytree(llama_bundle, tmp_path / "b")
    script = Path(__file__).resolve().parents[1] / "examples" / "05_jetson.py"
    out = subprocess.run([sys.executable, str(script), str(folder), "--prompt-ids", "1,2,3", "--max-new-tokens", "5"],
                         check=True, capture_output=True, text=True).stdout
    assert "built in" in out and "decode_tokens_per_s" in out
