"""What `gptedge export` refuses before torch is imported, and the exporter's torch-free imports.

Each case runs in a fresh interpreter: whether torch got imported is only visible in ``sys.modules``
of a process that had not imported it before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptedge.exporter.checkpoints.hf_config import SUPPORTED_MODEL_TYPES
from gptedge.runtime.errors import UnsupportedModelError

EXPECTED = ("model_type 'definitely_not_a_model' is not supported; gptedge exports "
            + ", ".join(SUPPORTED_MODEL_TYPES))


def python(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def unsupported_folder(root: Path) -> Path:
    folder = root / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "definitely_not_a_model"}))
    return folder


def test_preflight_refuses_an_unsupported_model_type_without_torch(tmp_path):
    folder = unsupported_folder(tmp_path)
    code = """
import sys
from gptedge.exporter.config import ExportConfig
from gptedge.exporter.preflight import preflight
from gptedge.exporter.checkpoints.hf_config import SUPPORTED_MODEL_TYPES
from gptedge.runtime.errors import UnsupportedModelError
try:
    preflight(sys.argv[1], ExportConfig(), sys.argv[2])
except UnsupportedModelError as exc:
    print(exc)
print('torch' in sys.modules)
"""
    out = python(code, str(folder), str(tmp_path / "b"))
    assert out.returncode == 0, out.stderr
    message, torch_loaded = out.stdout.strip().splitlines()
    assert message == f"{folder / 'config.json'}: {EXPECTED} (and nanoGPT / llama2.c checkpoints)"
    assert torch_loaded == "False"


def test_cli_export_exits_3_before_importing_torch(tmp_path):
    folder = unsupported_folder(tmp_path)
    code = """
import sys
from gptedge.runtime.cli import main
code = main(["export", sys.argv[1], "-o", sys.argv[2]])
print('torch' in sys.modules)
sys.exit(code)
"""
    out = python(code, str(folder), str(tmp_path / "b"))
    assert out.returncode == UnsupportedModelError.exit_code == 3
    assert out.stdout.strip() == "False"
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert EXPECTED in out.stderr
    assert not (tmp_path / "b").exists()


def test_export_refuses_it_with_the_same_error(tmp_path):
    from gptedge.exporter import ExportConfig, export

    folder = unsupported_folder(tmp_path)
    with pytest.raises(UnsupportedModelError, match=EXPECTED):
        export(folder, ExportConfig(), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_the_exporter_package_and_its_config_import_no_torch():
    code = """
import sys
import gptedge.exporter
from gptedge.exporter.config import ExportConfig
import gptedge.exporter.checkpoints.detect, gptedge.exporter.checkpoints.hf_config, gptedge.exporter.preflight
before = 'torch' in sys.modules
from gptedge.exporter import ExportConfig as Lazy, export, export_loaded
import gptedge.exporter.pipeline as pipeline
assert Lazy is ExportConfig and export is pipeline.export and export_loaded is pipeline.export_loaded
print(before, 'torch' in sys.modules)
"""
    out = python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]  # the public functions do bring torch in
