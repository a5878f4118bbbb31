"""Peak RSS of `gptedge export` per stage (load, trace, save, parity, ORT variant), in one process.

    python benchmarks/export_stages.py SOURCE [-o OUT] [--no-validate] [--interval 0.02]
    python benchmarks/export_stages.py ../shared/data/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

A sampler thread reads this process's RSS every ``interval`` seconds; the export's stage listener
(:func:`gptedge.exporter.stages.stage_listener`) marks where each stage starts and ends, so the
table gives each stage's peak, and the process's own high-water mark (VmHWM) gives the total,
as a multiple of the fp32 weight bytes (issue 13: <= 2.5x). The ORT variant stage runs in a child
interpreter; the sampler adds the child's RSS to this process's while it runs.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil


def vm_hwm() -> int:
    """This process's peak RSS in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Peak RSS per export stage, sampled by a background thread."""

    def __init__(self, interval: float):
        self.interval, self.current, self.peaks = interval, "before export", {"before export": 0}
        self.order = ["before export"]
        self.process = psutil.Process()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.seconds: dict[str, float] = {}
        self.starts: dict[str, int] = {}

    def tree_rss(self) -> int:
        """RSS of this process plus its live children (the ORT variant's child runs beside it)."""
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self.stop.is_set():
            rss = self.tree_rss()
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), rss)
            time.sleep(self.interval)

    def started(self, name: str) -> None:
        self.current = name
        if name not in self.order:
            self.order.append(name)
        self.starts.setdefault(name, self.tree_rss())
        self.peaks.setdefault(name, self.starts[name])

    def finished(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.peaks[name] = max(self.peaks[name], self.tree_rss())
        self.current = f"after {name}"
        if self.current not in self.order:
            self.order.append(self.current)
        self.peaks.setdefault(self.current, 0)


def _split_parity(sampler: Sampler) -> None:
    """Mark the parity check's parts as stages of their own (wrapping validate's functions)."""
    from gptedge.exporter import validate
    from gptedge.exporter.stages import stage

    def marked(name, fn):
        def wrapper(*args, **kwargs):
            with stage(name):
                result = fn(*args, **kwargs)
            return result
        return wrapper

    validate._onnx_steps = marked("parity: onnxruntime steps", validate._onnx_steps)
    validate._torch_outputs = marked("parity: torch passes", validate._torch_outputs)
    from gptedge.exporter.checkpoints import hf_reference
    hf_reference.build_gguf_reference = marked("parity: build reference", hf_reference.build_gguf_reference)
    hf_reference.build_reference = marked("parity: build reference", hf_reference.build_reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("-o", "--out", type=Path, help="bundle folder (default: a temporary folder)")
    parser.add_argument("--no-validate", action="store_true")
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--detail", action="store_true",
                        help="split the parity stage into onnxruntime / reference build / torch passes")
    args = parser.parse_args()
    from gptedge.exporter import ExportConfig, export
    from gptedge.exporter.stages import stage_listener

    sampler = Sampler(args.interval)
    sampler.thread.start()
    if args.detail:
        _split_parity(sampler)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "bundle"
        start = time.perf_counter()
        with stage_listener(sampler):
            bundle = export(args.source, ExportConfig(validate=not args.no_validate, overwrite=True), out)
        wall = time.perf_counter() - start
        weights = sum(p.stat().st_size for p in [Path(out) / "model.onnx.data"] if p.exists())
        sampler.stop.set()
        sampler.thread.join()
        print(f"{args.source.name}: fp32 weights {weights / 1e6:,.0f} MB, wall {wall:.1f} s, load average "
              f"{' '.join(f'{x:.1f}' for x in psutil.getloadavg())}")
        print("| stage | s | RSS at start MB | peak RSS MB | / fp32 weights |\n|---|---:|---:|---:|---:|")
        for name in sampler.order:
            peak = sampler.peaks[name]
            if not peak:  # a gap between stages too short to be sampled
                continue
            start = f"{sampler.starts[name] / 1e6:,.0f}" if name in sampler.starts else ""
            print(f"| {name} | {sampler.seconds.get(name, 0):.1f} | {start} | {peak / 1e6:,.0f} | "
                  f"{peak / weights:.2f} |")
        total = max(vm_hwm(), max(sampler.peaks.values()))
        print(f"| **whole export (max of VmHWM and sampled process tree)** | {wall:.1f} | | {total / 1e6:,.0f} | "
              f"{total / weights:.2f} |")
        del bundle


if __name__ == "__main__":
    main()
