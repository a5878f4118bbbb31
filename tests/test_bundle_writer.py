"""The one bundle writer: export and quantize both finish a bundle through it, manifest.json is
written once per bundle, and the two produce the same file-table shape.

Manifest writes are observed from outside the code under test, with a Python audit hook that sees
every ``open()`` of the process (no patching): a second write anywhere in export or quantize (the
old pipeline wrote it twice) makes the count 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
from conftest import TINY_LLAMA
from quantize_helpers import tiny_arch

from gptedge.runtime import contract
from gptedge.runtime.bundle import Manifest, load_bundle
from gptedge.runtime.bundle_writer import BundleWriter
from gptedge.runtime.errors import BundleError

ALPHABET = list("abcdefghijklmnopqrstuvwxyz .,\n")
_WRITES: list[list[str]] = []  # stack of active recorders; the hook cannot be removed, only idled
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _WRITES or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    name = os.path.basename(os.fsdecode(args[0]))
    mode, flags = args[1], args[2]
    writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
    if writing and name.startswith("manifest.json"):
        _WRITES[-1].append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


class _ManifestWrites:
    def __enter__(self) -> list[str]:
        _WRITES.append([])
        return _WRITES[-1]

    def __exit__(self, *exc) -> None:
        _WRITES.pop()


def _checkpoint():
    """A random GQA-capable decoder (head_dim 16) with a char tokenizer, a copied source file and
    a chat template: every kind of file-table entry the exporter writes."""
    from gptedge.exporter.checkpoints import LoadedCheckpoint, TokenizerFiles
    from gptedge.exporter.checkpoints.synthetic import random_state_dict
    from gptedge.runtime.bundle import TokenizerInfo

    arch = tiny_arch(len(ALPHABET))
    tokenizer = TokenizerFiles(info=TokenizerInfo(kind="char", file="tokenizer.char.json", vocab_size=len(ALPHABET)),
                               files={"tokenizer.char.json": json.dumps({"itos": ALPHABET}).encode()})
    return LoadedCheckpoint(arch=arch, state_dict=random_state_dict(arch, 0), source={"format": "random"},
                            tokenizer=tokenizer, extra_files={"config.json": b"{}"},
                            chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")


def _shape(bundle) -> list[tuple[str, str, list[str], bool]]:
    return [(role, entry["path"], sorted(entry), entry["portable"]) for role, entry in bundle.manifest.files.items()]


def test_export_and_quantize_write_the_manifest_once_and_the_same_file_table(tmp_path):
    from gptedge.exporter import ExportConfig, export_loaded
    from gptedge.quantize import Int8DynamicConfig, quantize

    with _ManifestWrites() as writes:
        exported = export_loaded(_checkpoint(), ExportConfig(), tmp_path / "fp32")
    assert len(writes) == 1, writes
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox, jumps over the lazy dog.\n" * 8)
    with _ManifestWrites() as writes:  # the quality gate reads the bundle before it is finished
        quantized = quantize(exported.path, Int8DynamicConfig(), tmp_path / "int8", eval_text=text,
                             max_ppl_increase=float("inf"))
    assert len(writes) == 1, writes
    assert quantized.manifest.history[-1]["quality"]["tokens"] > 0
    assert contract.ORT_VARIANT_ROLE in exported.manifest.files
    assert {"model", "model_last", "weights", "tokenizer:tokenizer.char.json", "source:config.json",
            "tokenizer:chat_template.jinja"} <= set(exported.manifest.files)
    assert _shape(quantized) == _shape(exported)
    assert json.loads((quantized.path / "manifest.json").read_text())["files"] == quantized.manifest.files


def test_a_manifest_that_breaks_the_schema_leaves_no_bundle(tmp_path, llama_bundle):
    out = tmp_path / "b"
    with pytest.raises(BundleError, match="manifest.schema.json"):
        with BundleWriter.create(out) as writer:
            writer.add_entry("model", load_bundle(llama_bundle).manifest.files["model"])
            (writer.folder / "model.onnx").write_bytes((llama_bundle / "model.onnx").read_bytes())
            writer.manifest = Manifest(TINY_LLAMA, precision={"weights": "float32", "kv_cache_dtype": "int3"})
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_the_writer_owns_the_file_table_and_finishes_once(tmp_path, llama_bundle):
    source = load_bundle(llama_bundle)
    writer = BundleWriter(tmp_path)
    with pytest.raises(BundleError, match="no manifest"):
        writer.bundle()
    writer.manifest = dataclasses.replace(source.manifest)
    with pytest.raises(BundleError, match="owns the file table"):
        writer.finish()
    writer.manifest = dataclasses.replace(source.manifest, files={})
    for role, entry in source.manifest.files.items():
        (tmp_path / entry["path"]).write_bytes((llama_bundle / entry["path"]).read_bytes())
        writer.add_entry(role, entry)
    with pytest.raises(BundleError, match="escapes the bundle"):
        writer.add("source:x", "../x", "outside")
    with pytest.raises(TypeError):
        writer.files["model"] = {"path": "other.onnx"}  # type: ignore[index]
    assert writer.bundle().manifest.files == source.manifest.files
    assert not (tmp_path / "manifest.json").exists()  # a view, not a write
    writer.finish()
    assert writer.manifest_writes == 1 and load_bundle(tmp_path).manifest.to_dict() == source.manifest.to_dict()
    with pytest.raises(BundleError, match="written once"):
        writer.finish()
