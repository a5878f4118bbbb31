"""`gptedge plan BUNDLE --target ...`: weights + KV cache + activations vs the device's memory."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptedge.runtime.trt.plan import DEFAULT_WORKSPACE_MB, TARGETS


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="memory plan of a bundle on a Jetson or desktop GPU")
    p.add_argument("bundle", type=Path, help="bundle folder")
    p.add_argument("--target", default="jetson-orin-nano", choices=list(TARGETS), help="device (default jetson-orin-nano)")
    p.add_argument("--max-context", type=int, help="tokens (prompt + generated); default: the bundle's max_context")
    p.add_argument("--max-batch", type=int, default=1, help="rows generated at once (default 1)")
    p.add_argument("--memory-gb", type=float, help="device memory in GB (Orin NX 8/16, AGX 32/64; desktop VRAM, default 8)")
    p.add_argument("--workspace", type=int, default=DEFAULT_WORKSPACE_MB, help="TensorRT workspace in MB")
    p.set_defaults(func=run)


def _size(n: float) -> str:
    """Compact binary size: 96.8K, 512M, 4.25G."""
    for unit in ("", "K", "M"):
        if n < 1000:
            return f"{n:.3g}{unit}"
        n /= 1024
    return f"{n:.3g}G"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from gptedge.runtime.errors import EngineError
    from gptedge.runtime.trt.plan import describe_misfit, plan_memory

    plan = plan_memory(args.bundle, args.target, args.max_context, args.max_batch, args.workspace, args.memory_gb)
    table = Table(title=f"{plan.target.label}: {_size(plan.usable)} usable; batch {plan.batch}, context "
                        f"{plan.context}, KV {plan.kv_dtype} x2 buffers", caption="sizes in bytes, K/M/G = KiB/MiB/GiB; * this bundle; act = activations, work = "
                        "TensorRT workspace; max ctx = longest context that fits (<= bundle max)")
    for column in ("prec", "weights", "KV", "act", "work", "total", "fits", "max ctx"):
        table.add_column(column, justify="right")
    for r in plan.rows:
        fits = r.total <= plan.usable
        name = f"{r.precision}*" if r.precision == plan.as_built else r.precision
        table.add_row(name, _size(r.weights), _size(r.kv), _size(r.activations), _size(r.workspace), _size(r.total),
                      "[green]yes[/green]" if fits else "[red]no[/red]", str(r.largest_context))
    console = Console()
    console.print(table)
    if not plan.fits():
        raise EngineError(f"{args.bundle}: {describe_misfit(plan)}")
    return 0
