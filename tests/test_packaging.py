"""Packaging rules: every package folder is listed; importing the runtime stays lean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert found == listed


def test_importing_runtime_loads_no_torch_or_tensorrt():
    code = ("import sys, gptedge.runtime, gptedge.runtime.cli; "
            "print(','.join(m for m in ('torch', 'tensorrt', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_ruff_bans_bare_package_imports():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    banned = config["tool"]["ruff"]["lint"]["flake8-tidy-imports"]["banned-api"]
    assert {"runtime", "exporter", "quantize"} <= set(banned)


def test_the_readme_imports_resolve():
    # The README's Python import lines are public API: moving a module must keep them working.
    lines = [line.split("#")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith(("from gptedge", "import gptedge"))]
    assert any("gptedge.exporter.train " in line for line in lines)
    code = "\n".join(lines)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{code}\n{out.stderr}"
