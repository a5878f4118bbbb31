"""Runtime memory: peak RSS minus the RSS right after ``import gptedge.runtime``, per fp32 weight byte.

    python benchmarks/memory.py [BUNDLE ...]      # default: export GPT-2 124M and Llama 125M configs

Each bundle is measured in a fresh child process: import the runtime, read VmRSS, load the bundle,
generate 32 + 32 tokens (greedy, batch 1), read the peak (VmHWM). Target (issue 5): <= 1.2x the
fp32 weight bytes (the bundle's model.onnx.data for an fp32 bundle).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import gptedge.runtime
after_import = vm("VmRSS:")
generator = gptedge.runtime.load(sys.argv[1], backend="ort-cpu", threads=2)
generator.generate(list(range(1, 33)), max_new_tokens=32, ignore_eos=True)
print(json.dumps({"after_import": after_import, "peak": vm("VmHWM:")}))
"""


def measure(bundle: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(bundle)], capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    weights = (bundle / "model.onnx.data").stat().st_size
    figures.update(weights=weights, ratio=(figures["peak"] - figures["after_import"]) / weights)
    return figures


def default_bundles(root: Path) -> list[Path]:
    from gptedge.exporter import ExportConfig, export_loaded
    from gptedge.exporter.checkpoints.synthetic import random_checkpoint
    from gptedge.runtime.bundle import Architecture

    configs = {
        "gpt2-124m": Architecture(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                                  head_dim=64, intermediate_size=3072, max_context=1024, activation="gelu_tanh"),
        "llama-125m": Architecture(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                                   head_dim=64, intermediate_size=2048, max_context=1024, norm="rmsnorm",
                                   norm_bias=False, position="rope", activation="swiglu", qkv_bias=False,
                                   attn_out_bias=False, mlp_bias=False, tie_word_embeddings=False),
    }
    paths = []
    for name, arch in configs.items():
        export_loaded(random_checkpoint(arch), ExportConfig(validate=False), root / name)
        paths.append(root / name)
    return paths


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bundles = [Path(p) for p in sys.argv[1:]] or default_bundles(Path(tmp))
        print("| bundle | weights MB | RSS after import MB | peak RSS MB | (peak - import) / weights |")
        print("|---|---:|---:|---:|---:|")
        for bundle in bundles:
            f = measure(bundle)
            print(f"| {bundle.name} | {f['weights'] / 1e6:.0f} | {f['after_import'] / 1e6:.0f} | "
                  f"{f['peak'] / 1e6:.0f} | {f['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
