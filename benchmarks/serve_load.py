"""Load figures of `gptedge serve`: concurrent streaming clients, then a disconnect soak.

    python benchmarks/serve_load.py [--bundle DIR] [--workdir DIR] [--clients 1,4,8,16]
                                    [--new-tokens 64] [--soak 1000] [--threads 2] [--json]

1. The model: Llama 125M (the peers' config, benchmarks/peers.py: 768 x 12 layers, 12 heads, 4 kv
   heads, vocab 32000, random weights) quantized int8 (Int8DynamicConfig), built in a child process
   into --workdir (default: peers.py's cache, so both scripts share it) unless --bundle is given.
2. `gptedge serve` runs as a subprocess (--max-batch 16) on a free loopback port.
3. Serial reference: each of 16 prompts streamed alone, greedy, EOS off.
4. For each client count c: c clients stream the 16 requests (each takes the next one when done);
   aggregate decode tok/s = generated tokens / wall time; TTFT and inter-token latency p50/p99
   from chunk arrival times; every output is compared with the serial reference.
5. Soak: --soak requests from 16 clients, a third of them disconnecting after a random number of
   chunks; counts server errors (5xx or an error event), then checks /health (0 running, 0 queued:
   no leaked rows) and the server's RSS (mean of the first and last 10 % of samples).
Exit status 1 when an output differs, a server error happened, or a row leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
N_PROMPTS = 16


def build_bundle(work: Path) -> Path:
    """The int8 Llama 125M bundle (peers.py's HF folder + export + Int8DynamicConfig), built in a
    child process so torch never sits in this one."""
    bundle = work / "gptedge-int8"
    if (bundle / "manifest.json").is_file():
        return bundle
    code = f"""
import sys; sys.path.insert(0, {str(HERE)!r})
from pathlib import Path
import peers
from gptedge.exporter import ExportConfig, export
from gptedge.quantize import Int8DynamicConfig, quantize
work = Path({str(work)!r}); work.mkdir(parents=True, exist_ok=True)
peers.make_hf_folder(peers.CONFIGS["llama"], work / "hf", seed=0)
if not (work / "gptedge-fp32" / "manifest.json").is_file():
    export(work / "hf", ExportConfig(allow_missing_tokenizer=True, validate=False, overwrite=True), work / "gptedge-fp32")
quantize(work / "gptedge-fp32", Int8DynamicConfig(), work / "gptedge-int8", max_ppl_increase=float("inf"), overwrite=True)
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return bundle


def start_server(bundle: Path, threads: int, max_batch: int, portable: bool) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptedge.runtime.cli", "serve", str(bundle), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "1024", "--threads", str(threads),
                             *(["--portable-batch"] if portable else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("server did not start in 60 s")


async def stream_one(client: httpx.AsyncClient, url: str, prompt: list[int], new_tokens: int,
                     leave_after: int | None = None) -> dict:
    """One streamed completion: text, chunk arrival times, status; ``leave_after`` chunks then hang up."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    times, text, error = [], [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": (await r.aread()).decode(), "times": [], "start": start}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
                break
            times.append(time.perf_counter())
            text.append(chunk["choices"][0]["text"])
            if leave_after is not None and len(times) >= leave_after:
                break  # leaving the block closes the connection mid-stream
    return {"status": 200, "error": error, "text": "".join(text), "times": times, "start": start}


async def run_clients(url: str, prompts: list[list[int]], clients: int, new_tokens: int) -> tuple[list[dict], float]:
    """``clients`` concurrent streams working through ``prompts``; returns results in prompt order."""
    results: list[dict] = [{} for _ in prompts]
    todo = list(range(len(prompts)))
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker() -> None:
            while todo:
                i = todo.pop(0)
                results[i] = await stream_one(client, url, prompts[i], new_tokens)

        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    results[0]["client_cpu_s"] = time.process_time() - cpu  # the load generator shares the CPUs
    return results, wall


def summarize(results: list[dict], wall: float, reference: list[str] | None) -> dict:
    tokens = sum(len(r["times"]) for r in results)
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    errors = sum(1 for r in results if r["status"] != 200 or r["error"])
    mismatches = sum(1 for r, want in zip(results, reference or []) if r.get("text") != want)
    ms = lambda xs, q: round(1000 * float(np.percentile(xs, q)), 1) if xs else None  # noqa: E731
    return {"requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
            "client_cpu_share": round(results[0].get("client_cpu_s", 0.0) / wall, 2),
            "aggregate_tok_s": round(tokens / wall, 1), "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "itl_p50_ms": ms(itl, 50), "itl_p99_ms": ms(itl, 99), "errors": errors, "mismatches": mismatches}


async def soak(url: str, prompts: list[list[int]], total: int, new_tokens: int, pid: int, seed: int) -> dict:
    """``total`` requests from 16 clients, a third hanging up early; server errors, leaks, RSS."""
    rng = random.Random(seed)
    proc = psutil.Process(pid)
    rss: list[int] = []
    errors, left = 0, 0
    todo = list(range(total))
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=24)) as client:
        async def worker() -> None:
            nonlocal errors, left
            while todo:
                i = todo.pop(0)
                leave = rng.randint(1, new_tokens - 1) if rng.random() < 1 / 3 else None
                result = await stream_one(client, url, prompts[i % len(prompts)], new_tokens, leave)
                errors += result["status"] >= 500 or bool(result["error"])
                left += leave is not None
                rss.append(proc.memory_info().rss)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(16)))
        wall = time.perf_counter() - start
    await asyncio.sleep(0.5)  # the last hang-ups reach the scheduler's next step boundary
    health = httpx.get(url + "/health").json()
    tenth = max(len(rss) // 10, 1)
    return {"requests": total, "disconnects": left, "server_errors": errors, "wall_s": round(wall, 1),
            "leaked_rows": health["running"] + health["queued"],
            "rss_first_mib": round(statistics.mean(rss[:tenth]) / 2**20, 1),
            "rss_last_mib": round(statistics.mean(rss[-tenth:]) / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, help="serve this bundle instead of building Llama 125M int8")
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "gptedge-peers" / "llama")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--soak", type=int, default=1000, help="requests in the disconnect soak (0: skip)")
    p.add_argument("--soak-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--portable-batch", action="store_true", help="serve with --portable-batch (A/B of the batch graph)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    bundle = args.bundle or build_bundle(args.workdir)
    vocab = json.loads((bundle / "manifest.json").read_text())["architecture"]["vocab_size"]
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, vocab, args.prompt_len - 4 + i % 8).tolist() for i in range(N_PROMPTS)]
    server, url = start_server(bundle, args.threads, args.max_batch, args.portable_batch)
    report: dict = {"bundle": str(bundle), "load_before": os.getloadavg()[0], "levels": {}}
    try:
        serial, wall = asyncio.run(run_clients(url, prompts, 1, args.new_tokens))
        reference = [r["text"] for r in serial]
        report["levels"]["1"] = summarize(serial, wall, reference)
        for clients in (int(c) for c in args.clients.split(",")):
            if clients != 1:
                results, wall = asyncio.run(run_clients(url, prompts, clients, args.new_tokens))
                report["levels"][str(clients)] = summarize(results, wall, reference)
        if args.soak:
            report["soak"] = asyncio.run(soak(url, prompts, args.soak, args.soak_tokens, server.pid, args.seed))
    finally:
        server.terminate()
        report["server_exit"] = server.wait(timeout=60)
    report["load_after"] = os.getloadavg()[0]
    print_report(report, args)
    bad = any(level["mismatches"] or level["errors"] for level in report["levels"].values()) or \
        (args.soak and (report["soak"]["server_errors"] or report["soak"]["leaked_rows"]))
    return 1 if bad else 0


def print_report(report: dict, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(report, indent=2))
        return
    one = report["levels"]["1"]["aggregate_tok_s"]
    graph = "portable graph, padded" if args.portable_batch else "per-row lengths where the bundle has model_ort"
    print(f"{report['bundle']} ({graph}): {args.new_tokens} new tokens, greedy, {args.threads} threads, "
          f"load {report['load_before']:.1f} -> {report['load_after']:.1f}")
    print("| clients | aggregate tok/s | x 1 client | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors | differ "
          "| client CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for clients, s in report["levels"].items():
        print(f"| {clients} | {s['aggregate_tok_s']} | {s['aggregate_tok_s'] / one:.2f} | {s['ttft_p50_ms']} / "
              f"{s['ttft_p99_ms']} | {s['itl_p50_ms']} / {s['itl_p99_ms']} | {s['errors']} | {s['mismatches']} "
              f"| {s['client_cpu_share']:.2f} |")
    if "soak" in report:
        print("soak:", json.dumps(report["soak"]))
    print("server exit status after SIGTERM:", report["server_exit"])


if __name__ == "__main__":
    sys.exit(main())
