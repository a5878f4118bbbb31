"""Hostile and broken inputs through the real `gptedge` CLI, in subprocesses.

Every case must end with the error class's exit code, ONE stderr line starting with "error:" that
names the culprit, no traceback, and no output bundle or temporary folder left behind. Cheap cases
are grouped: one subprocess runs a list of command lines through ``gptedge.runtime.cli.main`` (a
fresh interpreter per group, stdout/stderr captured per command), so torch is imported once.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import string
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_GPT2
from test_llama2c_export import random_weights, write_legacy, write_tokenizer_bin, write_v1
from test_nanogpt_export import RunsCode, nanogpt_state, write_ckpt, write_meta

from gptedge.runtime.errors import (
    BundleError,
    GenerationError,
    InputError,
    OutputExistsError,
    UnsupportedModelError,
)

INPUT, UNSUPPORTED, BUNDLE = InputError.exit_code, UnsupportedModelError.exit_code, BundleError.exit_code
GENERATION, EXISTS = GenerationError.exit_code, OutputExistsError.exit_code
ARGPARSE = 2  # argparse's own code for a malformed command line (same as InputError)

# Runs each command line of a JSON list through the CLI's main() with stdout/stderr captured.
DRIVER = r"""
import contextlib, io, json, logging, sys
class Stderr:  # log records go to whatever sys.stderr is when they are emitted
    def write(self, text): sys.stderr.write(text)
    def flush(self): sys.stderr.flush()
