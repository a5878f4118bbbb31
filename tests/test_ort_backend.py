"""OrtBackend on real exported bundles: incremental decode == full logits, per-call state, probes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY_GPT2, TINY_LLAMA

from gptedge.runtime import load
from gptedge.runtime.backend import availability, create_backend
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.errors import BackendUnavailableError
from gptedge.runtime.ort.backend import OrtBackend, cuda_availability
from gptedge.runtime.ort.session_options import physical_cores

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def run_incremental(backend, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Prefill ``prefill`` tokens, then one token per step; returns the logits after each feed."""
    state = backend.new_state(ids.shape[0])
    out = [backend.step(state, ids[:, :prefill], np.ones((1, prefill), np.int64),
                        np.arange(prefill, dtype=np.int64)[None]).copy()]
    for t in range(prefill, ids.shape[1]):
        out.append(backend.step(state, ids[:, t:t + 1], np.ones((1, t + 1), np.int64),
                                np.array([[t]], dtype=np.int64)).copy())
    assert all(isinstance(v, ort.OrtValue) for v in state.past)  # the cache stays in onnxruntime
    return np.stack(out, axis=1)  # B, steps, V


@pytest.mark.parametrize("arch", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama"])
def test_incremental_decode_matches_full_logits(bundle_factory, arch):
    backend = OrtBackend(load_bundle(bundle_factory(arch)), threads=1)
    assert backend.model_path.name == "model_last.onnx"
    ids = np.random.default_rng(0).integers(0, arch.vocab_size, (1, 12), dtype=np.int64)
    full = backend.full_logits(ids, np.ones_like(ids), np.arange(12, dtype=np.int64)[None])
    assert full.shape == (1, 12, arch.vocab_size) and full.dtype == np.float32
    got = run_incremental(backend, ids, prefill=5)
    np.testing.assert_allclose(got[0], full[0, 4:], atol=1e-4)


def test_interleaved_states_are_independent(llama_bundle):
    backend = OrtBackend(load_bundle(llama_bundle), threads=1)
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 96, (1, 6), dtype=np.int64) for _ in range(2))
    alone = [run_incremental(backend, x, prefill=2) for x in (a, b)]
    sa, sb = backend.new_state(1), backend.new_state(1)
    got = {0: [], 1: []}
    for t in range(6):  # prefill one token, then alternate the two states every step
        for key, state, x in ((0, sa, a), (1, sb, b)):
            got[key].append(backend.step(state, x[:, t:t + 1], np.ones((1, t + 1), np.int64),
                                         np.array([[t]], dtype=np.int64)).copy())
    for key in (0, 1):
        np.testing.assert_allclose(np.stack(got[key], 1)[0, 1:], alone[key][0], atol=1e-5)


def test_falls_back_to_model_onnx_without_model_last(gpt2_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(gpt2_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["model_last"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "model_last.onnx").unlink()
    with load(copy, backend="ort-cpu", threads=1) as gen_full, load(gpt2_bundle, backend="ort-cpu") as gen_last:
        assert gen_full.backend.model_path.name == "model.onnx"
        prompt = [3, 14, 15, 92, 6]
        assert gen_full.generate(prompt, max_new_tokens=8).tokens == gen_last.generate(prompt, max_new_tokens=8).tokens


def test_auto_picks_cpu_here_and_cuda_says_what_to_install(gpt2_bundle):
    bundle = load_bundle(gpt2_bundle)
    assert availability("ort-cpu", bundle) is None
    if HAS_CUDA:
        pytest.skip("onnxruntime-gpu is installed here")
    reason = availability("ort-cuda", bundle)
    assert "pip install gptedge[gpu]" in reason and "onnxruntime-gpu" in reason
    with pytest.raises(BackendUnavailableError, match=r"gptedge\[gpu\]"):
        create_backend("ort-cuda", bundle)
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        create_backend("tpu", bundle)
    assert load(gpt2_bundle).backend_name == "ort-cpu"


def test_cpu_only_bundle_refuses_cuda(gpt2_bundle):
    bundle = load_bundle(gpt2_bundle)
    bundle.manifest.precision = {**bundle.manifest.precision, "cpu_only": True}
    assert "CPU-only" in cuda_availability(bundle)


def test_threads_option_and_physical_cores(gpt2_bundle):
    assert physical_cores() >= 1
    backend = OrtBackend(load_bundle(gpt2_bundle), threads=1)
    assert backend.threads == 1 and backend.name == "ort-cpu"
