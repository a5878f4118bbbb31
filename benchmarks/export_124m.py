"""Export a 124M GPT-2-config model (random weights) and report wall time and peak RSS.

    python benchmarks/export_124m.py [--validate] [--no-ort-variant]

Builds an HF folder with transformers (dev extra), then runs `gptedge export` in a child process,
so the figures are those of the real CLI path: load safetensors, trace both graphs, write the bundle.
Targets (issue 2): <= 60 s and peak RSS <= 3x the model's fp32 bytes.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_hf_folder(folder: Path) -> int:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    model.save_pretrained(folder)
    return sum(p.numel() * 4 for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validate", action="store_true", help="also run the parity check (needs transformers)")
    parser.add_argument("--no-ort-variant", action="store_true", help="skip model_ort.onnx (and its check)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "gpt2-124m"
        model_bytes = make_hf_folder(source)
        command = [sys.executable, "-m", "gptedge.runtime.cli", "export", str(source), "-o", str(Path(tmp) / "bundle"),
                   "--no-tokenizer"] + ([] if args.validate else ["--no-validate"]) + \
            (["--no-ort-variant"] if args.no_ort_variant else [])
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"model fp32 bytes: {model_bytes / 1e6:.0f} MB")
    print(f"export wall time: {seconds:.1f} s (target <= 60 s)")
    print(f"peak RSS: {peak / 1e6:.0f} MB = {peak / model_bytes:.2f}x the model's bytes (target <= 3x)")


if __name__ == "__main__":
    main()
