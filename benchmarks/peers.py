"""gptedge vs every peer on CPU generation, side by side in ONE run.

Builds GPT-2 small (12x768, vocab 50257, tied head) and Llama 125M (768, 12 layers, 12 heads, 4 kv
heads, FFN 2048, vocab 32000) with random weights from a seed (HF folders via save_pretrained),
exports them with gptedge (+ int8-dynamic / int8 MatMulNBits / int4 MatMulNBits), builds the peers
and then runs every engine ALTERNATELY (run 1 of each, run 2 of each, ...) on the same prompt:
batch 1, greedy, EOS disabled, ``--threads`` threads everywhere, median of ``--runs`` runs after a
warm-up. Peers: transformers ``generate`` (sdpa), Optimum ORTModelForCausalLM fp32 and dynamic int8,
onnxruntime-genai fp32/int8/int4 (Llama only: it has no GPT-2 builder). The decode ceiling is
read bandwidth (the faster of a torch and an onnxruntime fp32 matrix-vector product over >= 1 GiB,
measured at start) / weight bytes.

onnxruntime-genai's model builder needs transformers 5.x, which clashes with optimum-onnx, so the
script creates a plain venv (``--genai-venv``) from benchmarks/requirements-genai-builder.txt and
runs only the builder there. Main-env peers: benchmarks/requirements-peers.txt.

    python benchmarks/peers.py [--runs 5] [--threads 2] [--workdir DIR] [--only gpt2,llama] [--json]
    python benchmarks/peers.py --quick      # tiny configs, no genai, 2 runs: a CI smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_engines as pe  # noqa: E402

HERE = Path(__file__).resolve().parent
TORCH_PIN = "torch==2.13.0"
CONFIGS = {
    "gpt2": dict(kind="gpt2"),
    "llama": dict(kind="llama", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, intermediate_size=2048, vocab_size=32000, max_position_embeddings=2048),
}
QUICK = {
    "gpt2": dict(kind="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=256),
    "llama": dict(kind="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, max_position_embeddings=256),
}


def measure_bandwidth(threads: int, gib: float = 1.0) -> dict[str, float]:
    """Streaming read GB/s of an fp32 matrix-vector product over ``gib`` GiB with ``threads``
    threads, two ways: torch ``mv`` and an onnxruntime MatMul (weight as initializer, as in a
    decode step). The higher one is the ceiling: both read the same bytes, one reads them faster."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    cols = 4096
    rows = int(gib * 2**30) // (4 * cols)
    torch.set_num_threads(threads)
    matrix = torch.rand(rows, cols)
    vector = torch.rand(cols)
    torch_s = _best_time(functools.partial(torch.mv, matrix, vector))
    weight = matrix.numpy().T  # [cols, rows] view: x[1, cols] @ W reads every byte once
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])],
        [numpy_helper.from_array(np.ascontiguousarray(weight), "W")])
    del matrix, weight
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    del graph
    feeds = {"x": np.random.default_rng(0).random((1, cols), dtype=np.float32)}
    ort_s = _best_time(lambda: session.run(None, feeds))
    nbytes = rows * cols * 4
    return {"torch_mv": nbytes / torch_s / 1e9, "ort_matmul": nbytes / ort_s / 1e9}


