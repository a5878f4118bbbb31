"""The SmolLM2-135M-Instruct table of issue 16: transformers fp32 and every bundle, side by side.

    flock /tmp/gptedge-heavy.lock python benchmarks/real_model.py [--workdir DIR] [--reuse]

Exports the shared GGUF (``--no-validate``; tests/test_smollm2.py checks its parity), quantizes it
in every mode with ``--calib wiki.valid.raw`` (the quality gate scores the held-out last 10 %, first
2,048 tokens, with a wide budget: this table is the judge), then measures, in one process:

- size MB: graphs + weights (tokenizer excluded); transformers: its fp32 parameters;
- perplexity on the first ``windows x len`` tokens of ``wiki.test.raw``, each window scored from its
  own start (benchmarks/window_ppl.py, the same token ids for transformers), Δ % vs the fp32 bundle;
- greedy agreement with the fp32 bundle: 64 tokens (EOS ignored) of the chat reply to each of
  ``PROMPTS``, position by position, and how many leading tokens are identical;
- greedy decode tok/s (batch 1, prefill excluded; the mean over the prompts).

Prints a rich table, then the markdown of the README (benchmarks/quantize_table.py's writer).
Budget-driven mixed precision (issue 16 item 5): int4 planned at the budgets of ``MIXED_BUDGETS``
(:func:`mixed_specs`; its evaluation text is the held-out tail of the calibration text).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from quantize_table import markdown
from window_ppl import window_ppl

from gptedge.quantize import Fp16Config, Int4Config, Int8Config, Int8DynamicConfig, MixedConfig, quantize
from gptedge.quantize.evaluate import greedy_tokens
from gptedge.quantize.text import encode, read_text
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.errors import GptEdgeError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the checkout
GGUF = ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = ("What is the capital of France?",
           "Write a short paragraph explaining why the sky is blue, for a ten-year-old.")
GATE_PCT, GATE_TOKENS = 100.0, 2048  # the gate only guards against a broken bundle here
MIXED_BUDGETS = (1.0, 3.0)


@dataclass(frozen=True)
class Spec:
    """One quantized bundle: folder name, label, issue 16's Δ perplexity budget (%), the config
    (None: not available yet), extra ``quantize()`` keyword arguments, whether it calibrates."""

    name: str
    label: str
    budget_pct: float | None
    config: Callable[[], Any] | None
    options: dict[str, Any] = field(default_factory=dict)
    calib: bool = True


@dataclass
class Row:
    label: str
    budget_pct: float | None = None
    size_mb: float | None = None
    ppl: float | None = None
    replies: list[list[int]] = field(default_factory=list)
    tok_s: float | None = None
    note: str = ""


def mixed_specs() -> list[Spec]:
    """int4 with budget-driven mixed precision (``gptedge quantize --mode int4 --max-ppl-increase B``)."""
    return [Spec(f"mixed{budget:g}", f"mixed precision int4, budget {budget:g} %", budget,
                 lambda b=budget: MixedConfig(Int4Config(), max_ppl_increase=b))
            for budget in MIXED_BUDGETS]


def specs() -> list[Spec]:
    return [Spec("fp16", "fp16", 0.1, Fp16Config, calib=False),
            Spec("int8dyn", "int8-dynamic (block 32)", 0.5, Int8DynamicConfig),
            Spec("int8", "int8 static QDQ (SmoothQuant 0.5, measured float inputs)", 1.5,
                 lambda: Int8Config(smoothquant_alpha=0.5)),
            Spec("int4", "int4 MatMulNBits (activation-mse, block 32)", 3.0, Int4Config),
            Spec("int4qdq", "int4-qdq (activation-mse, block 32)", 3.0, lambda: Int4Config(format="qdq")),
            *mixed_specs()]


def export_fp32(gguf: Path, workdir: Path, reuse: bool) -> Path:
    from gptedge.exporter import ExportConfig, export

    out = workdir / "fp32"
    if not (reuse and (out / "manifest.json").is_file()):
        start = time.perf_counter()
        export(gguf, ExportConfig(validate=False, overwrite=True), out)
        log(f"export: {time.perf_counter() - start:.0f} s")
    return out


def build(spec: Spec, fp32: Path, workdir: Path, calib: Path, reuse: bool) -> tuple[Path | None, str]:
    """The bundle of ``spec`` (quantized now, or reused); (None, why) when there is none."""
    if spec.config is None:
        return None, "not available"
    out = workdir / spec.name
    if reuse and (out / "manifest.json").is_file():
        return out, ""
    kwargs: dict[str, Any] = (dict(calib_text=calib, max_ppl_increase=GATE_PCT, max_tokens=GATE_TOKENS)
                              if spec.calib else {})
    start = time.perf_counter()
    try:
        quantize(fp32, spec.config(), out, overwrite=True, **{**kwargs, **spec.options})
    except GptEdgeError as exc:
        return None, f"refused: {exc}"
    log(f"quantize {spec.name}: {time.perf_counter() - start:.0f} s")
    return out, ""


def measure_bundle(row: Row, path: Path, args: argparse.Namespace, prompts: list[list[int]]) -> Row:
    row.ppl, row.size_mb, _ = window_ppl(str(path), args.text, args.windows, args.len)
    bundle = load_bundle(path)
    speeds = []
    for prompt in prompts:
        tokens, speed = greedy_tokens(bundle, np.array(prompt, np.int64), args.steps)
        row.replies.append(tokens)
        speeds.append(speed)
    row.tok_s = float(np.mean(speeds))
    return row


def manifest_note(path: Path | None) -> str:
    """What the quantize entry of the manifest says about the table and the float inputs."""
    if path is None:
        return ""
    entry = load_bundle(path).manifest.history[-1]
    notes = []
    if "int8_search" in entry:
        search = entry["int8_search"]
        kept = len(search["kept_float"]) + len(search.get("kept_float_by_rule", []))
        notes.append(f"{kept} of {len(entry['layers_quantized'])} linear inputs kept float")
    if entry.get("lm_head", {}).get("tied_table_shared"):
        notes.append("one int8 table: lookup + head")
    return "; ".join(notes)


def chat_prompts(fp32: Path) -> list[list[int]]:
    from gptedge.runtime import load
    from gptedge.runtime.chat import chat_ids

    with load(fp32, backend="ort-cpu") as generator:
        return [chat_ids(generator, [{"role": "user", "content": q}]) for q in PROMPTS]


def transformers_row(fp32: Path, args: argparse.Namespace, prompts: list[list[int]]) -> Row:
    """transformers' own GGUF reading (as tests/test_smollm2.py), on the bundle's token ids."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = args.data.joinpath(*GGUF)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)).eval()
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(state, strict=False)  # the tied lm_head is not stored
    model.tie_weights()
    row = Row("transformers fp32 (torch, CPU)", size_mb=sum(p.numel() * p.element_size()
                                                             for p in model.parameters()) / 1e6)
    ids = encode(load_bundle(fp32), read_text(args.text, "--text"), "--text")[: args.windows * args.len]
    nll, count = 0.0, 0
    with torch.inference_mode():
        for window in torch.from_numpy(ids.reshape(args.windows, args.len)):
            logp = torch.log_softmax(model(window[None]).logits[0, :-1].double(), dim=-1)
            nll -= float(logp[torch.arange(args.len - 1), window[1:]].sum())
            count += args.len - 1
        row.ppl = math.exp(nll / count)
        speeds = []
        for prompt in prompts:
            tokens, speed = _torch_greedy(model, prompt, args.steps)
            row.replies.append(tokens)
            speeds.append(speed)
    row.tok_s = float(np.mean(speeds))
    return row


