"""`gptedge export SOURCE -o BUNDLE`: checkpoint → bundle (needs gptedge[export])."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export an HF folder, nanoGPT ckpt.pt, llama2.c .bin or GGUF file to a bundle")
    p.add_argument("source", type=Path, help="HF folder, nanoGPT ckpt.pt (or its folder), llama2.c .bin or .gguf file")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--tokenizer", type=Path, help="tokenizer file/folder (meta.pkl, tokenizer.json, tokenizer.bin, ...)")
    p.add_argument("--no-tokenizer", action="store_true", help="export even when no tokenizer is found (the bundle then generates from token ids only)")
    p.add_argument("--max-context", type=int, help="tokens the bundle supports (default: the model's)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18..20 (default 18)")
    p.add_argument("--no-validate", action="store_true", help="skip the parity check")
    p.add_argument("--no-ort-variant", action="store_true",
                   help="do not write model_ort.onnx (the onnxruntime-only graph with fused attention)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    g = p.add_argument_group("pruning and recovery fine-tune")
    g.add_argument("--prune", choices=("magnitude", "2:4", "structured"), help="prune the blocks' linear layers before export (structured: whole MLP neurons)")
    g.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned (default 0.5; 2:4 is always 0.5)")
    g.add_argument("--prune-heads", type=float, default=0.0, help="with --prune structured: also remove this fraction of every layer's attention heads")
    g.add_argument("--finetune-steps", type=int, default=0, help="recovery fine-tune steps after pruning, masks held fixed (default 0)")
    g.add_argument("--finetune-text", type=Path, help="UTF-8 text to fine-tune on (the last 10 %% scores one-shot vs recovered)")
    g.add_argument("--finetune-lr", type=float, default=5e-4, help="peak AdamW learning rate of the fine-tune (default 5e-4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gptedge.exporter.config import ExportConfig
    from gptedge.exporter.preflight import preflight
    from gptedge.exporter.stages import stage_listener
    from gptedge.runtime.cli.report import parity_table

    config = ExportConfig(max_context=args.max_context, opset=args.opset, tokenizer=args.tokenizer,
                          allow_missing_tokenizer=args.no_tokenizer, validate=not args.no_validate,
                          ort_variant=not args.no_ort_variant, overwrite=args.overwrite,
                          prune_method=args.prune, sparsity=args.sparsity,
                          finetune_steps=args.finetune_steps, finetune_text=args.finetune_text,
                          finetune_lr=args.finetune_lr, prune_heads=args.prune_heads)
    preflight(args.source, config, args.output)  # what needs no torch is refused before importing it
    from gptedge.exporter import export

    console = Console(stderr=True)
    with stage_progress(console) as listener, stage_listener(listener):
        bundle = export(args.source, config, args.output)
    console = Console()
    if bundle.manifest.parity:
        console.print(parity_table(bundle.manifest.parity))
    pruned = next((h for h in bundle.manifest.history if h.get("step") == "prune"), None)
    if pruned and pruned.get("heldout_perplexity"):
        scores = ", ".join(f"{k} {v:.4f}" for k, v in pruned["heldout_perplexity"].items())
        console.print(f"held-out perplexity ({pruned['heldout_tokens']} tokens): {scores}")
    console.print(f"[green]wrote[/green] {bundle.path}")
    return 0


class _RichStages:
    """Draws each export stage as a progress row: spinner while it runs, then its elapsed time."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.tasks: dict[str, object] = {}

    def started(self, name: str) -> None:
        self.tasks[name] = self.progress.add_task(name, total=1)

    def finished(self, name: str, seconds: float) -> None:
        self.progress.update(self.tasks[name], completed=1, description=f"{name} [dim]{seconds:.1f} s[/dim]")


@contextmanager
def stage_progress(console) -> Iterator[_RichStages]:
    """A live rich progress list for the export stages (see ``gptedge.exporter.stages``)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(finished_text="[green]✓[/green]"), TextColumn("{task.description}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        yield _RichStages(progress)
