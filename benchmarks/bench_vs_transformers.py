"""gptedge (onnxruntime CPU) vs transformers `generate` on a 124M GPT-2-config model.

Random weights (GPT2Config() defaults, torch seed 0) saved as an HF folder, exported with gptedge,
then both run alternately: batch 1, 32 prompt tokens, 128 new tokens, greedy, EOS ignored, 2
threads each, median of 5 runs after a warm-up. TTFT = start of the call to the first new token;
decode tok/s = tokens after the first / time after the first. Also measures the ORT backend's
decode speed without IO binding (numpy KV round-trip through session.run) on the same bundle.

    python benchmarks/bench_vs_transformers.py [--runs 5] [--threads 2] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class _TokenClock:
    """A transformers streamer that timestamps every generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first put is the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def build_bundle(workdir: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptedge.exporter import ExportConfig, export

    bundle = workdir / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(workdir / "hf")
    export(workdir / "hf", ExportConfig(allow_missing_tokenizer=True), bundle)
    return bundle


def run_transformers(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    clock = _TokenClock()
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=0,
                       do_sample=False, pad_token_id=0, streamer=clock)
    assert len(clock.times) == new_tokens
    return clock.times[0] - start, (new_tokens - 1) / (clock.times[-1] - clock.times[0])


def run_plain_session(backend, prompt: list[int], new_tokens: int) -> float:
    """Decode tok/s of the same graph driven by session.run with numpy feeds (no IO binding)."""
    from gptedge.runtime import contract

    session, names = backend.session, backend.past_names
    ids = np.array([prompt], dtype=np.int64)
    mask = np.ones((1, len(prompt) + new_tokens), dtype=np.int64)
    past = {n: np.zeros((1, *backend.kv_shape), dtype=backend.kv_dtype) for n in names}
    positions = np.arange(len(prompt), dtype=np.int64)[None]
    out_names = [contract.LOGITS, *backend.present_names]
    times = []
    for step in range(new_tokens):
        total = len(prompt) + step
        outputs = session.run(out_names, {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask[:, :total],
                                          contract.POSITION_IDS: positions, **past})
        ids = np.array([[int(np.argmax(outputs[0][0, -1]))]], dtype=np.int64)
        past = dict(zip(names, outputs[1:]))
        positions = np.array([[total]], dtype=np.int64)
        times.append(time.perf_counter())
    return (new_tokens - 1) / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--workdir", type=Path, help="keep the HF folder and bundle here (reused when present)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from transformers import GPT2LMHeadModel

    from gptedge.runtime import load

    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gptedge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle(workdir)
    model = GPT2LMHeadModel.from_pretrained(workdir / "hf").eval()  # sdpa attention by default
    model.generation_config.eos_token_id = None  # EOS ignored: exactly new_tokens tokens
    generator = load(bundle, backend="ort-cpu", threads=args.threads)
    prompt = np.random.default_rng(0).integers(0, 50257, args.prompt_len).tolist()

    run_transformers(model, prompt, 8)  # warm-up both
    generator.generate(prompt, max_new_tokens=8, ignore_eos=True)
    hf, ge, plain = [], [], []
    for _ in range(args.runs):  # alternate so that both see the same machine state
        hf.append(run_transformers(model, prompt, args.new_tokens))
        result = generator.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
        ge.append((result.timings["ttft_s"], result.timings["decode_tokens_per_s"]))
        plain.append(run_plain_session(generator.backend, prompt, args.new_tokens))

    def med(rows, i):
        return statistics.median(r[i] for r in rows)

    report = {
        "model": "GPT-2 124M config, random weights", "threads": args.threads, "runs": args.runs,
        "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens,
        "transformers": {"ttft_ms": 1000 * med(hf, 0), "decode_tokens_per_s": med(hf, 1),
                         "torch": torch.__version__},
        "gptedge": {"ttft_ms": 1000 * med(ge, 0), "decode_tokens_per_s": med(ge, 1),
                    "backend": generator.backend_name},
        "gptedge_without_io_binding": {"decode_tokens_per_s": statistics.median(plain)},
    }
    report["decode_ratio"] = report["gptedge"]["decode_tokens_per_s"] / report["transformers"]["decode_tokens_per_s"]
    report["ttft_ratio"] = report["gptedge"]["ttft_ms"] / report["transformers"]["ttft_ms"]
    report["io_binding_speedup"] = (report["gptedge"]["decode_tokens_per_s"]
                                    / report["gptedge_without_io_binding"]["decode_tokens_per_s"])
    if args.json:
        print(json.dumps(report, indent=2))
        return
    t, g = report["transformers"], report["gptedge"]
    print(f"GPT-2 124M (random weights), batch 1, {args.prompt_len} prompt + {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.runs}")
    print(f"  transformers {t['torch']:>14}: TTFT {t['ttft_ms']:7.1f} ms   decode {t['decode_tokens_per_s']:6.1f} tok/s")
    print(f"  gptedge ({g['backend']}):         TTFT {g['ttft_ms']:7.1f} ms   decode {g['decode_tokens_per_s']:6.1f} tok/s")
    print(f"  gptedge without IO binding:                    decode "
          f"{report['gptedge_without_io_binding']['decode_tokens_per_s']:6.1f} tok/s")
    print(f"  ratios: decode x{report['decode_ratio']:.2f} (target >= 1.3), TTFT x{report['ttft_ratio']:.2f} "
          f"(target <= 0.8), IO binding x{report['io_binding_speedup']:.2f}")


if __name__ == "__main__":
    main()
