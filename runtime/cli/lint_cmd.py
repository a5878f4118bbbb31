"""`gptedge lint BUNDLE --trt 10.3|10.x|11`: would TensorRT parse every node of the bundle?"""

from __future__ import annotations

import argparse
from pathlib import Path

from gptedge.runtime.trt.support import SUPPORT

MAX_ROWS = 60


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "lint", help="check a bundle's graphs against TensorRT's ONNX operator support",
        epilog="exit status: 0 when TensorRT would parse every node (warnings allowed), 10 when any node "
               "would fail, 4 when the bundle cannot be read")
    p.add_argument("bundle", type=Path, help="bundle folder")
    p.add_argument("--trt", default="10.3", choices=sorted(SUPPORT),
                   help="TensorRT version to check against (10.3 = JetPack 6.1/6.2; default 10.3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from gptedge.runtime.errors import EngineError
    from gptedge.runtime.trt.lint import lint_bundle

    report = lint_bundle(args.bundle, args.trt)
    console = Console()
    if report.findings:
        # Three columns, node names whole (they say which layer: /layers.3/attn/...), so that the
        # table stays readable in an 80-column terminal.
        table = Table(title=f"{report.trt.label}: what would fail or needs care", show_lines=True)
        table.add_column("node (graph)", overflow="fold", ratio=2)
        table.add_column("op", overflow="fold", ratio=1)
        table.add_column("severity: why / fix", overflow="fold", ratio=3)
        ordered = sorted(report.findings, key=lambda f: f.severity != "error")
        for f in ordered[:MAX_ROWS]:
            style = "red" if f.severity == "error" else "yellow"
            table.add_row(f"{f.node}\n({f.graph})", f.op,
                          f"[{style}]{f.severity}[/{style}] {f.rule}: {f.message}")
        console.print(table)
        if len(ordered) > MAX_ROWS:
            console.print(f"... and {len(ordered) - MAX_ROWS} more")
    summary = (f"{report.nodes_checked} nodes in {', '.join(report.graphs)}: {len(report.errors)} error(s), "
               f"{len(report.warnings)} warning(s) for {report.trt.label}")
    if not report.ok:
        raise EngineError(f"{args.bundle}: {summary}; TensorRT would not parse this bundle")
    console.print(f"[green]ok[/green] {summary}")
    return 0
