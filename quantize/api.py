"""``quantize(bundle, config, out)``: bundle in -> bundle out, same contract, with a quality gate."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from gptedge.quantize.config import MixedConfig, QuantConfig, config_record, ungated_note
from gptedge.quantize.evaluate import greedy_tokens, perplexity_of_ids
from gptedge.quantize.graph_io import (
    EXTERNAL_DATA_NAME,
    load_graphs,
    release_freed_memory,
    save_graphs_shared,
)
from gptedge.quantize.graph_utils import untie_linear_weights
from gptedge.quantize.job import Job
from gptedge.quantize.registry import handler_for
from gptedge.quantize.text import encode, read_text, require_tokens, split_held_out
from gptedge.runtime.bundle import MODEL_NAME, Bundle, Manifest, check_output_dir, load_bundle
from gptedge.runtime.bundle_writer import ORT_ROLE, SIZE_ROLES, BundleWriter
from gptedge.runtime.errors import InputError, QualityGateError

log = logging.getLogger(__name__)

DECODE_STEPS = 32  # greedy tokens timed per bundle for the report


def quantize(bundle_dir: str | os.PathLike[str], config: QuantConfig, out_dir: str | os.PathLike[str], *,
             calib_text: str | os.PathLike[str] | None = None, eval_text: str | os.PathLike[str] | None = None,
             max_ppl_increase: float | None = None, max_tokens: int | None = None,
             overwrite: bool = False) -> Bundle:
    """Write a quantized/pruned copy of the bundle at ``bundle_dir`` to ``out_dir`` and return it.

    ``calib_text``: text file for calibration (int8 static, Wanda); without ``eval_text`` its last
    10 % is held out for the quality gate. ``max_ppl_increase``: allowed perplexity increase in
    percent (default: the config's ``default_budget``; pruning needs it explicitly). The gate runs
    inside the temporary output folder, so a failing bundle (QualityGateError) is never written.
    ``max_tokens`` caps the evaluation text's tokens. The manifest records the config, the new
    precision and the measured quality in ``history``.
    """
    source = load_bundle(bundle_dir)
    if Path(out_dir).absolute() == source.path.absolute():
        raise InputError(f"-o {out_dir}: the output must be a new folder, not the source bundle")
    check_output_dir(out_dir, overwrite)  # refuse before calibrating and converting
    calib_ids, eval_ids = _texts(source, calib_text, eval_text, max_tokens)
    budget = max_ppl_increase if max_ppl_increase is not None else config.default_budget
    if eval_ids is not None and budget is None:
        raise InputError(f"{config.mode}: pass --max-ppl-increase PCT (max_ppl_increase=...); pruning has no "
                         "default quality budget")
    if budget is not None and budget < 0:
        raise InputError(f"--max-ppl-increase {budget}: must be >= 0 (percent)")
    if isinstance(config, MixedConfig) and calib_ids is None:
        raise InputError(f"--max-ppl-increase {config.max_ppl_increase:g} with --mode {config.base.mode}: the "
                         "mixed-precision plan measures layers on calibration text and fits the budget on "
                         "evaluation text; pass --calib FILE (and --eval FILE, else the last 10 % of --calib is held out)")
    job = Job(bundle=source, graphs=load_graphs(source), calib_ids=calib_ids, eval_ids=eval_ids)
    if config.mode != "fp16":  # fp16 may keep one shared table; quantizers/pruners rewrite weights
        for role in job.graphs:  # not `for graph in ...`: the loop variable would keep a graph alive through the gate
            untie_linear_weights(job.graphs[role])
    handler_for(config)(job, config)
    release_freed_memory()
    with BundleWriter.create(out_dir, overwrite=overwrite) as writer:
        manifest = _write(source, job, writer)
        job.graphs.clear()  # the saved graphs' protos still hold their bytes until dropped; the gate needs room
        job.close()
        release_freed_memory()
        entry: dict[str, Any] = {"step": "quantize", "config": config_record(config), **job.record}
        manifest.history.append(entry)
        if eval_ids is None:
            log.warning("%s: %s", out_dir, ungated_note(config))
        else:
            window = (min(config.eval_window, source.manifest.architecture.max_context)
                      if isinstance(config, MixedConfig) else None)
            entry["quality"] = measure(source, writer.bundle(), eval_ids, budget, window)
            _gate(entry["quality"])
    return load_bundle(out_dir)


def _texts(bundle: Bundle, calib_text, eval_text, max_tokens: int | None):
    calib_ids = eval_ids = None
    window = bundle.manifest.architecture.max_context
    if calib_text is not None:
        text = read_text(calib_text, "--calib")
        held = None
        if eval_text is None:
            text, held = split_held_out(text)
        calib_ids = encode(bundle, text, f"--calib {calib_text}")
        require_tokens(calib_ids, window, f"--calib {calib_text}")
        if held is not None:
            eval_ids = encode(bundle, held, f"--calib {calib_text} (held-out last 10 %)")
    if eval_text is not None:
        eval_ids = encode(bundle, read_text(eval_text, "--eval"), f"--eval {eval_text}")
    if eval_ids is not None:
        eval_ids = eval_ids[:max_tokens] if max_tokens else eval_ids
        require_tokens(eval_ids, 2, "evaluation text")
    return calib_ids, eval_ids


def _write(source: Bundle, job: Job, writer: BundleWriter) -> Manifest:
    """Save the job's graphs, copy the source's other files (the ORT variant is rebuilt for the new
    graphs) and set the writer's manifest: the source's, with the job's architecture/precision/io."""
    files = source.manifest.files
    paths = {role: writer.folder / (files[role]["path"] if role in files else MODEL_NAME) for role in job.graphs}
    save_graphs_shared({paths[role]: job.graphs[role]
                        for role in sorted(paths, key=lambda role: paths[role].name != MODEL_NAME)},
                       EXTERNAL_DATA_NAME)
    written = {path.name for path in paths.values()} | {EXTERNAL_DATA_NAME}
    for role, entry in files.items():
        if role == ORT_ROLE:
            continue
        if entry["path"] not in written:
            shutil.copy2(source.path / entry["path"], writer.folder / entry["path"])
        writer.add_entry(role, entry)
    for path in paths.values():
        onnx.checker.check_model(str(path), full_check=False)
    import onnxruntime
    writer.manifest = manifest = Manifest.from_dict({**source.manifest.to_dict(), "files": {}})
    manifest.architecture = job.architecture
    manifest.precision = job.precision
    manifest.io = job.io
    manifest.parity = None  # parity was against the float source; quality is in history
    manifest.tools = {**manifest.tools, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    writer.attach_ort_variant()
    return manifest


def measure(source: Bundle, output: Bundle, ids: np.ndarray, budget: float | None,
            window: int | None = None) -> dict[str, Any]:
    """Perplexity, size and greedy decode speed of source and output on ``ids`` (``window``: disjoint
    windows of that many tokens, each scored from its own start; None: the evaluator's default)."""
    before = perplexity_of_ids(source, ids, window=window, stride=window)
    after = perplexity_of_ids(output, ids, window=window, stride=window)
    prompt = ids[: min(8, len(ids))]
    src_tokens, src_speed = greedy_tokens(source, prompt, DECODE_STEPS)
    out_tokens, out_speed = greedy_tokens(output, prompt, DECODE_STEPS)
    agree = float(np.mean(np.equal(src_tokens, out_tokens))) if src_tokens else 1.0
    return {"tokens": after.tokens, "ppl_source": before.ppl, "ppl": after.ppl,
            "ppl_increase_pct": 100.0 * (after.ppl / before.ppl - 1.0), "budget_pct": budget,
            "greedy_agreement": agree, "size_mb_source": bundle_size_mb(source), "size_mb": bundle_size_mb(output),
            "decode_tok_s_source": src_speed, "decode_tok_s": out_speed}


def _gate(quality: dict[str, Any]) -> None:
    budget = quality["budget_pct"]
    if budget is not None and quality["ppl_increase_pct"] > budget:
        raise QualityGateError(
            f"perplexity rose {quality['ppl_increase_pct']:.2f} % ({quality['ppl_source']:.4f} -> "
            f"{quality['ppl']:.4f}), over the {budget:g} % budget; no bundle written. Try a gentler mode "
            "(int8 instead of int4, smaller sparsity), more calibration text, or raise --max-ppl-increase")


def bundle_size_mb(bundle: Bundle) -> float:
    """Size in MB (1e6 bytes) of the graphs and weights (tokenizer files excluded)."""
    total = 0
    for role, entry in bundle.manifest.files.items():
        if role in SIZE_ROLES:
            total += (bundle.path / entry["path"]).stat().st_size
    return total / 1e6