def _torch_greedy(model: Any, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """Greedy decode with the KV cache, EOS ignored (as the runtime's ``ignore_eos``)."""
    import torch

    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    start = time.perf_counter()
    for _ in range(steps - 1):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, (steps - 1) / (time.perf_counter() - start)


def cells(row: Row, reference: Row) -> list[str]:
    """size, perplexity, Δ %, budget, agreement, identical prefix, decode tok/s of ``row``."""
    if row.ppl is None:
        return ["—"] * 7 + [row.note]
    delta = 100.0 * (row.ppl / reference.ppl - 1.0) if reference.ppl else 0.0
    budget = "" if row.budget_pct is None else (
        f"≤ {row.budget_pct:g} %: " + ("met" if delta <= row.budget_pct else "**not met**"))
    pairs = list(zip(row.replies, reference.replies))
    agree = np.mean([np.mean(np.equal(a, b)) for a, b in pairs])
    prefix = ", ".join(str(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))) for a, b in pairs)
    return [f"{row.size_mb:.1f}", f"{row.ppl:.3f}", "" if row is reference else f"{delta:+.2f}", budget,
            f"{100 * agree:.1f} %", prefix, f"{row.tok_s:.1f}", row.note]


HEADER = ["model", "size MB", "perplexity", "Δ % vs fp32", "budget", "greedy agreement",
          "identical leading tokens", "decode tok/s", "note"]


def show(rows: list[Row], reference: Row, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SmolLM2-135M-Instruct: {args.windows} x {args.len} tokens of wiki.test.raw, "
                        f"{args.steps}-token greedy chat replies to {len(PROMPTS)} prompts")
    for i, name in enumerate(HEADER):
        table.add_column(name, justify="left" if i in (0, 4, 8) else "right")
    body = [[row.label, *cells(row, reference)] for row in rows]
    for line in body:
        table.add_row(*line)
    Console().print(table)
    print(markdown(HEADER, body))


def log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.1f}] {message}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gptedge-real"))
    parser.add_argument("--reuse", action="store_true", help="keep bundles already in --workdir")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64, help="greedy tokens per chat reply")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    args.text = str(args.data / "wikitext-2-raw" / "wiki.test.raw")
    calib = args.data / "wikitext-2-raw" / "wiki.valid.raw"
    gguf = args.data.joinpath(*GGUF)
    if not gguf.is_file():
        sys.stderr.write(f"{gguf}: not found (the shared SmolLM2 GGUF; pass --data); nothing to measure\n")
        return 2
    fp32 = export_fp32(gguf, args.workdir, args.reuse)
    built = [(spec, *build(spec, fp32, args.workdir, calib, args.reuse)) for spec in specs()]
    log("measuring")
    prompts = chat_prompts(fp32)
    reference = measure_bundle(Row("fp32 bundle (ORT CPU)"), fp32, args, prompts)
    rows = [] if args.no_transformers else [transformers_row(fp32, args, prompts)]
    log("measured fp32 and transformers")
    rows.append(reference)
    for spec, path, why in built:
        row = Row(spec.label, budget_pct=spec.budget_pct, note=why or manifest_note(path))
        rows.append(measure_bundle(row, path, args, prompts) if path is not None else row)
        log(f"measured {spec.name}")
    show(rows, reference, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
