"""Export wall time and peak RSS of `gptedge export`, side by side with `optimum-cli export onnx`.

    python benchmarks/export_speed.py smollm2          # SmolLM2-135M-Instruct (needs ../shared, accelerate)
    python benchmarks/export_speed.py tinyllama        # random-weight 1.1 B Llama (TinyLlama's config)
    python benchmarks/export_speed.py gpt2-124m        # random-weight GPT-2 124M
    ... [--no-optimum] [--workdir DIR]

Each source becomes an HF folder (transformers, the dev extra): SmolLM2 through transformers' own
GGUF loading of ../shared/data/smollm2-135m-instruct, the others from their config with random
weights; the random 1.1 B Llama gets GPT-2's byte-level BPE cut to its 32,000 ids (from
../shared/data/gpt2-tokenizer, when there) so its bundle can be calibrated and evaluated on text
(issue 16's 1.1 B int4 run: benchmarks/quantize_memory.py). Both exporters then run in child
processes one after the other on the same folder, with their defaults (gptedge: parity check and
model_ort.onnx included; Optimum: its own validation), and the table reports wall seconds, peak RSS
and RSS as a multiple of the fp32 weight bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

SMOLLM2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "smollm2-135m-instruct"
GPT2_TOKENIZER = SMOLLM2.parent / "gpt2-tokenizer" / "tokenizer.json"
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def make_hf_folder(name: str, folder: Path) -> int:
    """Write the HF folder for ``name``; return its fp32 weight bytes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig

    torch.manual_seed(0)
    if name == "smollm2":
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not (SMOLLM2 / gguf).is_file():
            sys.exit(f"{SMOLLM2 / gguf} not found: this source needs ../shared/data beside the checkout")
        AutoTokenizer.from_pretrained(SMOLLM2, gguf_file=gguf).save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(SMOLLM2, gguf_file=gguf, torch_dtype=torch.float32)
    elif name == "tinyllama":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**TINYLLAMA))
        model = model.to_empty(device="cpu")
        for param in model.parameters():
            torch.nn.init.normal_(param, std=0.02)
        if GPT2_TOKENIZER.is_file():
            cut_tokenizer(GPT2_TOKENIZER, TINYLLAMA["vocab_size"], folder / "tokenizer.json")
    else:
        model = GPT2LMHeadModel(GPT2Config())
    model.save_pretrained(folder)
    return sum(p.numel() * 4 for p in model.parameters())


def cut_tokenizer(source: Path, vocab_size: int, out: Path) -> None:
    """A byte-level BPE keeping ``source``'s first ``vocab_size`` ids and the merges that make them
    (GPT-2 numbers tokens in merge order, so every id stays below ``vocab_size``); no special tokens."""
    import json

    spec = json.loads(source.read_text())
    vocab = {token: i for token, i in spec["model"]["vocab"].items() if i < vocab_size}
    merges = [m for m in spec["model"]["merges"]
              if "".join(m.split(" ") if isinstance(m, str) else m) in vocab]
    spec["model"].update(vocab=vocab, merges=merges)
    spec["added_tokens"] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(spec))


def run_child(command: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit status) of ``command`` and its descendants."""
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss * 1024, child.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=("smollm2", "tinyllama", "gpt2-124m"))
    parser.add_argument("--no-optimum", action="store_true", help="time gptedge only")
    parser.add_argument("--workdir", type=Path, help="where the folders go (default: a temporary folder)")
    parser.add_argument("--make-folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_folder:  # the child that builds the folder; prints the fp32 weight bytes
        print(make_hf_folder(args.source, args.make_folder))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gptedge-export-speed-"))
    folder = work / f"{args.source}-hf"
    # Built in a child: a forked child's peak RSS starts at its parent's, so this process stays small.
    made = subprocess.run([sys.executable, __file__, args.source, "--make-folder", str(folder)],
                          check=True, capture_output=True, text=True)
    weight_bytes = int(made.stdout.split()[-1])
    no_tokenizer = [] if (folder / "tokenizer.json").is_file() else ["--no-tokenizer"]
    runs = {"gptedge export": [sys.executable, "-m", "gptedge.runtime.cli", "export", str(folder),
                               "-o", str(work / "gptedge"), "--overwrite", *no_tokenizer]}
    if not args.no_optimum:
        runs["optimum-cli export onnx"] = ["optimum-cli", "export", "onnx", "-m", str(folder), "--task",
                                           "text-generation-with-past", str(work / "optimum")]
    table = Table(title=f"export of {args.source} ({weight_bytes / 1e6:,.0f} MB fp32 weights)")
    for column in ("exporter", "wall s", "peak RSS MB", "RSS / weights", "exit"):
        table.add_column(column, justify="left" if column == "exporter" else "right")
    for label, command in runs.items():
        seconds, peak, status = run_child(command)
        table.add_row(label, f"{seconds:.1f}", f"{peak / 1e6:,.0f}", f"{peak / weight_bytes:.2f}", str(status))
    Console().print(table)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
