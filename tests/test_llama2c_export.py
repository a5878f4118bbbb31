"""llama2.c .bin -> bundle: legacy and version-1 files written byte by byte, logits against a numpy
port of run.c, header validation, and tokenizer.bin conversion."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from reference_impls import Llama2cReference

from gptedge.exporter import ExportConfig, export
from gptedge.exporter.checkpoints.llama2c import load_llama2c
from gptedge.exporter.checkpoints.tokenizers import read_llama2c_tokenizer
from gptedge.runtime import contract
from gptedge.runtime.errors import InputError, UnsupportedModelError

PIECES = ["<unk>", "\n<s>\n", "\n</s>\n", *[f"<0x{b:02X}>" for b in range(256)],
          " ", "e", "t", " t", "he", " the", " café", "▁x", "lo"]


def random_weights(dim=32, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=300, shared=True, seed=0):
    """llama2.c-named float32 tensors (run.c's shapes)."""
    rng = np.random.default_rng(seed)
    kv_dim = dim // n_heads * n_kv_heads

    def rand(*shape, scale=0.15):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    w = {"token_embedding": rand(vocab, dim, scale=0.5), "rms_att": 1 + rand(n_layers, dim),
         "wq": rand(n_layers, dim, dim), "wk": rand(n_layers, kv_dim, dim), "wv": rand(n_layers, kv_dim, dim),
         "wo": rand(n_layers, dim, dim), "rms_ffn": 1 + rand(n_layers, dim), "w1": rand(n_layers, hidden, dim),
         "w2": rand(n_layers, dim, hidden), "w3": rand(n_layers, hidden, dim), "rms_final": 1 + rand(dim)}
    if not shared:
        w["wcls"] = rand(vocab, dim, scale=0.5)
    return w


def header_params(w, n_heads, n_kv_heads, seq_len):
    n_layers, hidden, dim = w["w1"].shape
    return dim, hidden, n_layers, n_heads, n_kv_heads, w["token_embedding"].shape[0], seq_len


def write_legacy(path: Path, w, n_heads=4, n_kv_heads=2, seq_len=32):
    """export.py legacy_export: 7 int32 (negative vocab = unshared), run.c's order, freq_cis, wcls."""
    dim, hidden, n_layers, _, _, vocab, _ = params = header_params(w, n_heads, n_kv_heads, seq_len)
    shared = "wcls" not in w
    head = dim // n_heads
    freqs = 1.0 / (10000.0 ** (np.arange(0, head, 2)[: head // 2] / head))
    angles = np.outer(np.arange(seq_len), freqs)
    with open(path, "wb") as f:
        f.write(struct.pack("iiiiiii", *params[:5], vocab if shared else -vocab, seq_len))
        for name in ("token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final"):
            f.write(w[name].astype("<f4").tobytes())
        f.write(np.cos(angles).astype("<f4").tobytes())
        f.write(np.sin(angles).astype("<f4").tobytes())
        if not shared:
            f.write(w["wcls"].astype("<f4").tobytes())
    return path


def write_v1(path: Path, w, n_heads=4, n_kv_heads=2, seq_len=32):
    """export.py version1_export: magic, version, 7 int32, uint8 shared flag, pad to 256, norms first."""
    params = header_params(w, n_heads, n_kv_heads, seq_len)
    with open(path, "wb") as f:
        f.write(struct.pack("I", 0x616B3432) + struct.pack("i", 1) + struct.pack("iiiiiii", *params))
        f.write(struct.pack("B", int("wcls" not in w)))
        f.write(b"\0" * (256 - f.tell()))
        names = ["rms_att", "rms_ffn", "rms_final", "token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
        for name in names + (["wcls"] if "wcls" in w else []):
            f.write(w[name].astype("<f4").tobytes())
    return path


def write_tokenizer_bin(path: Path, pieces=PIECES, seed=0):
    scores = np.random.default_rng(seed).standard_normal(len(pieces)).astype(np.float32)
    encoded = [p.encode("utf-8") for p in pieces]
    with open(path, "wb") as f:
        f.write(struct.pack("i", max(len(b) for b in encoded)))
        for score, raw in zip(scores, encoded):
            f.write(struct.pack("fi", score, len(raw)) + raw)
    return scores


# Exported to ONNX (tracing is the slow part); the other two layout/classifier combinations are
# checked through the torch decoder in test_other_layouts_match_run_c_port.
CASES = {  # name -> (writer, n_heads, n_kv_heads, shared)
    "legacy-unshared-mha": (write_legacy, 2, 2, False),
    "v1-shared-gqa": (write_v1, 4, 1, True),
}


@pytest.fixture(scope="session")
def llama2c_bundles(tmp_path_factory):
    out = {}
    for seed, (name, (writer, n_heads, n_kv_heads, shared)) in enumerate(CASES.items()):
        folder = tmp_path_factory.mktemp(name)
        w = random_weights(n_heads=n_heads, n_kv_heads=n_kv_heads, shared=shared, seed=seed)
        path = writer(folder / "model.bin", w, n_heads, n_kv_heads)
        write_tokenizer_bin(folder / "tokenizer.bin")
        # the second graph is the same decoder; one case is enough to cover it
        config = ExportConfig(last_logits_variant=seed == 0)
        out[name] = (w, export(path, config, folder / "bundle"))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bundle_matches_run_c_port(llama2c_bundles, name):
    _, n_heads, n_kv_heads, shared = CASES[name]
    w, bundle = llama2c_bundles[name]
    arch = bundle.manifest.architecture
    assert (arch.num_heads, arch.num_kv_heads, arch.tie_word_embeddings) == (n_heads, n_kv_heads, shared)
    assert (arch.norm, arch.norm_eps, arch.position, arch.rope_theta, arch.activation) == (
        "rmsnorm", 1e-5, "rope", 10000.0, "swiglu")
    assert (arch.max_context, arch.intermediate_size, arch.vocab_size) == (32, 64, 300)
    onnx.checker.check_model(str(bundle.path / "model.onnx"))
    assert bundle.manifest.parity["passed"] and bundle.manifest.parity["max_abs"] <= 1e-4
    tokens = [1, 270, 3, 299, 42, 7, 150, 264, 2, 9, 100, 33, 5, 261]
    want = Llama2cReference(w, n_heads, n_kv_heads, seq_len=32).logits(tokens)
    ids = np.array([tokens], dtype=np.int64)
    session = ort.InferenceSession(str(bundle.path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(len(tokens))[None]}
    feeds.update({n: np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), np.float32)
                  for n in contract.past_names(arch.num_layers)})
    got = session.run(["logits"], feeds)[0][0]
    assert got.shape == want.shape == (len(tokens), 300)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(want).max() > 0.5
    assert bundle.manifest.source["version"] == (1 if name.startswith("v1") else 0)


def decoder_logits(arch, state, tokens):
    """Logits [T, V] of the torch decoder holding ``state`` for one prompt."""
    import torch

    from gptedge.exporter.pipeline import build_decoder

    decoder = build_decoder(arch, state, "test")
    ids = torch.tensor([tokens])
    past = [(torch.zeros(1, arch.num_kv_heads, 0, arch.head_dim),) * 2 for _ in range(arch.num_layers)]
    with torch.no_grad():
        logits, _ = decoder(ids, torch.ones_like(ids), torch.arange(len(tokens))[None], past)
    return logits[0].numpy()


@pytest.mark.parametrize("writer, shared", [(write_legacy, True), (write_v1, False)], ids=["legacy-shared", "v1-unshared"])
def test_other_layouts_match_run_c_port(tmp_path, writer, shared):
    w = random_weights(n_heads=4, n_kv_heads=2, shared=shared, seed=7)
    path = writer(tmp_path / "model.bin", w, 4, 2)
    loaded = load_llama2c(path, ExportConfig(allow_missing_tokenizer=True))
    assert loaded.arch.tie_word_embeddings == shared and ("lm_head.weight" in loaded.state_dict) != shared
    tokens = [1, 270, 3, 299, 42, 7, 150, 264]
    want = Llama2cReference(w, 4, 2, seq_len=32).logits(tokens)
    assert np.abs(decoder_logits(loaded.arch, loaded.state_dict, tokens) - want).max() <= 1e-4


def test_rope_permutation_is_needed(llama2c_bundles):
    """Without the q/k row permutation the half-split decoder would not match run.c."""
    import torch

    from gptedge.runtime.bundle import load_bundle

    w, bundle = llama2c_bundles["v1-shared-gqa"]
    arch = load_bundle(bundle.path).manifest.architecture
    state = {"embed.weight": torch.from_numpy(w["token_embedding"]), "norm.weight": torch.from_numpy(w["rms_final"])}
    for i in range(arch.num_layers):
        state.update({f"layers.{i}.attn_norm.weight": torch.from_numpy(w["rms_att"][i]),
                      f"layers.{i}.attn.qkv.weight": torch.from_numpy(np.concatenate([w["wq"][i], w["wk"][i], w["wv"][i]])),
                      f"layers.{i}.attn.out.weight": torch.from_numpy(w["wo"][i]),
                      f"layers.{i}.mlp_norm.weight": torch.from_numpy(w["rms_ffn"][i]),
                      f"layers.{i}.mlp.gate_up.weight": torch.from_numpy(np.concatenate([w["w1"][i], w["w3"][i]])),
                      f"layers.{i}.mlp.down.weight": torch.from_numpy(w["w2"][i])})
    tokens = [1, 50, 60, 70]
    want = Llama2cReference(w, arch.num_heads, arch.num_kv_heads, 32).logits(tokens)
    assert np.abs(decoder_logits(arch, state, tokens) - want)[1:].max() > 1e-3  # position 0 has no rotation


def test_tokenizer_conversion_keeps_pieces_scores_and_bytes(llama2c_bundles, tmp_path):
    bundle = llama2c_bundles["legacy-unshared-mha"][1]
    info = bundle.manifest.tokenizer
    assert (info.kind, info.file, info.bos_id, info.eos_ids, info.add_bos, info.vocab_size) == (
        "llama2c", "tokenizer.llama2c.json", 1, (2,), True, len(PIECES))
    data = json.loads((bundle.path / "tokenizer.llama2c.json").read_text(encoding="utf-8"))
    scores = write_tokenizer_bin(tmp_path / "again.bin")  # same seed: the scores the fixture wrote
    assert data["pieces"] == PIECES
    assert np.array_equal(np.array(data["scores"], dtype=np.float32), scores)
    assert data["pieces"][10 + 3] == "<0x0A>" and data["pieces"][0xFF + 3] == "<0xFF>"
    assert data["pieces"][PIECES.index(" café")] == " café"


def test_tokenizer_given_explicitly_and_missing(tmp_path):
    w = random_weights(n_layers=1, vocab=270)
    path = write_v1(tmp_path / "model.bin", w)
    with pytest.raises(InputError, match="--tokenizer"):
        load_llama2c(path, ExportConfig())
    assert load_llama2c(path, ExportConfig(allow_missing_tokenizer=True)).tokenizer is None
    write_tokenizer_bin(tmp_path / "tok512.bin", PIECES[:265])
    loaded = load_llama2c(path, ExportConfig(tokenizer=tmp_path / "tok512.bin"))
    assert loaded.tokenizer.info.vocab_size == 265 and loaded.arch.vocab_size == 270


def test_malformed_tokenizer_bin(tmp_path):
    path = tmp_path / "tokenizer.bin"
    write_tokenizer_bin(path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(InputError, match="truncated"):
        read_llama2c_tokenizer(path)
    path.write_bytes(struct.pack("i", 0) + data[4:])
    with pytest.raises(InputError, match="max_token_length"):
        read_llama2c_tokenizer(path)
    path.write_bytes(data[:4] + struct.pack("fi", 0.0, 2) + b"\xff\xfe")
    with pytest.raises(InputError, match="UTF-8"):
        read_llama2c_tokenizer(path)


def _legacy_header(*params) -> bytes:
    return struct.pack("iiiiiii", *params)


@pytest.mark.parametrize("params, message", [
    ((0, 64, 2, 4, 2, 300, 32), "dim=0 must be positive"),
    ((32, 64, 2, 4, 2, 300, -5), "seq_len=-5 must be positive"),
    ((30, 64, 2, 4, 2, 300, 32), "n_heads=4 does not divide dim=30"),
    ((32, 64, 2, 4, 3, 300, 32), "n_kv_heads=3 does not divide n_heads=4"),
    ((32, 64, 2, 32, 32, 300, 32), "head size 1"),
    ((2**30, 2**30, 2**30, 1, 1, 2**30, 2**30), "needs exactly"),
])
def test_impossible_header(tmp_path, params, message):
    path = tmp_path / "model.bin"
    path.write_bytes(_legacy_header(*params) + b"\0" * 4096)
    with pytest.raises(InputError, match=message) as info:
        load_llama2c(path, ExportConfig(allow_missing_tokenizer=True))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("writer", [write_legacy, write_v1])
def test_truncated_or_padded_bin(tmp_path, writer):
    path = writer(tmp_path / "model.bin", random_weights(n_layers=1))
    data = path.read_bytes()
    for broken in (data[:-4], data + b"\0" * 4, data[:20]):
        path.write_bytes(broken)
        with pytest.raises(InputError, match=str(len(broken))):
            load_llama2c(path, ExportConfig(allow_missing_tokenizer=True))


def test_quantized_v2_is_unsupported(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("Ii", 0x616B3432, 2) + b"\0" * 300)
    with pytest.raises(UnsupportedModelError, match="version 2"):
        load_llama2c(path, ExportConfig(allow_missing_tokenizer=True))


def test_v1_file_is_detected_by_its_magic_whatever_its_name(tmp_path):
    from gptedge.exporter.checkpoints.detect import detect_format

    path = write_v1(tmp_path / "stories15M.model", random_weights(n_layers=1))
    assert path.read_bytes()[:4] == b"24ka"  # uint32 0x616b3432, little-endian
    assert detect_format(path) == "llama2c"


def test_runtime_reads_the_converted_tokenizer(llama2c_bundles):
    from gptedge.runtime.bundle import load_bundle
    from gptedge.runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(load_bundle(llama2c_bundles["legacy-unshared-mha"][1].path))
    text = "the café\nhello"
    ids = tokenizer.encode(text)
    assert 10 + 3 in ids  # "\n" is no piece here: byte fallback <0x0A>
    assert tokenizer.decode([1, *ids]) == text  # BOS drops the dummy-prefix space
