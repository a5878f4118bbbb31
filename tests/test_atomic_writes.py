"""Writers leave either a complete bundle or nothing: temp sibling folder, rename at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptedge.runtime.bundle import atomic_output_dir, load_bundle
from gptedge.runtime.errors import OutputExistsError


def _debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with atomic_output_dir(out):
            pass


def test_output_under_a_regular_file_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputExistsError, match="cannot create"):
        with atomic_output_dir(blocker / "bundle"):
            pass


def test_exception_leaves_no_debris_and_keeps_old_bundle(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert (out / "old.txt").read_text() == "old"
    assert _debris(tmp_path) == []


def test_overwrite_replaces_completely(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _debris(tmp_path) == []


EXPORT_SCRIPT = """
import sys
from gptedge.runtime.bundle import Architecture
from gptedge.exporter import ExportConfig, export_loaded
from gptedge.exporter.checkpoints.synthetic import random_checkpoint
arch = Architecture(vocab_size=512, hidden_size=128, num_layers=6, num_heads=4, num_kv_heads=4, head_dim=32,
                    intermediate_size=512, max_context=128)
checkpoint = random_checkpoint(arch)
print("ready", flush=True)
export_loaded(checkpoint, ExportConfig(), sys.argv[1])
"""


def test_sigint_during_export_leaves_nothing(tmp_path):
    out = tmp_path / "bundle"
    proc = subprocess.Popen([sys.executable, "-c", EXPORT_SCRIPT, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while not _debris(tmp_path) and time.time() < deadline:  # wait until the temp folder exists
        time.sleep(0.05)
    assert _debris(tmp_path), "export never started writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not out.exists()
    assert _debris(tmp_path) == []


def test_export_over_existing_bundle_with_overwrite(bundle_factory, tmp_path):
    from conftest import TINY_GPT2

    from gptedge.exporter import ExportConfig, export_loaded
    from gptedge.exporter.checkpoints.synthetic import random_checkpoint

    out = tmp_path / "b"
    export_loaded(random_checkpoint(TINY_GPT2, seed=1), ExportConfig(validate=False), out)
    first = os.stat(out / "model.onnx.data").st_mtime_ns
    with pytest.raises(OutputExistsError):
        export_loaded(random_checkpoint(TINY_GPT2, seed=2), ExportConfig(validate=False), out)
    export_loaded(random_checkpoint(TINY_GPT2, seed=2), ExportConfig(validate=False, overwrite=True), out)
    assert load_bundle(out).manifest.source["seed"] == 2
    assert os.stat(out / "model.onnx.data").st_mtime_ns != first
    assert _debris(tmp_path) == []
