"""Engine cache keys and headers, optimization profiles, availability messages and the error paths
of the TensorRT backend — everything that runs without TensorRT."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY_LLAMA

from gptedge.runtime import contract
from gptedge.runtime.backend import create_backend
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.cli import main
from gptedge.runtime.errors import BackendUnavailableError, EngineError, InputError
from gptedge.runtime.trt import engine_cache as ec
from gptedge.runtime.trt.backend import NOT_INSTALLED, kv_step, numpy_dtype, unavailable_reason
from gptedge.runtime.trt.profiles import DECODE, PREFILL, engine_profiles, profile_for, profiles_signature

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
ENV = ec.Environment("10.3.0.30", "Orin", "8.7")


def _key(**changes):
    key = ec.EngineKey.create(ENV, "weights=float32;kv=float32", "model_last",
                              profiles_signature(engine_profiles(TINY_LLAMA, 1, 32)), "ab" * 32)
    return dataclasses.replace(key, **changes)


def test_cache_key_is_stable_and_every_component_matters():
    assert _key().digest() == _key().digest()
    assert _key().filename.startswith("model_last-") and _key().filename.endswith(".engine")
    other = {"trt_version": "10.7.0", "gpu_name": "NVIDIA RTX 4090", "compute_capability": "8.9",
             "precision": "weights=float16;kv=float16", "role": "model",
             "profiles": str(profiles_signature(engine_profiles(TINY_LLAMA, 2, 32))), "onnx_sha256": "cd" * 32}
    digests = {_key(**{field: value}).digest() for field, value in other.items()}
    assert len(digests) == len(other) and _key().digest() not in digests


def test_profiles_shapes():
    prefill, decode = engine_profiles(TINY_LLAMA, max_batch=2, max_context=32)
    assert set(prefill.shapes) == set(contract.input_names(TINY_LLAMA.num_layers)) == set(decode.shapes)
    assert prefill.shapes[contract.INPUT_IDS] == ((1, 1), (2, 32), (2, 32))
    assert prefill.shapes[contract.past_name(1, "value")] == ((1, 2, 0, 8), (2, 2, 0, 8), (2, 2, 31, 8))
    assert decode.shapes[contract.INPUT_IDS] == ((1, 1), (2, 1), (2, 1))
    assert decode.shapes[contract.past_name(0, "key")] == ((1, 2, 0, 8), (2, 2, 15, 8), (2, 2, 31, 8))
    assert decode.shapes[contract.ATTENTION_MASK] == ((1, 1), (2, 16), (2, 32))
    assert profile_for(1) == DECODE and profile_for(7) == PREFILL
    assert engine_profiles(TINY_LLAMA, 1, 1)[1].shapes[contract.past_name(0, "key")][2][2] == 0
    with pytest.raises(InputError):
        engine_profiles(TINY_LLAMA, 1, TINY_LLAMA.max_context + 1)


def test_profile_extremes_run_in_onnxruntime(llama_bundle):
    """The shapes each profile allows are shapes the real graph accepts (seq + past <= N)."""
    session = ort.InferenceSession(str(llama_bundle / "model_last.onnx"), providers=["CPUExecutionProvider"])
    n = 16
    for profile in engine_profiles(TINY_LLAMA, 2, n):
        (_, _, (batch, seq_max)) = profile.shapes[contract.INPUT_IDS]
        for seq, past in ((seq_max, 0), (1, n - 1)):
            kv = np.zeros((batch, TINY_LLAMA.num_kv_heads, past, TINY_LLAMA.head_dim), np.float32)
            feeds = {contract.INPUT_IDS: np.zeros((batch, seq), np.int64),
                     contract.ATTENTION_MASK: np.ones((batch, past + seq), np.int64),
                     contract.POSITION_IDS: np.arange(past, past + seq)[None].repeat(batch, 0),
                     **{name: kv for name in contract.past_names(TINY_LLAMA.num_layers)}}
            logits, present = session.run([contract.LOGITS, contract.present_name(0, "key")], feeds)
            assert logits.shape == (batch, 1, TINY_LLAMA.vocab_size)
            assert present.shape[2] == past + seq <= n


def test_header_roundtrip_and_atomic_write(tmp_path):
    path = tmp_path / "engines" / _key().filename
    meta = {"key": dataclasses.asdict(_key()), "options": {"max_context": 32}}
    ec.write_engine(path, meta, b"PLAN" * 100)
    read, plan = ec.read_plan(path)
    assert read == meta and plan == b"PLAN" * 100
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    with pytest.raises(TypeError):
        ec.write_engine(tmp_path / "engines" / "broken.engine", meta, object())  # type: ignore[arg-type]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize(("blob", "match"), [
    (b"\x00" * 64, "not a gptedge engine"),
    (ec.MAGIC[:5], "not a gptedge engine"),
    (ec.MAGIC + (99).to_bytes(4, "little") + (2).to_bytes(4, "little") + b"{}", "newer than this gptedge"),
    (ec.MAGIC + (1).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"{nope", "corrupt"),
    (ec.encode_header({"no": "key"}), "no key")])
def test_bad_headers(tmp_path, blob, match):
    path = tmp_path / "x.engine"
    path.write_bytes(blob)
    with pytest.raises(EngineError, match=match):
        ec.read_header(path)


def test_mismatch_detection():
    key = dataclasses.asdict(_key())
    assert ec.mismatches(key, ENV, "ab" * 32) == []
    newer = ec.mismatches(key, dataclasses.replace(ENV, trt_version="10.7.0"))
    assert newer == ["built with TensorRT 10.3.0.30, this is TensorRT 10.7.0"]
    (gpu,) = ec.mismatches(key, ec.Environment("10.3.0.30", "NVIDIA RTX 4090", "8.9"))
    assert "Orin (sm 8.7)" in gpu and "sm 8.9" in gpu
    assert "different model.onnx" in ec.mismatches(key, ENV, "00" * 32)[0]


@pytest.fixture
def bundle_copy(llama_bundle, tmp_path):
    """A private copy: these tests write into engines/."""
    return shutil.copytree(llama_bundle, tmp_path / "bundle")


def test_find_engine_messages(bundle_copy):
    sha = ec.onnx_sha256(bundle_copy / "model_last.onnx")
    with pytest.raises(EngineError, match=f"build one on this device with: gptedge build {bundle_copy}$"):
        ec.find_engine(bundle_copy, "model_last", ENV, sha)
    stale = dataclasses.replace(_key(), trt_version="10.2.0", onnx_sha256=sha)
    ec.write_engine(ec.engine_dir(bundle_copy) / stale.filename,
                    {"key": dataclasses.asdict(stale), "options": {"max_context": 32, "max_batch": 1}}, b"x")
    with pytest.raises(EngineError) as info:
        ec.find_engine(bundle_copy, "model_last", ENV, sha)
    assert "built with TensorRT 10.2.0, this is TensorRT 10.3.0.30" in str(info.value)
    assert str(info.value).endswith(f"gptedge build {bundle_copy} --max-batch 1 --max-context 32")
    good = dataclasses.replace(_key(), onnx_sha256=sha)
    path = ec.engine_dir(bundle_copy) / good.filename
    ec.write_engine(path, {"key": dataclasses.asdict(good)}, b"y")
    assert ec.find_engine(bundle_copy, "model_last", ENV, sha) == path


def test_onnx_sha_covers_external_weights(bundle_copy):
    before = ec.onnx_sha256(bundle_copy / "model.onnx")
    assert before == ec.onnx_sha256(bundle_copy / "model.onnx")
    data = bytearray((bundle_copy / "model.onnx.data").read_bytes())
    data[100] ^= 1
    (bundle_copy / "model.onnx.data").write_bytes(bytes(data))
    assert ec.onnx_sha256(bundle_copy / "model.onnx") != before


def test_availability_messages(bundle_copy):
    bundle = load_bundle(bundle_copy)
    assert unavailable_reason(False, True, bundle) == NOT_INSTALLED
    assert "JetPack" in NOT_INSTALLED and "README 'Jetson'" in NOT_INSTALLED
    assert "pip install 'cuda-python" in unavailable_reason(True, False, bundle)
    assert unavailable_reason(True, True, bundle).endswith(f"gptedge build {bundle_copy}")
    ec.write_engine(ec.engine_dir(bundle_copy) / _key().filename, {"key": dataclasses.asdict(_key())}, b"z")
    assert unavailable_reason(True, True, bundle) is None


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_without_tensorrt_the_error_says_what_to_install(llama_bundle, capsys):
    from gptedge.runtime.trt.build import build_engine

    with pytest.raises(BackendUnavailableError, match="JetPack"):
        build_engine(llama_bundle)
    with pytest.raises(BackendUnavailableError, match="tensorrt is not installed"):
        create_backend("tensorrt", load_bundle(llama_bundle))
    assert main(["build", str(llama_bundle)]) == BackendUnavailableError.exit_code
    assert "pip install 'tensorrt" in capsys.readouterr().err
    assert not (llama_bundle / "engines").exists()


def test_runtime_import_loads_no_tensorrt_or_cuda():
    code = ("import sys, gptedge.runtime.trt.backend, gptedge.runtime.trt.build, gptedge.runtime.trt.cuda_mem, "
            "gptedge.runtime.cli.build_cmd; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('tensorrt', 'cuda', 'torch')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_engine_dtypes_map_to_numpy_or_fail_with_the_tensor_name():
    assert numpy_dtype("input_ids", "INT64") == np.int64 and numpy_dtype("logits", "HALF") == np.float16
    assert numpy_dtype("present.0.key", "FLOAT") == np.float32 and numpy_dtype("x", "INT32") == np.int32
    with pytest.raises(EngineError, match="'logits' has TensorRT type BF16"):
        numpy_dtype("logits", "BF16")


def test_kv_ping_pong_packed_layout_matches_a_full_pass(llama_bundle):
    """The backend's KV schedule, with numpy arrays standing in for its two device buffer sets: each
    past/present is a packed view from the start of a max-context buffer (as bound in TensorRT), present
    of step t is written into the set step t+1 reads. batch 2 x 2 KV heads: a [B,K,P,D] tensor inside a
    [B,K,Pmax,D] layout would be wrong here, the packed schedule must match an uncached pass exactly."""
    session = ort.InferenceSession(str(llama_bundle / "model_last.onnx"), providers=["CPUExecutionProvider"])
    a, batch, n = TINY_LLAMA, 2, 12
    names, outs = contract.past_names(a.num_layers), contract.present_names(a.num_layers)
    sets = [[np.full(batch * a.num_kv_heads * n * a.head_dim, np.nan, np.float32) for _ in names] for _ in range(2)]
    tokens = np.random.default_rng(1).integers(0, a.vocab_size, size=(batch, n))

    def feeds(ids, past_len, kv):
        seq = ids.shape[1]
        return {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: np.ones((batch, past_len + seq), np.int64),
                contract.POSITION_IDS: np.arange(past_len, past_len + seq)[None].repeat(batch, 0), **kv}

    cur, length = 0, 0
    for seq in (5, 1, 1, 3, 1, 1):
        ids = tokens[:, length:length + seq]
        read, write, past_shape, present_shape = kv_step(cur, length, seq, batch, a.num_kv_heads, a.head_dim)
        size = int(np.prod(past_shape))
        kv = {name: buf[:size].reshape(past_shape) for name, buf in zip(names, sets[read])}
        logits, *presents = session.run([contract.LOGITS, *outs], feeds(ids, length, kv))
        for buf, present in zip(sets[write], presents):
            assert present.shape == present_shape
            buf[:present.size] = present.reshape(-1)  # TensorRT writes the packed output here
        cur, length = write, length + seq
        empty = {name: np.zeros((batch, a.num_kv_heads, 0, a.head_dim), np.float32) for name in names}
        (reference,) = session.run([contract.LOGITS], feeds(tokens[:, :length], 0, empty))
        np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