logging.basicConfig(stream=Stderr(), level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from gptedge.runtime.cli import main
results = []
for argv in json.loads(open(sys.argv[1]).read()):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # would be a traceback in the real CLI
            code, err = -1, io.StringIO(f"Traceback (escaped main): {type(exc).__name__}: {exc}")
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
open(sys.argv[2], "w").write(json.dumps(results))
"""

CHARS = (string.ascii_letters + string.digits + string.punctuation + " \n")[:TINY_GPT2.vocab_size]


def run_group(root: Path, cases: list[tuple[list[str], int, str]]) -> None:
    """Run each (argv, exit code, message fragment) in one subprocess; check every contract."""
    (root / "argv.json").write_text(json.dumps([argv for argv, _, _ in cases]))
    proc = subprocess.run([sys.executable, "-c", DRIVER, "argv.json", "results.json"], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((root / "results.json").read_text())
    failures = []
    for (argv, code, fragment), got in zip(cases, results):
        err = got["stderr"]
        ok = (got["code"] == code and err.startswith("error:") and err.count("\n") == 1
              and "Traceback" not in err and fragment in err)
        if not ok:
            failures.append(f"{' '.join(argv)}\n  expected exit {code} and {fragment!r}\n"
                            f"  got exit {got['code']}: {err!r}")
    assert not failures, "\n".join(failures)


def assert_no_debris(folder: Path, allowed: set[str]) -> None:
    """Only the entries the test put there: no bundle, no `.name.tmp-*` / `.name.old-*` folder."""
    assert {p.name for p in folder.iterdir()} == allowed


# -- fixtures: small real files ----------------------------------------------------------------
@pytest.fixture(scope="module")
def char_bundle(tmp_path_factory) -> Path:
    """A random-weight TINY_GPT2 bundle with a char tokenizer (text prompts work), context 64."""
    from gptedge.exporter import ExportConfig, export_loaded
    from gptedge.exporter.checkpoints import LoadedCheckpoint, TokenizerFiles
    from gptedge.exporter.checkpoints.synthetic import random_state_dict
    from gptedge.runtime.bundle import TokenizerInfo

    tokenizer = TokenizerFiles(TokenizerInfo(kind="char", file="tokenizer.char.json", vocab_size=len(CHARS)),
                               {"tokenizer.char.json": json.dumps({"itos": list(CHARS)}).encode()})
    checkpoint = LoadedCheckpoint(TINY_GPT2, random_state_dict(TINY_GPT2, seed=3), {"format": "random"}, tokenizer)
    out = tmp_path_factory.mktemp("hostile") / "char"
    export_loaded(checkpoint, ExportConfig(validate=False), out)
    return out


def damaged(bundle: Path, dest: Path, edit) -> Path:
    """A copy of ``bundle`` at ``dest`` changed by ``edit(path)``."""
    shutil.copytree(bundle, dest)
    edit(dest)
    return dest


def _set_location(folder: Path, location: str) -> None:
    import onnx

    for name in ("model.onnx", "model_last.onnx"):
        model = onnx.load(str(folder / name), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(model, str(folder / name))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# -- export: checkpoints of every format -------------------------------------------------------
def test_export_refuses_broken_checkpoints(tmp_path):
    r = tmp_path
    marker = r / "marker"
    (r / "plain").mkdir()
    (r / "cfgdir" / "config.json").mkdir(parents=True)
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 2, "vocab_size": 96, "n_positions": 64}
    hf = {}
    for name, config, files in [
        ("badjson", '{"model_type": "gpt2",', {}),
        ("bert", json.dumps({"model_type": "bert"}), {}),
        ("notype", json.dumps({"n_embd": 32}), {}),
        ("st_empty", json.dumps(gpt2), {"model.safetensors": b""}),
        ("st_random", json.dumps(gpt2), {"model.safetensors": np.random.default_rng(0).bytes(700)}),
        ("st_trunc", json.dumps(gpt2), {"model.safetensors": _safetensors_bytes()[:-100]}),
        ("bin_empty", json.dumps(gpt2), {"pytorch_model.bin": b""}),
        ("bin_random", json.dumps(gpt2), {"pytorch_model.bin": np.random.default_rng(1).bytes(700)}),
    ]:
        folder = hf[name] = r / name
        folder.mkdir()
        (folder / "config.json").write_text(config)
        for file, data in files.items():
            (folder / file).write_bytes(data)
    hf["bin_code"] = r / "bin_code"
    hf["bin_code"].mkdir()
    (hf["bin_code"] / "config.json").write_text(json.dumps(gpt2))
    torch.save({"transformer.wte.weight": RunsCode(marker)}, hf["bin_code"] / "pytorch_model.bin")

    state, args = nanogpt_state(n_layer=1)
    good = write_ckpt(r / "ng" / "ckpt.pt", state, args)
    write_meta(r / "ng" / "meta.pkl")
    ckpt_bytes = good.read_bytes()
    (r / "empty.pt").write_bytes(b"")
    (r / "trunc.pt").write_bytes(ckpt_bytes[: len(ckpt_bytes) // 2])
    (r / "random.pt").write_bytes(np.random.default_rng(2).bytes(900))
    torch.save({"model": state, "model_args": args, "config": {"x": RunsCode(marker)}}, r / "code.pt")
    bad_state = dict(state, **{"transformer.wte.weight": torch.zeros(40, 16)})
    write_ckpt(r / "shape" / "ckpt.pt", bad_state, args)
    write_ckpt(r / "evilmeta" / "ckpt.pt", state, args)
    (r / "evilmeta" / "meta.pkl").write_bytes(pickle.dumps({"itos": {0: "a"}, "x": RunsCode(marker)}))
    meta = (r / "ng" / "meta.pkl").read_bytes()
    (r / "empty.pkl").write_bytes(b"")
    (r / "trunc.pkl").write_bytes(meta[: len(meta) // 2])
    (r / "random.pkl").write_bytes(np.random.default_rng(3).bytes(300))
    write_meta(r / "big" / "meta.pkl", chars=list(string.printable))  # 100 characters > 40 ids

    weights = random_weights(n_layers=1, vocab=300)
    llama = write_legacy(r / "l2c.bin", weights).read_bytes()
    write_v1(r / "v1.bin", weights)
    (r / "empty.bin").write_bytes(b"")
    (r / "trunc.bin").write_bytes(llama[:-64])
    (r / "random.bin").write_bytes(np.random.default_rng(4).bytes(4000))
    (r / "heads.bin").write_bytes(struct.pack("7i", 32, 64, 1, 3, 3, 300, 32) + b"\0" * 1024)
    (r / "huge.bin").write_bytes(struct.pack("7i", 2**30, 2**30, 2**30, 1, 1, 2**30, 2**30) + b"\0" * 64)
    (r / "v2.bin").write_bytes(struct.pack("Ii", 0x616B3432, 2) + b"\0" * 300)
    write_tokenizer_bin(r / "tok.bin")
    tok = (r / "tok.bin").read_bytes()
    (r / "tok_empty.bin").write_bytes(b"")
    (r / "tok_trunc.bin").write_bytes(tok[:-5])
    (r / "tok_random.bin").write_bytes(np.random.default_rng(5).bytes(500))
    (r / "out").mkdir()
    (r / "out" / "exists").mkdir()
    (r / "out" / "file").write_text("a regular file")

    def exp(source, *extra, out="out/b"):
        return ["export", str(source), "-o", out, "--no-validate", *extra]

    run_group(r, [
        (exp("missing.pt"), INPUT, "missing.pt: does not exist"),
        (exp("plain"), INPUT, "neither config.json"),
        (exp("cfgdir"), INPUT, "neither config.json"),  # config.json is a directory
        (exp("badjson"), INPUT, "badjson/config.json: cannot read it as JSON"),
        (exp("bert"), UNSUPPORTED, "model_type 'bert' is not supported"),
        (exp("notype"), UNSUPPORTED, "model_type None"),
        (exp("st_empty"), INPUT, "st_empty/model.safetensors: truncated or corrupt"),
        (exp("st_random"), INPUT, "st_random/model.safetensors: truncated or corrupt"),
        (exp("st_trunc"), INPUT, "st_trunc/model.safetensors: truncated or corrupt"),
        (exp("bin_empty"), INPUT, "bin_empty/pytorch_model.bin: cannot load"),
        (exp("bin_random"), INPUT, "bin_random/pytorch_model.bin: cannot load"),
        (exp("bin_code"), INPUT, "Unsupported global"),
        (exp("empty.pt", "--no-tokenizer"), INPUT, "empty.pt: cannot read as a torch checkpoint"),
        (exp("trunc.pt", "--no-tokenizer"), INPUT, "trunc.pt: cannot read"),
        (exp("random.pt", "--no-tokenizer"), INPUT, "random.pt: not a plain nanoGPT checkpoint"),
        (exp("code.pt", "--no-tokenizer"), INPUT, "GLOBAL exec was not an allowed global"),
        (exp("shape/ckpt.pt", "--no-tokenizer"), INPUT, "transformer.wte.weight"),
        (exp("evilmeta"), INPUT, "evilmeta/meta.pkl: not a plain-data pickle"),
        (exp("ng", "--tokenizer", "empty.pkl"), INPUT, "empty.pkl: not a plain-data pickle"),
        (exp("ng", "--tokenizer", "trunc.pkl"), INPUT, "trunc.pkl: not a plain-data pickle"),
        (exp("ng", "--tokenizer", "random.pkl"), INPUT, "random.pkl: not a plain-data pickle"),
        (exp("ng", "--tokenizer", "big/meta.pkl"), INPUT, "tokenizer has 100 tokens but the model only 40"),
        (exp("ng", "--tokenizer", "missing.pkl"), INPUT, "--tokenizer missing.pkl: does not exist"),
        (exp("empty.bin"), INPUT, "empty.bin: 0 bytes is too short"),
        (exp("trunc.bin", "--no-tokenizer"), INPUT, "the file is truncated"),
        (exp("random.bin"), INPUT, "random.bin: impossible llama2.c header"),
        (exp("heads.bin"), INPUT, "n_heads=3 does not divide dim=32"),
        (exp("huge.bin"), INPUT, "needs exactly"),
        (exp("v2.bin"), UNSUPPORTED, "version 2 is not supported"),
        (exp("v1.bin", "--tokenizer", "tok_empty.bin"), INPUT, "tok_empty.bin: 0 bytes is too short"),
        (exp("v1.bin", "--tokenizer", "tok_trunc.bin"), INPUT, "tok_trunc.bin: truncated"),
        (exp("v1.bin", "--tokenizer", "tok_random.bin"), INPUT, "tok_random.bin"),
        (exp("ng", out="out/exists"), EXISTS, "already exists; pass --overwrite"),
        (exp("ng", out="out/file/b"), EXISTS, "out/file is a file, not a folder"),
        (["export", "ng", "--opset"], ARGPARSE, "argument --opset: expected one argument"),
    ])
    assert not marker.exists(), "a pickle ran code"
    assert_no_debris(r / "out", {"exists", "file"})
    assert list((r / "out" / "exists").iterdir()) == []


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"transformer.wte.weight": torch.zeros(96, 32)})


# -- generate: broken bundles and impossible requests ------------------------------------------
def test_generate_refuses_broken_bundles_and_arguments(char_bundle, tmp_path):
    r = tmp_path
    b = char_bundle
    (r / "empty").mkdir()
    (r / "secret").write_bytes((b / "model.onnx.data").read_bytes())
    bundles = {
        "no_model": lambda p: (p / "model.onnx").unlink(),
        "trunc_last": lambda p: (p / "model_last.onnx").write_bytes((b / "model_last.onnx").read_bytes()[:300]),
        "no_data": lambda p: (p / "model.onnx.data").unlink(),
        "trunc_data": lambda p: (p / "model.onnx.data").write_bytes(b"\0" * 1000),
        "future": lambda p: _edit_json(p / "manifest.json", format_version=99),
        "badjson": lambda p: (p / "manifest.json").write_text('{"format_version": 1,'),
        "bigtok": lambda p: (p / "tokenizer.char.json").write_text(json.dumps({"itos": [*CHARS, "é", "ü"]})),
        "escape": lambda p: _set_location(p, "../secret"),
        "absolute": lambda p: _set_location(p, str(r / "secret")),
        "inf": lambda p: (p / "model.onnx.data").write_bytes(
            np.full((b / "model.onnx.data").stat().st_size // 4, np.inf, "<f4").tobytes()),
    }
    for name, edit in bundles.items():
        damaged(b, r / name, edit)

    def gen(bundle, *extra):
        return ["generate", str(bundle), "ab", "--max-new-tokens", "4", *extra]

    run_group(r, [
        (gen("missing"), BUNDLE, "missing: bundle folder does not exist"),
        (gen(b / "manifest.json"), BUNDLE, "is a file, expected a bundle folder"),
        (gen("empty"), BUNDLE, "no manifest.json"),
        (gen("no_model"), BUNDLE, "no_model/model.onnx: file for 'model'"),
        (gen("trunc_last"), BUNDLE, "trunc_last/model_last.onnx: not a readable ONNX graph"),
        (gen("no_data"), BUNDLE, "no_data/model.onnx.data: file for 'weights'"),
        (gen("trunc_data"), BUNDLE, "the file is truncated"),
        (gen("future"), BUNDLE, "format_version 99 is newer"),
        (gen("badjson"), BUNDLE, "badjson/manifest.json: malformed JSON"),
        (gen("bigtok"), BUNDLE, "the tokenizer has 98 tokens but the model only 96"),
        (gen("escape"), BUNDLE, "'../secret' escapes the bundle folder"),
        (gen("absolute"), BUNDLE, "escapes the bundle folder"),
        (gen("inf"), GENERATION, "non-finite logits"),
        (["generate", str(b), "a" * 70], GENERATION, "prompt of 70 tokens"),
        (gen(b, "--temperature", "-0.5"), GENERATION, "temperature=-0.5"),
        (gen(b, "--temperature", "1", "--top-p", "1.5"), GENERATION, "top_p=1.5: must be in (0, 1]"),
        (gen(b, "--temperature", "1", "--top-p", "0"), GENERATION, "top_p=0.0"),
        (gen(b, "--temperature", "1", "--top-k", "0"), GENERATION, "top_k=0: must be an integer >= 1"),
        (gen(b, "--max-new-tokens", "0"), GENERATION, "max_new_tokens=0"),
        (["generate", str(b), "1,2,999", "--ids"], GENERATION, "outside the model's vocabulary"),
        (["generate", str(b), "a€b"], GENERATION, "character '€' is not in this model's"),
        (gen(b, "--top-k", "many"), ARGPARSE, "argument --top-k: invalid int value"),
    ])


# -- quantize ----------------------------------------------------------------------------------
def test_quantize_refuses_bad_inputs_and_outputs(char_bundle, tmp_path):
    r = tmp_path
    (r / "empty.txt").write_text("")
    (r / "blank.txt").write_text("  \n\n ")
    (r / "calibdir").mkdir()
    (r / "binary.txt").write_bytes(b"\xff\xfe\x00abc")
    (r / "out").mkdir()
    (r / "out" / "exists").mkdir()
    (r / "out" / "file").write_text("x")

    def q(*extra, out="out/q"):
        return ["quantize", str(char_bundle), "-o", out, *extra]

    run_group(r, [
        (q("--mode", "int8", "--calib", "empty.txt"), INPUT, "--calib empty.txt: the file is empty"),
        (q("--mode", "int8", "--calib", "blank.txt"), INPUT, "the file is empty"),
        (q("--mode", "int8", "--calib", "calibdir"), INPUT, "--calib calibdir: is a folder"),
        (q("--mode", "int8", "--calib", "binary.txt"), INPUT, "not UTF-8 text"),
        (q("--mode", "int8", "--calib", "nothere.txt"), INPUT, "--calib nothere.txt: no such file"),
        (q("--mode", "fp16", out="out/exists"), EXISTS, "already exists; pass --overwrite"),
        (q("--mode", "fp16", out="out/file/q"), EXISTS, "out/file is a file, not a folder"),
        (q("--mode", "fp16", out=str(char_bundle)), INPUT, "not the source bundle"),
        (["quantize", "nobundle", "-o", "out/q", "--mode", "fp16"], BUNDLE, "nobundle: bundle folder does not exist"),
        (q("--mode", "int4", "--block-size", "7"), INPUT, "block_size=7"),
        (q("--mode", "int3"), ARGPARSE, "argument --mode: invalid choice"),
    ])
    assert_no_debris(r / "out", {"exists", "file"})
    assert list((r / "out" / "exists").iterdir()) == []


def test_sigint_during_quantize_leaves_nothing(char_bundle, tmp_path):
    """A real Ctrl-C (SIGINT) while `gptedge quantize` writes and gates its output: exit 130,
    no output folder, no temporary folder."""
    text = "".join(np.random.default_rng(0).choice(list(CHARS), 400_000))
    (tmp_path / "eval.txt").write_text(text)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptedge.runtime.cli", "quantize", str(char_bundle), "-o", str(out_parent / "q"),
         "--mode", "fp16", "--eval", str(tmp_path / "eval.txt"), "--max-ppl-increase", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not any(out_parent.iterdir()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # wait until the temporary output folder exists: the bundle is being written
    assert [p.name.startswith(".q.tmp-") for p in out_parent.iterdir()] == [True], "quantize never wrote"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    assert list(out_parent.iterdir()) == []
