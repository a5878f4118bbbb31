"""Print the README's pruning-recovery table from the bundles prune_finetune.sh wrote.

Adds the control row a recovery number needs: the *dense* model fine-tuned with the very same
steps/text/lr (the source model is not fully converged, so some of any gain is just more training).
Perplexity: first 20,000 tokens of val.txt; decode tok/s: best of 5 greedy runs of 96 tokens."""
import sys
from pathlib import Path

from gptedge.exporter import ExportConfig, export_loaded
from gptedge.exporter.checkpoints.detect import load_checkpoint
from gptedge.exporter.pipeline import build_decoder
from gptedge.exporter.training.finetune import _finetune, _run_config, _token_data
from gptedge.quantize.api import bundle_size_mb
from gptedge.quantize.evaluate import greedy_tokens, perplexity
from gptedge.quantize.text import encode, read_text
from gptedge.runtime.bundle import load_bundle

root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gptedge-quant")
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200


def dense_finetuned(out: Path) -> None:
    config = ExportConfig(overwrite=True)
    checkpoint = load_checkpoint(root / "ckpt", config)
    decoder = build_decoder(checkpoint.arch, checkpoint.state_dict, "ckpt")
    ft = ExportConfig(prune_method="magnitude", finetune_steps=steps, finetune_text=root / "train.txt")
    data = _token_data(ft.finetune_text, checkpoint.tokenizer, checkpoint.arch.max_context)
    _finetune(decoder, {}, data["train"], _run_config(ft, checkpoint.arch.max_context))
    checkpoint.state_dict = {k: v.detach() for k, v in decoder.state_dict().items()}
    export_loaded(checkpoint, config, out)


def row(label: str, folder: str) -> None:
    path = root / folder
    bundle = load_bundle(path)
    ppl = perplexity(path, root / "val.txt", 20_000).ppl
    prompt = encode(bundle, read_text(root / "val.txt", "val")[:200], "val")[:16]
    speed = max(greedy_tokens(bundle, prompt, 96)[1] for _ in range(5))
    record = next((h for h in bundle.manifest.history if h.get("step") == "prune"), {})
    held = record.get("heldout_perplexity", {})
    scores = f"{held['one_shot']:.3f} → {held['finetuned']:.3f}" if "finetuned" in held else ""
    seconds = f"{record['finetune']['seconds']:.0f}" if "finetune" in record else ""
    print(f"| {label} | {bundle.manifest.architecture.intermediate_size} | {bundle_size_mb(bundle):.2f} | "
          f"{ppl:.4f} | {scores} | {seconds} | {speed:.0f} |")


dense_finetuned(root / "fp32ft")
print("| bundle | MLP width | size MB | val perplexity | train-text held-out ppl one-shot → tuned | fine-tune s | decode tok/s |")
print("|---|---:|---:|---:|---:|---:|---:|")
for label, folder in [("fp32 (dense source)", "fp32"), (f"fp32 + {steps} fine-tune steps (control)", "fp32ft"),
                      ("2:4 one-shot", "x24"), (f"2:4 + {steps} steps", "x24ft"),
                      ("structured 25 % one-shot", "xst25"), (f"structured 25 % + {steps} steps", "xst25ft"),
                      ("structured 50 % one-shot", "xst50"), (f"structured 50 % + {steps} steps", "xst50ft"),
                      ("structured 25 % MLP + 50 % heads one-shot", "xsth"),
                      (f"structured 25 % MLP + 50 % heads + {steps} steps", "xsthft")]:
    row(label, folder)
