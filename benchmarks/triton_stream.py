"""What serving a bundle through Triton's python backend costs per token, against the runtime in-process.

    python benchmarks/triton_stream.py BUNDLE [--prompt TEXT] [--new-tokens 64] [--threads 2] [--runs 3]

Writes a `gptedge triton` python-backend repository for BUNDLE into a temporary folder, serves it
with PyTriton's `tritonserver` on loopback (the Debian-python venv of README "Triton Inference
Server"; tests/tritonserver_helper.py), streams the prompt over gRPC and reports the client-side
TTFT and decode tok/s (greedy, EOS off), alternating with `Generator.stream` in this process on the
same bundle and threads. Median of ``--runs``.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tritonserver_helper import TritonServer, unavailable  # noqa: E402

from gptedge.runtime import load  # noqa: E402
from gptedge.runtime.triton.repository import TritonConfig, write_repository  # noqa: E402


def timed(pieces) -> tuple[float, float, int]:
    """(TTFT s, decode tok/s, responses) of an iterator of (arrival time, token count)."""
    start = time.perf_counter()
    arrivals = [(time.perf_counter(), n) for n in pieces]
    tokens = sum(n for _, n in arrivals)
    first = arrivals[0][0]
    decode = (tokens - arrivals[0][1]) / (arrivals[-1][0] - first) if arrivals[-1][0] > first else 0.0
    return first - start, decode, len(arrivals)


def triton_pieces(url: str, prompt: str, new_tokens: int):
    import tritonclient.grpc as grpcclient

    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    inputs = {"text_input": np.array([prompt.encode()], dtype=object),
              "max_tokens": np.array([new_tokens], dtype=np.int32), "ignore_eos": np.array([True])}
    tensors = []
    for name, array in inputs.items():
        kind = {"text_input": "BYTES", "max_tokens": "INT32", "ignore_eos": "BOOL"}[name]
        tensor = grpcclient.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    client.async_stream_infer("gptedge", tensors)
    try:
        while True:
            result, error = answers.get(timeout=300)
            if error is not None:
                raise RuntimeError(str(error))
            yield len(result.as_numpy("token_ids"))
            if result.as_numpy("finish_reason")[0]:
                return
    finally:
        client.stop_stream()
        client.close()


def local_pieces(gen, prompt: str, new_tokens: int):
    from gptedge.runtime.sampling import SamplingOptions
    from gptedge.runtime.triton.python_model import stream_tokens

    for chunk in stream_tokens(gen, prompt, SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True)):
        yield len(chunk.token_ids)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--prompt", default="The history of the city begins with")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    reason = unavailable()
    if reason:
        print(f"cannot start tritonserver: {reason}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="triton-bench-"))
    write_repository(args.bundle, TritonConfig(threads=args.threads, link=True), work / "repo")
    rows: dict[str, list[tuple[float, float, int]]] = {"triton (python backend, gRPC stream)": [], "in-process": []}
    with TritonServer(work / "repo", work) as server, load(args.bundle, backend="ort-cpu", threads=args.threads) as gen:
        for _ in range(args.runs + 1):  # the first round warms both up and is dropped
            rows["triton (python backend, gRPC stream)"].append(
                timed(triton_pieces(server.grpc_url, args.prompt, args.new_tokens)))
            rows["in-process"].append(timed(local_pieces(gen, args.prompt, args.new_tokens)))
    print(f"| {args.bundle.name}, {args.new_tokens} new tokens, {args.threads} threads | TTFT ms | decode tok/s | responses |")
    print("|---|---|---|---|")
    for name, runs in rows.items():
        runs = runs[1:]
        print(f"| {name} | {statistics.median(r[0] for r in runs) * 1000:.1f} | "
              f"{statistics.median(r[1] for r in runs):.1f} | {runs[0][2]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
