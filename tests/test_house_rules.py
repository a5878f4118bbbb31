"""House rules that a test can enforce: small files, small functions, no print in library code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exporter", "runtime", "quantize")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_files_stay_small():
    too_long = [f"{p.relative_to(ROOT)}: {n} lines" for p in _python_files(*PACKAGES, "tests", "examples", "benchmarks")
                if (n := len(p.read_text().splitlines())) >= MAX_FILE_LINES]
    assert not too_long, too_long


def test_library_functions_stay_small():
    too_long = []
    for path in _python_files(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, too_long


def test_no_print_outside_the_cli():
    offenders = []
    for path in _python_files(*PACKAGES):
        if "cli" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"use logging, not print: {offenders}"
