"""`gptedge inspect BUNDLE`: manifest summary, graph I/O, op histogram and file sizes."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show what a bundle holds (manifest, I/O, ops, sizes)")
    p.add_argument("bundle", help="bundle folder made by `gptedge export`")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def describe(bundle_dir: str | Path) -> dict[str, Any]:
    """Everything `inspect` shows, as plain data. The graph is read without its external weights."""
    import onnx

    from gptedge.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    model = onnx.load(str(bundle.model_path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    params = sum(_count(t.dims) for t in model.graph.initializer)
    files = {role: {"path": entry["path"], "bytes": (bundle.path / entry["path"]).stat().st_size}
             for role, entry in manifest.files.items()}
    parity = manifest.parity or {}
    return {"path": str(bundle.path), "format_version": manifest.format_version,
            "architecture": manifest.architecture.to_dict(), "tokenizer": manifest.tokenizer.to_dict(),
            "precision": manifest.precision, "source": manifest.source,
            "parity": {k: parity.get(k) for k in ("passed", "max_abs", "worst_output", "top1_agreement",
                                                    "noise_ratio", "noise_floor")},
            "history": manifest.history, "io": manifest.io, "parameters": params,
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "ops": dict(ops.most_common()), "nodes": len(model.graph.node), "files": files}


def _count(dims) -> int:
    total = 1
    for d in dims:
        total *= d
    return total


def run(args: argparse.Namespace) -> int:
    info = describe(args.bundle)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    arch, tok = info["architecture"], info["tokenizer"]
    summary = Table(title=f"bundle {info['path']} (format {info['format_version']})", show_header=False)
    summary.add_row("model", f"{arch['num_layers']} layers, hidden {arch['hidden_size']}, heads "
                             f"{arch['num_heads']}/{arch['num_kv_heads']} kv, vocab {arch['vocab_size']}, "
                             f"context {arch['max_context']}, {info['parameters'] / 1e6:.2f} M parameters")
    summary.add_row("layers", f"{arch['norm']}, {arch['position']} positions, {arch['activation']}")
    summary.add_row("tokenizer", f"{tok['kind']} (bos {tok['bos_id']}, eos {tok['eos_ids']}, add_bos {tok['add_bos']})")
    summary.add_row("precision", ", ".join(f"{k}={v}" for k, v in info["precision"].items()))
    summary.add_row("source", ", ".join(f"{k}={v}" for k, v in info["source"].items() if k != "sha256"))
    summary.add_row("parity", ", ".join(f"{k}={v}" for k, v in info["parity"].items()))
    summary.add_row("history", " -> ".join(str(h.get("step")) for h in info["history"]))
    console.print(summary)
    io = Table(title="graph I/O (model.onnx)")
    for column in ("direction", "name", "dtype", "shape"):
        io.add_column(column)
    for direction in ("inputs", "outputs"):
        for entry in info["io"].get(direction, []):
            io.add_row(direction[:-1], entry["name"], entry["dtype"], str(entry["shape"]))
    console.print(io)
    ops = Table(title=f"ops in model.onnx ({info['nodes']} nodes, opset {info['opset']})")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in info["ops"].items():
        ops.add_row(op, str(count))
    console.print(ops)
    files = Table(title="files")
    for column in ("role", "path", "size"):
        files.add_column(column)
    for role, entry in info["files"].items():
        files.add_row(role, entry["path"], f"{entry['bytes'] / 2**20:.2f} MiB")
    console.print(files)
    return 0
