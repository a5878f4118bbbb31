"""`gptedge quantize BUNDLE -o OUT --mode ...`: fp16 / int8 / int4 / pruning with a quality gate."""

from __future__ import annotations

import argparse
from pathlib import Path

MODES = ("fp16", "int8-dynamic", "int8", "int4", "int4-qdq", "prune")
MIXED_MODES = ("int4", "int4-qdq", "int8")  # --max-ppl-increase plans mixed precision for these


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="quantize or prune a bundle (fp16, int8, int4, prune)")
    p.add_argument("bundle", type=Path, help="source bundle folder (float32)")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--calib", type=Path, help="calibration text (int8; int4 and int8-dynamic: the activation-aware "
                                              "weight search; wanda); its last 10 %% gates quality when --eval is not given")
    p.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    p.add_argument("--smoothquant", type=float, metavar="ALPHA", default=0.5,
                   help="SmoothQuant strength for int8 (default 0.5, as measured on SmolLM2; -1: off)")
    p.add_argument("--float-search-budget", type=float, metavar="PCT", default=0.0,
                   help="int8: perplexity increase (%%, on calibration windows) the int8 activations may cost; the "
                        "most sensitive linear inputs, measured, stay float until the rest fit (default 0; -1: off)")
    p.add_argument("--block-size", type=int, help="input channels per quantization block of int4 and "
                                                   "int8-dynamic (default: the mode's own, see README)")
    p.add_argument("--prune-method", choices=("magnitude", "wanda", "2:4", "structured"), default="magnitude")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned (default 0.5)")
    p.add_argument("--then", choices=("fp16", "int8-dynamic", "int8", "int4", "int4-qdq"),
                   help="precision applied after pruning")
    p.add_argument("--eval", type=Path, help="text file for the quality gate")
    p.add_argument("--max-ppl-increase", type=float, metavar="PCT",
                   help="allowed perplexity increase in %% (default, met on SmolLM2: fp16 0.1, int8-dynamic 0.5, "
                        "int8 1.5, int4 and int4-qdq 3; prune: required). With int4, int4-qdq and int8 it plans "
                        "mixed precision: the fewest, most sensitive layers (measured on --calib) stay int8 (int4) / "
                        "float (int8) until --eval fits the budget")
    p.add_argument("--max-tokens", type=int, help="evaluate on the first N tokens only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def precision_config(mode: str, args: argparse.Namespace):
    from gptedge.quantize import Fp16Config, Int4Config, Int8Config, Int8DynamicConfig

    if mode == "fp16":
        return Fp16Config()
    block = {} if args.block_size is None else {"block_size": args.block_size}
    if mode == "int8-dynamic":
        return Int8DynamicConfig(**block)
    if mode == "int8":
        budget = None if args.float_search_budget < 0 else args.float_search_budget
        alpha = None if args.smoothquant < 0 else args.smoothquant
        return Int8Config(calib_method=args.calib_method, smoothquant_alpha=alpha,
                          float_search_budget=budget)
    return Int4Config(format="qdq" if mode == "int4-qdq" else "matmulnbits", **block)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gptedge.quantize import MixedConfig, PruneConfig, quantize

    if args.mode == "prune":
        then = precision_config(args.then, args) if args.then else None
        config = PruneConfig(method=args.prune_method, sparsity=args.sparsity, then=then)
    else:
        config = precision_config(args.mode, args)
        if args.max_ppl_increase is not None and args.mode in MIXED_MODES:
            config = MixedConfig(base=config, max_ppl_increase=args.max_ppl_increase)
    console = Console()
    with console.status(f"{args.mode}: {args.bundle} -> {args.output} ..."):
        bundle = quantize(args.bundle, config, args.output, calib_text=args.calib, eval_text=args.eval,
                          max_ppl_increase=args.max_ppl_increase, max_tokens=args.max_tokens,
                          overwrite=args.overwrite)
    entry = bundle.manifest.history[-1]
    quality = entry.get("quality")
    if "mixed_plan" in entry:
        console.print(plan_table(entry["mixed_plan"], quality, args.mode))
    if quality:
        console.print(quality_table(quality, args.mode))
    else:
        from gptedge.quantize.config import ungated_note
        console.print(f"[yellow]{ungated_note(config)}[/yellow]")
    console.print(f"[green]wrote[/green] {bundle.path}")
    return 0


def quality_table(quality: dict, mode: str):
    from rich.table import Table

    budget = quality.get("budget_pct")
    title = f"{mode} vs source ({quality['tokens']} tokens" + (f", budget +{budget:g} %)" if budget is not None else ")")
    table = Table(title=title)
    for column in ("bundle", "size MB", "perplexity", "delta %", "decode tok/s"):
        table.add_column(column, justify="left" if column == "bundle" else "right")
    table.add_row("source", f"{quality['size_mb_source']:.2f}", f"{quality['ppl_source']:.4f}", "",
                  f"{quality['decode_tok_s_source']:.0f}")
    table.add_row(mode, f"{quality['size_mb']:.2f}", f"{quality['ppl']:.4f}", f"{quality['ppl_increase_pct']:+.3f}",
                  f"{quality['decode_tok_s']:.0f}")
    return table


def plan_table(plan: dict, quality: dict | None, mode: str):
    """The mixed-precision plan: each kept unit with its sensitivity, then the bundle's size and the
    increase measured by the plan and by the quality gate."""
    from rich.table import Table

    kept = plan["kept"]
    table = Table(title=f"{mode} mixed precision: {len(kept)} of {plan['units']} {plan['unit']}s kept as "
                        f"{plan['kept_as']} (budget +{plan['budget_pct']:g} %)")
    table.add_column("kept")
    table.add_column("alone at low precision: delta %", justify="right")
    for entry in kept:
        table.add_row(entry["name"], f"{entry['sensitivity_pct']:+.3f}")
    windows = "x".join(str(v) for v in plan["eval_windows"])
    table.add_row(f"plan, measured on {windows} eval tokens", f"{plan['measured_pct']:+.3f}", end_section=True)
    if quality:
        table.add_row(f"bundle: {quality['size_mb']:.2f} MB (source {quality['size_mb_source']:.2f}), gate",
                      f"{quality['ppl_increase_pct']:+.3f}")
    return table
