"""`gptedge build BUNDLE`: build (or reuse) a TensorRT engine in BUNDLE/engines/ on this device."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptedge.runtime.trt.plan import DEFAULT_WORKSPACE_MB, TARGETS


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="build a TensorRT engine for this GPU (run it on the Jetson itself)")
    p.add_argument("bundle", type=Path, help="bundle folder")
    p.add_argument("--target", choices=list(TARGETS),
                   help="check memory against this device class (default: this GPU's free memory)")
    p.add_argument("--max-batch", type=int, default=1, help="largest batch the engine accepts (default 1)")
    p.add_argument("--max-context", type=int, help="largest context in tokens (default: the bundle's max_context)")
    p.add_argument("--timing-cache", type=Path, help="timing cache file reused across builds "
                   "(default BUNDLE/engines/timing-<trt>-sm<cc>.cache)")
    p.add_argument("--workspace", type=int, default=DEFAULT_WORKSPACE_MB, help="builder workspace in MB")
    p.add_argument("--graph", default="auto", choices=("auto", "model_last", "model"),
                   help="graph to build: model_last for generation (auto), model for full logits (scoring)")
    p.add_argument("--memory-gb", type=float, help="device memory for --target (Orin NX 8/16, AGX 32/64)")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical engine exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gptedge.runtime.trt.build import BuildConfig, build_engine

    config = BuildConfig(target=args.target, max_batch=args.max_batch, max_context=args.max_context,
                         workspace_mb=args.workspace, timing_cache=args.timing_cache, graph=args.graph,
                         memory_gb=args.memory_gb, force=args.force)
    console = Console()
    with console.status(f"building a TensorRT engine for {args.bundle} (minutes on a Jetson) ..."):
        result = build_engine(args.bundle, config)
    verb = "reused" if result.reused else f"built in {result.seconds:.0f} s"
    console.print(f"[green]{verb}[/green] {result.path} (TensorRT {result.key.trt_version}, "
                  f"{result.key.gpu_name}, sm {result.key.compute_capability})")
    return 0