def _best_time(call, repeats: int = 5) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def make_hf_folder(spec: dict, folder: Path, seed: int) -> int:
    """Random-weight HF checkpoint for ``spec``; returns the weight bytes read per token (fp32)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    args = {k: v for k, v in spec.items() if k != "kind"}
    if spec["kind"] == "gpt2":
        config, cls = GPT2Config(**args), GPT2LMHeadModel
    else:
        config, cls = LlamaConfig(tie_word_embeddings=False, **args), LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():
        save_tokenizer(folder, model.config.vocab_size)
    # Per token: every matrix once, the embedding table only when it is also the LM head.
    params = {id(p): p for p in model.parameters()}.values()
    per_token = sum(p.numel() for p in params if p.dim() == 2)
    if spec["kind"] == "gpt2":
        per_token -= config.n_positions * config.n_embd  # position table: one row per token
    elif not config.tie_word_embeddings:
        per_token -= config.vocab_size * config.hidden_size  # input embedding: one row per token
    return 4 * per_token


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer ("t0".."tN"): genai's builder refuses a folder without one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(folder)


def build_gptedge(hf_dir: Path, work: Path) -> dict[str, Path]:
    """fp32 bundle + quantized copies; kept from an earlier run when ``work`` holds them, built by
    this gptedge (same version, with model_ort) and, for quantized ones, with the same config."""
    from gptedge.exporter import ExportConfig, export
    from gptedge.quantize import Int4Config, Int8DynamicConfig, quantize
    from gptedge.quantize.config import config_record

    bundles = {"fp32": work / "gptedge-fp32", "int8": work / "gptedge-int8", "int4": work / "gptedge-int4",
               "int8-b32": work / "gptedge-int8-b32"}
    if not _current(bundles["fp32"], None):
        export(hf_dir, ExportConfig(allow_missing_tokenizer=True, validate=False, overwrite=True), bundles["fp32"])
    # int8: block 128 (the speed setting; the default is 32 since issue 16, for SmolLM2's quality);
    # int8-b32: the same block size as onnxruntime-genai's int8, for a like-for-like row
    configs = {"int8": Int8DynamicConfig(block_size=128), "int4": Int4Config(),
               "int8-b32": Int8DynamicConfig(block_size=32)}
    for name, config in configs.items():
        if not _current(bundles[name], config_record(config)):
            quantize(bundles["fp32"], config, bundles[name], max_ppl_increase=float("inf"), overwrite=True)
    return bundles


def _current(bundle: Path, config: dict | None) -> bool:
    from gptedge.runtime import __version__

    path = bundle / "manifest.json"
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text())
    built_with = manifest.get("tools", {}).get("gptedge")
    last = manifest.get("history", [{}])[-1]
    variant = manifest.get("files", {}).get("model_ort")
    if built_with != __version__ or variant is None or (config is not None and last.get("config") != config):
        return False
    import onnx

    from gptedge.runtime import contract

    # a cached variant from before its lengths came from the positions reads the mask, which the
    # runtime no longer binds per step: rebuild it
    graph = onnx.load(str(bundle / variant["path"]), load_external_data=False).graph
    return not any(contract.ATTENTION_MASK in node.input for node in graph.node)


def genai_venv(venv: Path) -> Path:
    """A plain venv with the genai model builder (torch pinned to the CPU wheel, transformers 5.x)."""
    python = venv / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", "import onnxruntime_genai.models.builder"],
                                           capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    # The CPU wheel: a local one through PIP_FIND_LINKS, else PyTorch's CPU index (no CUDA downloads).
    subprocess.run([*pip, TORCH_PIN, "--extra-index-url", "https://download.pytorch.org/whl/cpu"], check=True)
    subprocess.run([*pip, TORCH_PIN, "-r", str(HERE / "requirements-genai-builder.txt")], check=True)
    return python


def build_genai(hf_dir: Path, work: Path, python: Path) -> dict[str, Path]:
    out = {}
    for precision in ("fp32", "int8", "int4"):
        target = work / f"genai-{precision}"
        if not (target / "genai_config.json").is_file():
            done = subprocess.run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o",
                                   str(target), "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode:
                raise RuntimeError(f"genai builder failed for {precision}:\n{done.stderr[-3000:]}")
        out[precision] = target
    return out


def engines_for(key: str, spec: dict, work: Path, args: argparse.Namespace) -> tuple[list[pe.Engine], int]:
    hf_dir = work / "hf"
    weight_bytes = make_hf_folder(spec, hf_dir, args.seed)
    bundles = build_gptedge(hf_dir, work)
    engines = [pe.Engine("transformers", key, "fp32", pe.hf_runner(pe.transformers_engine(hf_dir)))]
    for precision, model in pe.optimum_engines(hf_dir, work, args.threads).items():
        engines.append(pe.Engine("optimum-ort", key, precision, pe.hf_runner(model)))
    if spec["kind"] == "llama" and not args.quick and not args.no_genai:
        for precision, folder in build_genai(hf_dir, work, genai_venv(args.genai_venv)).items():
            engines.append(pe.Engine("onnxruntime-genai", key, precision, pe.genai_runner(folder, args.threads)))
    for precision, bundle in bundles.items():
        engines.append(pe.Engine("gptedge", key, precision, pe.gptedge_runner(bundle, args.threads), gptedge=True))
    return engines, weight_bytes


def race(engines: list[pe.Engine], prompts: dict[str, list[int]], args: argparse.Namespace) -> dict:
    logging.getLogger().setLevel(logging.WARNING)  # onnxruntime's quantizer turns INFO on at import
    for engine in engines:  # warm-up
        engine.run(prompts[engine.model], 8)
    samples: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(engines))}
    for _ in range(args.runs):
        for i, engine in enumerate(engines):
            samples[i].append(engine.run(prompts[engine.model], args.new_tokens))
    return {i: (statistics.median(s[0] for s in rows), statistics.median(s[1] for s in rows))
            for i, rows in samples.items()}


def report(engines: list[pe.Engine], medians: dict, ceilings: dict, bandwidth: float,
           args: argparse.Namespace) -> list[dict]:
    rows = []
    for i, engine in enumerate(engines):
        ttft, tps = medians[i]
        row = {"model": engine.model, "engine": engine.name, "precision": engine.precision,
               "ttft_ms": round(1000 * ttft, 1), "decode_tok_s": round(tps, 1)}
        bytes_per_token = ceilings[engine.model] / {"fp32": 1, "int8": 4, "int4": 8}[engine.precision[:4]]
        row["ceiling_fraction"] = round(tps * bytes_per_token / (bandwidth * 1e9), 2)
        if not engine.gptedge:
            ours = next((j for j, e in enumerate(engines) if e.gptedge and e.model == engine.model
                         and e.precision == engine.precision), None)
            if ours is not None:  # gptedge / peer: > 1 is better for decode, < 1 for TTFT
                row["gptedge_decode_x"] = round(medians[ours][1] / tps, 2)
                row["gptedge_ttft_x"] = round(medians[ours][0] / ttft, 2)
        rows.append(row)
    return rows


def print_table(rows: list[dict], bandwidths: dict[str, float], ceilings: dict, args: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    bandwidth = max(bandwidths.values())
    print(f"batch 1, {args.prompt_len} prompt + {args.new_tokens} new tokens, greedy, {args.threads} threads, "
          f"median of {args.runs} alternating runs; load average at the end {load:.2f}")
    measured = ", ".join(f"{name} {value:.1f}" for name, value in bandwidths.items())
    print(f"read bandwidth {bandwidth:.1f} GB/s (fp32 mat-vec over 1 GiB: {measured}) -> fp32 decode ceiling: " +
          ", ".join(f"{k} {bandwidth * 1e9 / b:.0f} tok/s" for k, b in ceilings.items()))
    print("| model | engine | precision | TTFT ms | decode tok/s | of ceiling | gptedge decode x | gptedge TTFT x |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['engine']} | {r['precision']} | {r['ttft_ms']} | {r['decode_tok_s']} | "
              f"{r['ceiling_fraction']} | {r.get('gptedge_decode_x', '')} | {r.get('gptedge_ttft_x', '')} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="gpt2,llama", help="comma-separated: gpt2, llama")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "gptedge-peers")
    parser.add_argument("--genai-venv", type=Path, default=Path.home() / ".cache" / "gptedge-genai-venv")
    parser.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai (no second venv)")
    parser.add_argument("--quick", action="store_true", help="tiny configs, no genai, 2 runs of 16 tokens")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.new_tokens, args.prompt_len = min(args.runs, 2), min(args.new_tokens, 16), 8
        args.workdir = args.workdir / "quick" if args.workdir.name != "quick" else args.workdir
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    import numpy as np

    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    bandwidths = measure_bandwidth(args.threads, 0.0625 if args.quick else 1.0)
    bandwidth = max(bandwidths.values())
    specs = QUICK if args.quick else CONFIGS
    engines, ceilings, prompts = [], {}, {}
    for key in args.only.split(","):
        work = args.workdir / key
        work.mkdir(parents=True, exist_ok=True)
        found, ceilings[key] = engines_for(key, specs[key], work, args)
        engines += found
        vocab = specs[key].get("vocab_size", 50257)
        prompts[key] = np.random.default_rng(args.seed).integers(3, vocab, args.prompt_len).tolist()
    medians = race(engines, prompts, args)
    rows = report(engines, medians, ceilings, bandwidth, args)
    if args.json:
        print(json.dumps({"bandwidth_gb_s": bandwidth, "bandwidths_gb_s": bandwidths, "rows": rows,
                          "load": os.getloadavg()[0]}, indent=2))
    else:
        print_table(rows, bandwidths, ceilings, args)
    return rows


if __name__ == "__main__":
    main()
