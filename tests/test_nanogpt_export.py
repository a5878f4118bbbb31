"""nanoGPT ckpt.pt -> bundle: logits against an independent nanoGPT forward, tokenizer discovery,
refusal of pickles that would run code, and checkpoint validation."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import shared_file
from reference_impls import nanogpt_forward

from gptedge.exporter import ExportConfig, export
from gptedge.exporter.checkpoints.nanogpt import load_nanogpt
from gptedge.exporter.checkpoints.tokenizers import hf_tokenizer_from_vocab_merges
from gptedge.runtime import contract
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.errors import InputError

CHARS = list("\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDE")  # 40 characters


def nanogpt_state(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=40, bias=True, seed=0):
    """A nanoGPT state dict with nanoGPT's names (lm_head tied to wte, as GPT.__init__ does)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return scale * torch.randn(shape, generator=g)

    C = n_embd
    state = {"transformer.wte.weight": rand(vocab_size, C, scale=0.3), "transformer.wpe.weight": rand(block_size, C)}
    parts = {"ln_1": (C,), "attn.c_attn": (3 * C, C), "attn.c_proj": (C, C), "ln_2": (C,),
             "mlp.c_fc": (4 * C, C), "mlp.c_proj": (C, 4 * C)}
    for i in range(n_layer):
        for part, shape in parts.items():
            is_norm = part.startswith("ln")
            state[f"transformer.h.{i}.{part}.weight"] = 1 + rand(*shape) if is_norm else rand(*shape)
            if bias:
                state[f"transformer.h.{i}.{part}.bias"] = rand(shape[0])
    state["transformer.ln_f.weight"] = 1 + rand(C)
    if bias:
        state["transformer.ln_f.bias"] = rand(C)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                vocab_size=vocab_size, dropout=0.0)
    return state, args


def write_ckpt(path: Path, state, args, dataset="shakespeare_char", prefix="", extra_state=None):
    model = {prefix + k: v for k, v in {**state, **(extra_state or {})}.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "model_args": args, "iter_num": 250, "best_val_loss": torch.tensor(1.5),
                "config": {"dataset": dataset, "batch_size": 12, "compile": bool(prefix)},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}}, path)
    return path


def write_meta(path: Path, chars=CHARS):
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    with open(path, "wb") as handle:
        pickle.dump(meta, handle)


