"""Hostile inputs through the Python API: fuzzed llama2.c / tokenizer.bin / meta.pkl parsers,
external-data paths that leave the bundle, and non-finite logits.

The CLI side (exit codes, one-line messages, no debris) is in test_hostile_cli.py.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TINY_GPT2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptedge.exporter import ExportConfig
from gptedge.exporter.checkpoints.detect import detect_format
from gptedge.exporter.checkpoints.llama2c import MAGIC, load_llama2c
from gptedge.exporter.checkpoints.tokenizers import char_tokenizer_from_meta, llama2c_tokenizer
from gptedge.runtime import load
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.errors import BundleError, GenerationError, GptEdgeError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_SCRATCH = Path(tempfile.mkdtemp(prefix="gptedge-fuzz-"))


def _file(name: str, data: bytes) -> Path:
    path = _SCRATCH / name
    path.write_bytes(data)
    return path


def _only_gptedge_errors(fn, *args) -> None:
    """Run ``fn``: success or a GptEdgeError; anything else (MemoryError included) fails the test."""
    try:
        fn(*args)
    except GptEdgeError:
        pass


# -- fuzzing the binary parsers ----------------------------------------------------------------
NO_TOKENIZER = ExportConfig(allow_missing_tokenizer=True)
HEADER_INT = st.one_of(st.integers(-3, 70), st.sampled_from([2**31 - 1, -(2**31), 2**30, 2**16 + 1]))


@FUZZ
@given(st.binary(max_size=600))
def test_llama2c_bin_arbitrary_bytes(data):
    _only_gptedge_errors(load_llama2c, _file("model.bin", data), NO_TOKENIZER)


@FUZZ
@given(st.lists(HEADER_INT, min_size=7, max_size=7), st.booleans(), st.integers(0, 3000),
       st.sampled_from([0, 4, -4]))
def test_llama2c_plausible_headers_with_any_size(params, v1, floats, slack):
    """Headers near real ones (small, zero, negative or huge fields) with a body of any length,
    sometimes exactly the length the header asks for: never a crash or a huge allocation."""
    if v1:
        head = struct.pack("<Ii7iB", MAGIC, 1, *params, 1).ljust(256, b"\0")
    else:
        head = struct.pack("<7i", *params)
    body = np.arange(floats, dtype="<f4").tobytes()
    data = head + body + b"\0" * max(slack, 0)
    _only_gptedge_errors(load_llama2c, _file("model.bin", data[: len(data) + min(slack, 0)]), NO_TOKENIZER)


@FUZZ
@given(st.binary(max_size=400))
def test_tokenizer_bin_arbitrary_bytes(data):
    _only_gptedge_errors(llama2c_tokenizer, _file("tokenizer.bin", data))


@FUZZ
@given(st.lists(st.tuples(st.floats(width=32), st.integers(-5, 40), st.binary(max_size=12)), max_size=8),
       st.integers(-2, 64))
def test_tokenizer_bin_records_with_lying_lengths(records, max_len):
    data = struct.pack("<i", max_len) + b"".join(
        struct.pack("<fi", score, length) + raw for score, length, raw in records)
    _only_gptedge_errors(llama2c_tokenizer, _file("tokenizer.bin", data))


@FUZZ
@given(st.binary(max_size=300))
def test_meta_pkl_arbitrary_bytes(data):
    _only_gptedge_errors(char_tokenizer_from_meta, _file("meta.pkl", data))


@FUZZ
@given(st.binary(max_size=64), st.sampled_from(["x.pt", "x.bin", "x.pth", "x.dat"]))
def test_detect_format_arbitrary_bytes(data, name):
    _only_gptedge_errors(detect_format, _file(name, data))


def test_pickle_size_field_is_not_trusted():
    """BINBYTES8 claiming 2**62 bytes: refused without allocating them."""
    payload = b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc."
    with pytest.raises(GptEdgeError, match="meta.pkl"):
        char_tokenizer_from_meta(_file("meta.pkl", payload))


# -- external data must stay inside the bundle -------------------------------------------------
def _with_location(bundle: Path, dest: Path, location: str) -> Path:
    shutil.copytree(bundle, dest)
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, str(dest / "model.onnx"))
    return dest


@pytest.mark.parametrize("location", ["../secret", "/etc/hostname", "sub/../../secret", "C:\\secret"])
def test_external_data_outside_the_bundle_is_refused_before_any_runtime(gpt2_bundle, tmp_path, location):
    (tmp_path / "secret").write_bytes(b"\0" * (1 << 20))
    bundle = _with_location(gpt2_bundle, tmp_path / "b", location)
    with pytest.raises(BundleError, match="escapes the bundle folder") as info:
        load_bundle(bundle)  # reads manifest and graph protos only: onnxruntime never sees the file
    assert "model.onnx" in str(info.value)


def test_external_data_symlink_out_of_the_bundle_is_refused(gpt2_bundle, tmp_path):
    (tmp_path / "secret").write_bytes((gpt2_bundle / "model.onnx.data").read_bytes())
    bundle = _with_location(gpt2_bundle, tmp_path / "b", "alias.data")
    (bundle / "alias.data").symlink_to(tmp_path / "secret")
    with pytest.raises(BundleError, match="link that leads outside"):
        load(bundle)


def test_external_data_in_a_constant_node_is_checked(tmp_path):
    """Tensors in node attributes (Constant, subgraphs) can point at files too."""
    from gptedge.runtime.onnx_io import check_external_data

    value = onnx.helper.make_tensor("c", onnx.TensorProto.FLOAT, [4], np.zeros(4, np.float32).tobytes(), raw=True)
    onnx.external_data_helper.set_external_data(value, "../../etc/passwd", 0, 16)
    value.ClearField("raw_data")
    value.data_location = onnx.TensorProto.EXTERNAL
    node = onnx.helper.make_node("Constant", [], ["y"], value=value)
    out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], [out])), str(tmp_path / "m.onnx"))
    with pytest.raises(BundleError, match="escapes"):
        check_external_data(tmp_path / "m.onnx")


def test_quantize_refuses_an_escaping_bundle_before_reading_weights(gpt2_bundle, tmp_path):
    from gptedge.quantize import Fp16Config, quantize

    bundle = _with_location(gpt2_bundle, tmp_path / "b", "../secret")
    with pytest.raises(BundleError, match="escapes"):
        quantize(bundle, Fp16Config(), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# -- non-finite logits -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_bundle(bundle_factory, tmp_path_factory) -> Path:
    """TINY_GPT2 whose weights file holds NaN and inf (as an FP16 overflow or a bad copy would)."""
    dest = tmp_path_factory.mktemp("nan") / "b"
    shutil.copytree(bundle_factory(TINY_GPT2), dest)
    data = np.fromfile(dest / "model.onnx.data", dtype="<f4")
    data[::7] = np.inf
    data[3::11] = np.nan
    data.tofile(dest / "model.onnx.data")
    return dest


def test_non_finite_logits_stop_generation_with_the_likely_cause(nan_bundle):
    generator = load(nan_bundle)
    with pytest.raises(GenerationError, match="non-finite logits.*FP16 overflow.*corrupt weights"):
        generator.generate([1, 2, 3], max_new_tokens=4)
    with pytest.raises(GenerationError, match="non-finite"):
        generator.generate([[1, 2], [3, 4, 5]], max_new_tokens=4, temperature=0.8, top_p=0.9, seed=0)
    with pytest.raises(GenerationError, match="non-finite"):
        list(generator.stream([1, 2, 3], max_new_tokens=4))
    with pytest.raises(GenerationError, match="non-finite"):
        generator.score([1, 2, 3])
