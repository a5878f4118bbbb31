"""The main job end to end: train a tiny GPT, export it, quantize it, score it, generate with it.

``run_demo(DemoConfig(...), reporter)`` does every step the README promises on one machine, on
ONNX Runtime's CPU provider, and returns a :class:`DemoResult` (one :class:`DemoRow` per
precision). The CLI (``gptedge demo``) draws progress bars and the final table from the reporter
callbacks; this module only logs.

Workdir layout (the demo owns it; a ``.gptedge-demo`` marker guards foreign folders)::

    data/train.txt, data/val.txt   the corpus split 90/10 (val = held-out text)
    train/ckpt.pt, meta.pkl        nanoGPT-format checkpoint (reused when it matches the settings)
    bundles/<precision>/           fp32 (exported, parity-checked), fp16, int8, int4, int4-qdq
    results.json                   the final table as data
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptedge.exporter.training.corpus import Corpus, load_corpus
from gptedge.exporter.training.train import LOG_NAME, TrainConfig, TrainEvent, matches, train_on
from gptedge.runtime.bundle import atomic_output_dir
from gptedge.runtime.errors import InputError, OutputExistsError, QualityGateError

log = logging.getLogger(__name__)

MARKER = ".gptedge-demo"
PRECISIONS = ("fp32", "fp16", "int8", "int4", "int4-qdq")
# "small" is the README's model (~0.8 M parameters, ~2 minutes of CPU training); "tiny" trains in
# seconds and exists for tests and smoke runs.
SIZES: dict[str, dict[str, int]] = {
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "steps": 600,
              "batch_size": 16, "eval_interval": 100, "eval_iters": 10},
    "tiny": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64, "steps": 60,
             "batch_size": 8, "eval_interval": 30, "eval_iters": 2},
}


@dataclass(frozen=True)
class DemoConfig:
    """One demo run. ``text`` None trains on the Python standard library's source. ``steps`` None
    uses the size's default. ``eval_chars``: held-out characters scored per precision (chars =
    tokens for the char-level model). ``overwrite``: retrain even when a matching checkpoint is
    there, and replace one trained with other settings."""

    workdir: Path = Path("gptedge-demo")
    text: Path | None = None
    steps: int | None = None
    size: str = "small"
    overwrite: bool = False
    eval_chars: int = 20_000
    sample_tokens: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise InputError(f"--size {self.size!r}: must be one of {sorted(SIZES)}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps {self.steps}: must be at least 1")
        if self.eval_chars < 100 or self.sample_tokens < 1:
            raise InputError("eval_chars must be >= 100 and sample_tokens >= 1")
        object.__setattr__(self, "workdir", Path(self.workdir))
        if self.text is not None:
            object.__setattr__(self, "text", Path(self.text))

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` of this demo (output in ``workdir/train``)."""
        sizes = dict(SIZES[self.size])
        if self.steps is not None:
            sizes["steps"] = self.steps
        sizes["eval_interval"] = min(sizes["eval_interval"], sizes["steps"])
        return TrainConfig(text=self.text, out_dir=self.workdir / "train", overwrite=True,
                           warmup_steps=min(50, sizes["steps"] // 10), **sizes)


@dataclass
class DemoRow:
    """One precision: bundle size (MB = 1e6 bytes of graphs + weights), held-out perplexity and its
    change vs fp32 (percent), time to first token (ms, prompt of ``prompt_tokens``), greedy decode
    speed (tokens/s, batch 1), the streamed sample, and ``note`` (e.g. why a bundle is missing)."""

    precision: str
    bundle: Path | None = None
    size_mb: float | None = None
    ppl: float | None = None
    delta_pct: float | None = None
    ttft_ms: float | None = None
    decode_tok_s: float | None = None
    sample: str = ""
    note: str = ""


@dataclass
class DemoResult:
    """What the demo measured. ``untrained_ppl`` is exp(validation loss) of the random-init model
    (≈ vocabulary size); perplexities are per character on ``eval_tokens`` held-out tokens."""

    workdir: Path
    rows: list[DemoRow]
    vocab_size: int
    untrained_ppl: float
    trained_val_ppl: float
    reused_checkpoint: bool
    train_seconds: float
    eval_tokens: int
    prompt: str
    parity_max_abs: float | None
    seconds: float
    backend: str = "ort-cpu"
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["workdir"] = str(self.workdir)
        for row in out["rows"]:
            row["bundle"] = str(row["bundle"]) if row["bundle"] else None
        return out


class Reporter:
    """Receives the demo's progress; the base class logs. The CLI subclasses it with rich UI."""

    def stage(self, name: str, detail: str = "") -> None:
        """A pipeline stage starts (``train``, ``export``, ``quantize:int8``, ``evaluate``, ...)."""
        log.info("demo: %s %s", name, detail)

    def stage_done(self, name: str, detail: str = "") -> None:
        log.info("demo: %s done %s", name, detail)

    def training(self, event: TrainEvent) -> None:
        if event.val_loss is not None:
            log.info("step %d/%d val loss %.3f", event.step, event.steps, event.val_loss)

    def sample(self, precision: str, prompt: str, pieces) -> str:
        """Consume the streamed text pieces of one precision's sample; return the whole text."""
        return "".join(pieces)


def run_demo(config: DemoConfig, reporter: Reporter | None = None) -> DemoResult:
    """Run the whole pipeline (see the module docstring) and write ``results.json``."""
    reporter = reporter or Reporter()
    start = time.perf_counter()
    timings: dict[str, float] = {}
    workdir = _claim_workdir(config)
    corpus = load_corpus(config.text)
    train_txt, val_txt = _write_texts(corpus, workdir, config.eval_chars)
    ckpt, reused, train_log = _train_or_reuse(config, corpus, reporter)
    timings["train_s"] = time.perf_counter() - start
    bundles = workdir / "bundles"
    fp32, parity = _export(ckpt, bundles / "fp32", reporter)
    timings["export_s"] = time.perf_counter() - start - timings["train_s"]
    rows = [DemoRow("fp32", fp32)]
    for precision in PRECISIONS[1:]:
        rows.append(_quantize(fp32, precision, bundles / precision, train_txt, val_txt, config, reporter))
    timings["quantize_s"] = time.perf_counter() - start - timings["train_s"] - timings["export_s"]
    prompt = _prompt(corpus.split()[1], config.train_config().block_size // 4)
    eval_tokens = _evaluate(rows, val_txt, config, reporter)
    for row in rows:
        if row.bundle is not None:
            _run_bundle(row, prompt, config, reporter)
    result = DemoResult(
        workdir=workdir, rows=rows, vocab_size=len(set(corpus.text)),
        untrained_ppl=math.exp(train_log["untrained_val_loss"]), trained_val_ppl=math.exp(train_log["val_loss"]),
        reused_checkpoint=reused, train_seconds=0.0 if reused else train_log["seconds"], eval_tokens=eval_tokens,
        prompt=prompt, parity_max_abs=parity, seconds=time.perf_counter() - start, timings=timings)
    (workdir / "results.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result


def _claim_workdir(config: DemoConfig) -> Path:
    workdir = config.workdir.absolute()
    if workdir.exists() and not workdir.is_dir():
        raise OutputExistsError(f"--workdir {workdir}: is a file; choose a folder")
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise OutputExistsError(f"--workdir {workdir}: exists, is not empty and was not made by "
                                "`gptedge demo`; choose a new or empty folder")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `gptedge demo`; its contents are rebuilt by each run\n")
    return workdir


def _write_texts(corpus: Corpus, workdir: Path, eval_chars: int) -> tuple[Path, Path]:
    train_text, val_text = corpus.split()
    with atomic_output_dir(workdir / "data", overwrite=True) as tmp:
        (tmp / "train.txt").write_text(train_text, encoding="utf-8")
        (tmp / "val.txt").write_text(val_text[:eval_chars], encoding="utf-8")
    return workdir / "data" / "train.txt", workdir / "data" / "val.txt"


def _train_or_reuse(config: DemoConfig, corpus: Corpus, reporter: Reporter):
    train_config = config.train_config()
    ckpt = train_config.out_dir / "ckpt.pt"
    reused = not config.overwrite and matches(ckpt, train_config, corpus)
    if not reused and ckpt.exists() and not config.overwrite:
        raise OutputExistsError(f"{ckpt}: trained with other settings (text, size or --steps); pass "
                                "--overwrite to retrain, or use another --workdir")
    if reused:
        reporter.stage_done("train", f"reusing {ckpt}")
    else:
        reporter.stage("train", f"{train_config.steps} steps")
        train_on(corpus, train_config, reporter.training)
        reporter.stage_done("train")
    train_log = json.loads((train_config.out_dir / LOG_NAME).read_text())
    return ckpt, reused, train_log


def _export(ckpt: Path, out: Path, reporter: Reporter) -> tuple[Path, float | None]:
    from gptedge.exporter import ExportConfig, export

    reporter.stage("export", "ONNX with KV cache + parity check")
    bundle = export(ckpt, ExportConfig(overwrite=True), out)
    parity = bundle.manifest.parity["max_abs"] if bundle.manifest.parity else None
    reporter.stage_done("export", f"parity max-abs {parity:.1e}" if parity is not None else "")
    return out, parity


def _quant_config(precision: str):
    from gptedge.quantize import Fp16Config, Int4Config, Int8Config

    return {"fp16": Fp16Config(), "int8": Int8Config(), "int4": Int4Config(),
            "int4-qdq": Int4Config(format="qdq")}[precision]


def _quantize(fp32: Path, precision: str, out: Path, train_txt: Path, val_txt: Path,
              config: DemoConfig, reporter: Reporter) -> DemoRow:
    from gptedge.quantize import quantize

    reporter.stage(f"quantize:{precision}")
    try:
        bundle = quantize(fp32, _quant_config(precision), out, calib_text=train_txt, eval_text=val_txt,
                          max_tokens=config.eval_chars, overwrite=True)
    except QualityGateError as exc:
        reporter.stage_done(f"quantize:{precision}", "rejected by the quality gate")
        return DemoRow(precision, note=f"rejected by the quality gate: {exc}")
    quality = bundle.manifest.history[-1].get("quality") or {}
    row = DemoRow(precision, out, ppl=quality.get("ppl"))
    reporter.stage_done(f"quantize:{precision}")
    return row


def _evaluate(rows: list[DemoRow], val_txt: Path, config: DemoConfig, reporter: Reporter) -> int:
    from gptedge.quantize import perplexity
    from gptedge.quantize.api import bundle_size_mb
    from gptedge.runtime.bundle import load_bundle

    reporter.stage("evaluate", f"perplexity on {val_txt}")
    base = perplexity(rows[0].bundle, val_txt, max_tokens=config.eval_chars)
    for row in rows:
        if row.bundle is None:
            continue
        if row.ppl is None:  # the quantizer's gate measured the others on the same ids
            row.ppl = base.ppl if row.precision == "fp32" else \
                perplexity(row.bundle, val_txt, max_tokens=config.eval_chars).ppl
        row.delta_pct = 100.0 * (row.ppl / base.ppl - 1.0)
        row.size_mb = bundle_size_mb(load_bundle(row.bundle))
    reporter.stage_done("evaluate")
    return base.tokens


def _prompt(val_text: str, max_chars: int) -> str:
    """A prompt from the held-out text: its first unindented line of 8 to ``max_chars`` characters
    (a ``def``/``class`` line preferred; in prose a paragraph start), else its first whole line."""
    lines = [line for line in val_text.split("\n")[1:500]  # [0] is the tail of a line cut by the split
             if 8 <= len(line) < max_chars and not line[0].isspace()]
    for line in sorted(lines, key=lambda line: not line.startswith(("def ", "class "))):  # stable
        return line + "\n"
    start = val_text.find("\n") + 1
    return val_text[start:start + max_chars]


def _run_bundle(row: DemoRow, prompt: str, config: DemoConfig, reporter: Reporter) -> None:
    """Time TTFT / decode speed (greedy) and stream a sampled continuation of ``prompt``."""
    from gptedge.runtime import load

    with load(row.bundle, backend="ort-cpu") as generator:
        ids = generator.encode(prompt)
        room = generator.max_context - len(ids)
        generator.generate(ids, max_new_tokens=4, ignore_eos=True)  # warm-up: session allocations
        ttfts = [generator.generate(ids, max_new_tokens=1, ignore_eos=True).timings["ttft_s"] for _ in range(5)]
        # the median of three full decodes: one run of a model this small swings by several times
        decodes = [generator.generate(ids, max_new_tokens=room, ignore_eos=True) for _ in range(3)]
        row.ttft_ms = 1000.0 * statistics.median(ttfts)
        row.decode_tok_s = statistics.median(d.timings["decode_tokens_per_s"] for d in decodes)
        stream = generator.stream(prompt, max_new_tokens=min(config.sample_tokens, room), temperature=0.8,
                                  top_k=40, seed=config.seed, ignore_eos=True)
        row.sample = reporter.sample(row.precision, prompt, stream)
