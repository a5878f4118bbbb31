"""Peak memory of ``gptedge quantize`` per mode, as a multiple of the fp32 weight bytes.

    python benchmarks/quantize_memory.py BUNDLE --calib FILE --eval FILE [--modes int8-dynamic,int4,int8,fp16]

Each mode runs in a fresh child process (quality gate on, on ``--eval`` capped at 2,048 tokens);
the child reports its peak RSS (VmHWM) minus its RSS after the imports. Target (issue 16 item 6):
<= 3x the fp32 bundle's ``model.onnx.data``.
"""

from __future__ import annotations

import argparse
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
from gptedge.quantize import Fp16Config, Int4Config, Int8Config, Int8DynamicConfig, quantize
configs = {"fp16": Fp16Config(), "int8-dynamic": Int8DynamicConfig(), "int8": Int8Config(smoothquant_alpha=0.5),
           "int4": Int4Config(), "int4-qdq": Int4Config(format="qdq")}
bundle, mode, out, calib, evaluation = sys.argv[1:6]
after_import = vm("VmRSS:")
quantize(bundle, configs[mode], out, calib_text=calib if mode == "int8" else None, eval_text=evaluation,
         max_ppl_increase=1000.0, max_tokens=2048)
print(json.dumps({"after_import": after_import, "peak": vm("VmHWM:")}))
"""


def measure(bundle: Path, mode: str, calib: Path, evaluation: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), mode, str(Path(tmp) / mode), str(calib),
                              str(evaluation)], capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    weights = (bundle / "model.onnx.data").stat().st_size
    figures.update(weights=weights, ratio=(figures["peak"] - figures["after_import"]) / weights)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--modes", default="int8-dynamic,int4,int8,fp16")
    args = parser.parse_args()
    print("| mode | fp32 weights MB | peak RSS - imports MB | / fp32 weights |")
    print("|---|---:|---:|---:|")
    for mode in args.modes.split(","):
        f = measure(args.bundle, mode, args.calib, args.eval)
        print(f"| {mode} | {f['weights'] / 1e6:.0f} | {(f['peak'] - f['after_import']) / 1e6:.0f} | {f['ratio']:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