@pytest.fixture(scope="session")
def nanogpt_bundles(tmp_path_factory):
    """Two exports: bias=True + torch.compile prefix + meta.pkl beside ckpt.pt; bias=False +
    causal-mask buffers + a padded vocab + meta.pkl at data/<dataset>/ (found from the parents)."""
    root = tmp_path_factory.mktemp("nanogpt")
    cases = {}
    state, args = nanogpt_state(bias=True, seed=1)
    ckpt = write_ckpt(root / "a" / "out" / "ckpt.pt", state, args, prefix="_orig_mod.")
    write_meta(ckpt.parent / "meta.pkl")
    cases["bias"] = (state, args, export(ckpt.parent, ExportConfig(), root / "a" / "bundle"))
    state, args = nanogpt_state(bias=False, vocab_size=48, n_head=2, seed=2)
    masks = {f"transformer.h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 32, 32)) for i in range(2)}
    ckpt = write_ckpt(root / "b" / "out-char" / "ckpt.pt", state, args, dataset="tiny_char", extra_state=masks)
    write_meta(root / "b" / "data" / "tiny_char" / "meta.pkl")
    config = ExportConfig(last_logits_variant=False)  # the second graph is covered by the first case
    cases["nobias"] = (state, args, export(ckpt, config, root / "b" / "bundle"))
    return cases


def onnx_logits(bundle_path: Path, arch, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(bundle_path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    feeds.update({n: np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), np.float32)
                  for n in contract.past_names(arch.num_layers)})
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("case", ["bias", "nobias"])
def test_bundle_matches_independent_nanogpt_forward(nanogpt_bundles, case):
    state, args, bundle = nanogpt_bundles[case]
    arch = bundle.manifest.architecture
    assert (arch.qkv_bias, arch.norm_bias, arch.activation, arch.position) == (args["bias"], args["bias"], "gelu", "learned")
    assert arch.max_context == args["block_size"] and arch.vocab_size == args["vocab_size"]
    assert arch.tie_word_embeddings
    onnx.checker.check_model(str(bundle.path / "model.onnx"))
    assert bundle.manifest.parity["passed"] and bundle.manifest.parity["max_abs"] <= 1e-4
    ids = np.array([[5, 1, 17, 30, 2, 9, 39, 0, 12, 22, 3, 7]], dtype=np.int64)
    got = onnx_logits(bundle.path, arch, ids)
    with torch.no_grad():
        want = nanogpt_forward(state, args["n_layer"], args["n_head"], torch.from_numpy(ids)).numpy()
    assert got.shape == want.shape == (1, 12, args["vocab_size"])
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(want).max() > 0.5  # the comparison is not between near-zero tensors


def test_char_tokenizer_written_and_sources_recorded(nanogpt_bundles):
    for case in ("bias", "nobias"):
        bundle = nanogpt_bundles[case][2]
        info = bundle.manifest.tokenizer
        assert (info.kind, info.file, info.vocab_size) == ("char", "tokenizer.char.json", len(CHARS))
        assert json.loads((bundle.path / "tokenizer.char.json").read_text(encoding="utf-8")) == {"itos": CHARS}
        assert bundle.manifest.files["tokenizer:tokenizer.char.json"]["path"] == "tokenizer.char.json"
        source = bundle.manifest.source
        assert source["format"] == "nanogpt" and len(source["sha256"]) == 64 and source["iter_num"] == 250
    assert nanogpt_bundles["nobias"][2].manifest.source["tokenizer_source"].endswith("data/tiny_char/meta.pkl")
    assert load_bundle(nanogpt_bundles["bias"][2].path).manifest.source["dataset"] == "shakespeare_char"


def test_meta_pkl_found_relative_to_cwd(tmp_path, monkeypatch):
    state, args = nanogpt_state(n_layer=1)
    ckpt = write_ckpt(tmp_path / "elsewhere" / "ckpt.pt", state, args, dataset="cwd_char")
    project = tmp_path / "project"
    write_meta(project / "data" / "cwd_char" / "meta.pkl")
    with pytest.raises(InputError, match="--no-tokenizer"):
        load_nanogpt(ckpt, ExportConfig())
    monkeypatch.chdir(project)
    loaded = load_nanogpt(ckpt, ExportConfig())
    assert loaded.tokenizer.info.kind == "char" and loaded.source["tokenizer_source"].startswith(str(project))


def test_untied_head_and_missing_tokenizer_allowed(tmp_path):
    state, args = nanogpt_state(n_layer=1, bias=False)
    state["lm_head.weight"] = state["lm_head.weight"] + 0.5
    ckpt = write_ckpt(tmp_path / "ckpt.pt", state, args)
    loaded = load_nanogpt(ckpt, ExportConfig(allow_missing_tokenizer=True))
    assert loaded.tokenizer is None and not loaded.arch.tie_word_embeddings
    assert torch.equal(loaded.state_dict["lm_head.weight"], state["lm_head.weight"])
    assert "layers.0.attn.qkv.bias" not in loaded.state_dict


class RunsCode:
    """Unpickling this calls exec(), which writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    state, args = nanogpt_state(n_layer=1)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "model_args": args, "config": {"x": RunsCode(marker)}}, path)
    with pytest.raises(InputError, match="not a plain nanoGPT checkpoint") as info:
        load_nanogpt(path, ExportConfig(allow_missing_tokenizer=True))
    assert str(path) in str(info.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # proves the payload is live: an unsafe load runs it
    assert marker.read_text() == "ran"


def test_meta_pkl_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    state, args = nanogpt_state(n_layer=1)
    ckpt = write_ckpt(tmp_path / "ckpt.pt", state, args)
    payload = pickle.dumps({"vocab_size": 2, "itos": {0: "a", 1: "b"}, "evil": RunsCode(marker)})
    (tmp_path / "meta.pkl").write_bytes(payload)
    with pytest.raises(InputError, match="meta.pkl"):
        load_nanogpt(ckpt, ExportConfig())
    assert not marker.exists()
    pickle.loads(payload)  # an unrestricted unpickler would have run it
    assert marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda s, a: s.__setitem__("transformer.h.1.attn.c_attn.weight", torch.zeros(3, 3)), "wrong shapes"),
    (lambda s, a: s.pop("transformer.h.0.mlp.c_fc.bias"), "missing"),
    (lambda s, a: s.__setitem__("transformer.h.0.attn.rotary", torch.zeros(2)), "unexpected"),
    (lambda s, a: a.__setitem__("n_head", 5), "not divisible"),
    (lambda s, a: a.__setitem__("vocab_size", 41), "transformer.wte.weight"),
])
def test_bad_checkpoint_names_the_file(tmp_path, damage, message):
    state, args = nanogpt_state()
    damage(state, args)
    path = write_ckpt(tmp_path / "ckpt.pt", state, args)
    with pytest.raises(InputError, match=message) as info:
        load_nanogpt(path, ExportConfig(allow_missing_tokenizer=True))
    assert str(path) in str(info.value)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(InputError, match="cannot read"):
        load_nanogpt(path, ExportConfig())
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(InputError, match="model_args"):
        load_nanogpt(path, ExportConfig())


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path):
    state, args = nanogpt_state(n_layer=1, vocab_size=30)
    ckpt = write_ckpt(tmp_path / "ckpt.pt", state, args)
    write_meta(tmp_path / "meta.pkl")  # 40 characters
    with pytest.raises(InputError, match="40 tokens"):
        export(ckpt, ExportConfig(), tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def test_gpt2_style_vocab_and_merges_make_a_bpe_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    table = bytes_to_unicode()
    vocab = {ch: i for i, ch in enumerate(table[b] for b in range(256))}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    state, args = nanogpt_state(n_layer=1, vocab_size=320)
    ckpt = write_ckpt(tmp_path / "out" / "ckpt.pt", state, args, dataset="openwebtext")
    loaded = load_nanogpt(ckpt, ExportConfig(tokenizer=tmp_path))
    info = loaded.tokenizer.info
    assert (info.kind, info.file, info.eos_ids, info.add_bos, info.vocab_size) == ("hf", "tokenizer.json", (260,), False, 261)
    tokenizer = Tokenizer.from_str(loaded.tokenizer.files["tokenizer.json"].decode())
    ids = tokenizer.encode("hello world<|endoftext|>").ids
    assert ids[:2] == [vocab["hell"], vocab["o"]] and vocab["Ġw"] in ids and ids[-1] == 260
    assert tokenizer.decode(ids[:-1]) == "hello world"


def test_real_gpt2_vocab_and_merges_match_the_reference_tokenizer_json():
    from tokenizers import Tokenizer

    vocab = shared_file("gpt2-tokenizer", "vocab.json")
    converted = hf_tokenizer_from_vocab_merges(vocab, vocab.with_name("merges.txt"))
    assert converted.info.eos_ids == (50256,) and converted.info.vocab_size == 50257
    ours = Tokenizer.from_str(converted.files["tokenizer.json"].decode())
    reference = Tokenizer.from_file(str(vocab.with_name("tokenizer.json")))
    text = "Hello world! It's 2026, naïve café — ünïcödé   spaces\n\nnew lines<|endoftext|>"
    assert ours.encode("Hello world").ids == [15496, 995]
    assert ours.encode(text).ids == reference.encode(text).ids


def test_runtime_reads_the_char_tokenizer(nanogpt_bundles):
    from gptedge.runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(nanogpt_bundles["bias"][2])
    assert tokenizer.encode("hi, bob!\n") == [CHARS.index(c) for c in "hi, bob!\n"]
    assert tokenizer.decode(tokenizer.encode("to be: or not")) == "to be: or not"


def test_padded_gpt2_vocab_takes_gpt2_tokenizer_json(tmp_path):
    tokenizer_json = shared_file("gpt2-tokenizer", "tokenizer.json")
    state, args = nanogpt_state(n_layer=1, n_embd=16, n_head=2, vocab_size=50304)
    ckpt = write_ckpt(tmp_path / "ckpt.pt", state, args, dataset="openwebtext")
    with pytest.raises(InputError, match="GPT-2's BPE"):
        load_nanogpt(ckpt, ExportConfig())
    loaded = load_nanogpt(ckpt, ExportConfig(tokenizer=tokenizer_json))
    info = loaded.tokenizer.info
    assert (info.kind, info.eos_ids, info.vocab_size, loaded.arch.vocab_size) == ("hf", (50256,), 50257, 50304)
    assert loaded.tokenizer.files["tokenizer.json"] == tokenizer_json.read_bytes()
