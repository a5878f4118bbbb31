"""Does one decode step give a row the same logits alone (batch 1) as next to a copy of itself (batch 2)?

    python benchmarks/batch_invariance.py BUNDLE [--prompt TEXT] [--threads 2]

Prefills the prompt, then runs ONE decode step of ``model_ort.onnx`` (``model_last.onnx`` when the
bundle has no variant) with every node's output exposed, at batch 1 and at batch 2 (two identical
rows), and prints the largest logit difference, the top-2 logit gap, and the first nodes whose
output differs by more than 1e-5 relative -- each with how much its own input differed. A node whose
output differs far more than its input is where batching amplifies rounding (int8 ``MatMulNBits``
quantizing its activations is the case README's Serving section describes).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from gptedge.runtime import load
from gptedge.runtime.ort.session_options import session_options
from gptedge.runtime.serve.batch_cache import kv_arrays, prefill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. Paris is the capital of")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--show", type=int, default=5, help="how many diverging nodes to print")
    args = p.parse_args()
    gen = load(args.bundle, backend="ort-cpu", threads=args.threads)
    ids = gen.encode(args.prompt)
    state, logits = prefill(gen.backend, ids)
    kv = [a.copy() for a in kv_arrays(state)]
    graph = args.bundle / ("model_ort.onnx" if (args.bundle / "model_ort.onnx").is_file() else "model_last.onnx")
    model = onnx.load(graph, load_external_data=False)
    order = [o for n in model.graph.node for o in n.output if o]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in order)
    # the copy refers to the bundle's external data by relative path: save it beside the graph
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=args.bundle)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        session = ort.InferenceSession(tmp, session_options(args.threads), providers=["CPUExecutionProvider"])
    finally:
        os.remove(tmp)
    past = [i.name for i in session.get_inputs() if i.name.startswith("past")]
    token, length = int(logits.argmax()), len(ids)

    def run(batch: int) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.full((batch, 1), token), "attention_mask": np.ones((batch, length + 1), np.int64),
                 "position_ids": np.full((batch, 1), length)}
        feeds.update({name: value.repeat(batch, 0) for name, value in zip(past, kv)})
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))

    one, two = run(1), run(2)
    last = one["logits"][0, -1]
    top = np.sort(last)[-2:]
    print(f"{graph.name}: logits max |batch2 - batch1| = {np.abs(two['logits'][0, -1] - last).max():.3g}, "
          f"top-2 gap {top[1] - top[0]:.3g}")
    producer = {o: n for n in model.graph.node for o in n.output}
    shown = 0
    for name in order:
        a, b = np.asarray(one[name]), np.asarray(two[name])
        if a.dtype.kind != "f" or a.ndim == 0 or a.shape[0] != 1 or b.shape[0] != 2:
            continue
        diff, scale = float(np.abs(b[:1] - a).max()), float(np.abs(a).max()) or 1.0
        if diff / scale > 1e-5:
            node = producer[name]
            source = node.input[0]
            din = float(np.abs(np.asarray(two[source])[:1] - np.asarray(one[source])).max()) if source in one else None
            print(f"  {node.op_type:34s} {node.name:40s} output diff {diff:.3g} (max |out| {scale:.3g}), "
                  f"input diff {din if din is None else f'{din:.3g}'}")
            shown += 1
            if shown == args.show:
                break


if __name__ == "__main__":
    main()
