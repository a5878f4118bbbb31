"""Peak memory of ``gptedge quantize`` per mode and per stage, as a multiple of the fp32 weight bytes.

    python benchmarks/quantize_memory.py BUNDLE --calib FILE --eval FILE \
        [--modes fp16,int8-dynamic,int8,int4,int4-qdq,int8-nosq] [--max-tokens 2048] [--stages]

Each mode runs in a fresh child process with the CLI's defaults for that mode (quality gate on, on
``--eval`` capped at ``--max-tokens`` tokens, budget raised so a miss still reports memory;
calibration text for every mode that takes it). The child reports its peak RSS (VmHWM), its RSS
after the imports, and (``--stages``) the peak RSS a psutil sampler (every 10 ms) saw inside each
stage: load (bundle, texts, graphs), calibration (activation statistics), search (int8's float
search), quantize (the rest of the mode's handler), write (graphs saved, ORT variant), gate
(perplexity and greedy decode of source and output), other (between those). ``int8`` is the
default (SmoothQuant 0.5), ``int8-nosq`` the same without SmoothQuant, for the side by side.
Target (issue 16 item 6): peak <= 3x the fp32 bundle's ``model.onnx.data``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import psutil
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from gptedge.quantize import Fp16Config, Int4Config, Int8Config, Int8DynamicConfig, quantize
from gptedge.quantize import api, int8, weight_only
stack, peaks, proc = ["imports"], {}, psutil.Process()
def sample():
    while True:
        rss = proc.memory_info().rss
        peaks[stack[-1]] = max(peaks.get(stack[-1], 0), rss)
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
def staged(name, fn):
    def run(*a, **k):
        stack.append(name)
        try:
            return fn(*a, **k)
        finally:
            peaks[name] = max(peaks.get(name, 0), proc.memory_info().rss)
            stack.pop()
    return run
load_graphs = staged("load", api.load_graphs)
def load_then_other(*a, **k):
    try:
        return load_graphs(*a, **k)
    finally:
        stack[-1] = "other"  # what runs between the stages below
api.load_graphs = load_then_other
handler_for = api.handler_for
api.handler_for = lambda config: staged("quantize", handler_for(config))
api._write = staged("write", api._write)
api.measure = staged("gate", api.measure)
int8.collect_stats = staged("calibration", int8.collect_stats)
int8.search = staged("search", int8.search)
weight_only.input_mean_squares = staged("calibration", weight_only.input_mean_squares)
configs = {"fp16": Fp16Config(), "int8-dynamic": Int8DynamicConfig(), "int8": Int8Config(),
           "int8-nosq": Int8Config(smoothquant_alpha=None),
           "int4": Int4Config(), "int4-qdq": Int4Config(format="qdq")}
bundle, mode, out, calib, evaluation, max_tokens = sys.argv[1:7]
after_import = vm("VmRSS:")
stack.append("load")
start = time.perf_counter()
result = quantize(bundle, configs[mode], out, calib_text=calib if mode in ("int8", "int8-nosq", "int4", "int4-qdq") else None,
                  eval_text=evaluation, max_ppl_increase=1000.0, max_tokens=int(max_tokens))
print(json.dumps({"after_import": after_import, "peak": vm("VmHWM:"), "stages": peaks,
                  "seconds": time.perf_counter() - start,
                  "ppl_increase_pct": result.manifest.history[-1]["quality"]["ppl_increase_pct"]}))
"""

STAGES = ("load", "calibration", "search", "quantize", "write", "gate", "other")


def measure(bundle: Path, mode: str, calib: Path, evaluation: Path, max_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), mode, str(Path(tmp) / mode), str(calib),
                              str(evaluation), str(max_tokens)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{mode}: the child failed:\n{out.stderr[-3000:]}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    weights = (bundle / "model.onnx.data").stat().st_size
    figures.update(weights=weights, ratio=figures["peak"] / weights,
                   ratio_above_imports=(figures["peak"] - figures["after_import"]) / weights)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--modes", default="fp16,int8-dynamic,int8,int4,int4-qdq")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--stages", action="store_true", help="also print the peak RSS of each stage")
    args = parser.parse_args()
    weights = (args.bundle / "model.onnx.data").stat().st_size
    print(f"fp32 weights: {weights / 1e6:.0f} MB; {time.strftime('%Y-%m-%d %H:%M')}")
    stage_cols = "".join(f" {s} MB |" for s in STAGES) if args.stages else ""
    print(f"| mode | s | gate Δ ppl % | imports MB | peak RSS MB | peak / fp32 weights | (peak - imports) / weights |"
          f"{stage_cols}")
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(STAGES) if args.stages else 0))
    for mode in args.modes.split(","):
        f = measure(args.bundle, mode, args.calib, args.eval, args.max_tokens)
        cells = "".join(f" {f['stages'][s] / 1e6:,.0f} |" if s in f["stages"] else " — |" for s in STAGES)
        print(f"| {mode} | {f['seconds']:.0f} | {f['ppl_increase_pct']:+.2f} | {f['after_import'] / 1e6:,.0f} | {f['peak'] / 1e6:,.0f} | "
              f"{f['ratio']:.2f}x | {f['ratio_above_imports']:.2f}x |{cells if args.stages else ''}", flush=True)


if __name__ == "__main__":
    main()
