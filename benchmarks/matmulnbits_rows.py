"""Is onnxruntime's MatMulNBits row-exact (a row's output independent of the other rows), and what
does accuracy level 0 (float32 compute) cost? One node with random 8-/4-bit blocks, in one run.

    python benchmarks/matmulnbits_rows.py [--threads 2] [--k 768] [--n 2048] [--block 32]

For each bits x accuracy level: microseconds per call at M = 1, 2, 8 rows, and the largest
difference between row 0 computed alone and computed beside 15 other rows (0 = row-exact).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def node_model(bits: int, accuracy: int, k: int, n: int, block: int) -> bytes:
    """A one-node graph ``Y = MatMulNBits(A [M, k])`` with random blocks, scales and zero points."""
    blocks, rng = k // block, np.random.default_rng(0)
    weights = rng.integers(0, 255, size=(n, blocks, block * bits // 8), dtype=np.uint8)
    scales = rng.random(n * blocks).astype(np.float32) * 0.01
    zero_points = rng.integers(0, 255, size=n * (blocks if bits == 8 else (blocks + 1) // 2), dtype=np.uint8)
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=block, accuracy_level=accuracy)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(a, name) for a, name in
                               ((weights, "B"), (scales, "S"), (zero_points, "Z"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=768)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    rows = np.random.default_rng(1).standard_normal((16, args.k)).astype(np.float32)
    print(f"K={args.k} N={args.n} block {args.block}, {args.threads} threads, onnxruntime {ort.__version__}")
    print("| bits | accuracy level | us/call M=1 | M=2 | M=8 | max row-0 diff, alone vs 16 rows |\n|---|---|---|---|---|---|")
    for bits in (8, 4):
        for accuracy in (4, 0):
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(node_model(bits, accuracy, args.k, args.n, args.block), options,
                                           providers=["CPUExecutionProvider"])
            timings = []
            for m in (1, 2, 8):
                session.run(None, {"A": rows[:m]})
                start = time.perf_counter()
                for _ in range(args.calls):
                    session.run(None, {"A": rows[:m]})
                timings.append(f"{(time.perf_counter() - start) / args.calls * 1e6:,.0f}")
            alone = session.run(None, {"A": rows[:1]})[0][0]
            batched = session.run(None, {"A": rows})[0][0]
            print(f"| {bits} | {accuracy} | {' | '.join(timings)} | {float(np.abs(alone - batched).max()):.3g} |")


if __name__ == "__main__":
    main()
