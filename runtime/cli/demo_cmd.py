"""`gptedge demo`: the main job end to end on this machine (needs gptedge[export]).

Trains a tiny GPT (or reuses a matching checkpoint), exports it with a parity check, quantizes it
to fp16 / int8 / int4, scores every precision on held-out text, streams a sample from each and
ends with one table. The pipeline is :func:`gptedge.exporter.demo.run_demo`; this module is its UI.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train a tiny GPT, export, quantize, evaluate and run it (CPU)")
    p.add_argument("--text", type=Path, help="UTF-8 text file to train on (default: Python's stdlib source)")
    p.add_argument("--workdir", type=Path, default=Path("gptedge-demo"),
                   help="folder for the checkpoint, bundles and results (default: ./gptedge-demo)")
    p.add_argument("--steps", type=int, help="training steps (default: 600 for --size small)")
    p.add_argument("--size", choices=("small", "tiny"), default="small",
                   help="model size: small (~0.8 M params, ~2 min) or tiny (seconds; smoke tests)")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain even if --workdir has a matching checkpoint (or replace a different one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gptedge.exporter.demo import DemoConfig, run_demo

    console = Console(highlight=False)
    config = DemoConfig(workdir=args.workdir, text=args.text, steps=args.steps, size=args.size,
                        overwrite=args.overwrite)
    console.print(f"[bold]gptedge demo[/bold]: train → export → quantize → evaluate → generate, "
                  f"in {config.workdir.absolute()}")
    reporter = _rich_reporter(console)
    result = run_demo(config, reporter)
    console.print()
    console.print(results_table(result))
    console.print(f"untrained (random init) perplexity {result.untrained_ppl:.1f} "
                  f"(vocabulary {result.vocab_size} chars); trained: {result.rows[0].ppl:.2f} "
                  f"on {result.eval_tokens} held-out chars. Total {result.seconds:.0f} s.")
    console.print(f"bundles in {result.workdir / 'bundles'}; try: gptedge generate "
                  f"{result.workdir / 'bundles' / 'int8'} {shlex.quote(result.prompt.splitlines()[0])} --max-new-tokens 80")
    return 0


def _rich_reporter(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

    from gptedge.exporter.demo import Reporter

    class RichReporter(Reporter):
        def __init__(self) -> None:
            self.started: dict[str, float] = {}
            self.progress: Progress | None = None
            self.task = TaskID(0)  # the progress bar's task, set when the bar starts
            self.last_val: float | None = None

        def stage(self, name: str, detail: str = "") -> None:
            self.started[name] = time.perf_counter()
            if name != "train":
                console.print(f"[cyan]…[/cyan] {name} {detail}")

        def stage_done(self, name: str, detail: str = "") -> None:
            if self.progress is not None and name == "train":
                self.progress.stop()
                self.progress = None
            took = time.perf_counter() - self.started.get(name, time.perf_counter())
            console.print(f"[green]✓[/green] {name} {detail} [dim]({took:.1f} s)[/dim]")

        def training(self, event) -> None:
            if self.progress is None:
                self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[losses]}"), TimeRemainingColumn(),
                                         console=console)
                self.progress.start()
                self.task = self.progress.add_task("train", total=event.steps, losses="")
            if event.val_loss is not None:
                console.print(f"  step {event.step:>4}: val loss {event.val_loss:.3f}")
                self.last_val = event.val_loss
            losses = f"loss {event.loss:.3f}" if event.loss is not None else ""
            if self.last_val is not None:
                losses += f"  val {self.last_val:.3f}"
            self.progress.update(self.task, completed=event.step, losses=losses)

        def sample(self, precision: str, prompt: str, pieces) -> str:
            console.rule(f"{precision} sample")
            console.print(prompt, style="dim", end="", markup=False)
            out = []
            for piece in pieces:
                out.append(piece)
                console.print(piece, end="", markup=False)
            console.print()
            return "".join(out)

    return RichReporter()


def results_table(result):
    """The demo's final rich table: one row per precision."""
    from rich.table import Table

    table = Table(title=f"tiny GPT on {result.backend} — perplexity on {result.eval_tokens} held-out chars "
                        f"(untrained: {result.untrained_ppl:.1f})",
                  caption="decode tok/s: median of 3 runs; at 0.8 M parameters a step is mostly fixed "
                          "overhead, so precisions differ here by noise, not by speed (see benchmarks/)")
    for column in ("precision", "size MB", "perplexity", "Δ ppl %", "TTFT ms", "decode tok/s", "note"):
        table.add_column(column, justify="left" if column in ("precision", "note") else "right")

    def fmt(value, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    for row in result.rows:
        table.add_row(row.precision, fmt(row.size_mb, ".2f"), fmt(row.ppl, ".3f"), fmt(row.delta_pct, "+.2f"),
                      fmt(row.ttft_ms, ".2f"), fmt(row.decode_tok_s, ",.0f"), row.note[:60])
    return table
