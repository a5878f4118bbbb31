"""The one layering line, read from every import (lazy ones inside functions included):
``runtime`` <- ``quantize`` <- ``exporter`` <- CLI. A package imports only what stands to its left;
the CLI (``gptedge.runtime.cli``, the rightmost layer, shipped inside the runtime's folder so that
`gptedge` is one console script) may import every package. ``quantize`` and the runtime never import
torch; the runtime never imports tensorrt at module level outside its TensorRT folder."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"runtime": 0, "quantize": 1, "exporter": 2}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "gptedge" or len(parts) < 2:
        return None
    if parts[1:3] == ["runtime", "cli"]:
        return len(LAYERS)  # the CLI: rightmost
    return LAYERS.get(parts[1])


def test_each_package_imports_only_what_stands_to_its_left():
    offenders = []
    for folder, own in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            layer = len(LAYERS) if rel.parts[:2] == ("runtime", "cli") else own
            for line, module in _imports(path):
                target = _layer_of(module)
                if target is not None and target > layer:
                    offenders.append(f"{rel}:{line} imports {module}")
    assert not offenders, offenders


def test_quantize_and_runtime_never_import_torch():
    offenders = []
    for folder in ("quantize", "runtime"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("runtime", "cli"):
                continue  # the CLI mounts export lazily; importing gptedge.runtime is checked below
            offenders += [f"{rel}:{line}" for line, module in _imports(path) if module.split(".")[0] == "torch"]
    assert not offenders, offenders


def test_importing_the_runtime_loads_no_torch_tensorrt_or_server(tmp_path):
    import subprocess
    import sys

    code = ("import sys, gptedge.runtime; "
            "print(' '.join(m for m in ('torch', 'tensorrt', 'uvicorn', 'starlette', 'fastapi', 'prometheus_client', "
            "'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
