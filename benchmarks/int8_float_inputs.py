"""Copy a static-int8 bundle with the activations of chosen linear layers left float (diagnosis).

    python benchmarks/int8_float_inputs.py INT8_BUNDLE OUT --weights .mlp.down.

Every MatMul whose int8 weight name contains one of ``--weights`` reads its float input instead of
the activation's QuantizeLinear/DequantizeLinear pair (weights stay int8), which is what
``quantize/int8.py``'s ``ALWAYS_FLOAT`` rule writes for the same search result. Only ``model.onnx``
(the scoring graph) is rewritten; the other files are hard links. Then, side by side:
``python benchmarks/window_ppl.py FP32 INT8_BUNDLE OUT``.
"""
import argparse
import os

import onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("out")
    parser.add_argument("--weights", nargs="+", default=[".mlp.down."])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.bundle):  # hard links: onnxruntime refuses external data outside the folder
        if name != "model.onnx" and not os.path.exists(os.path.join(args.out, name)):
            os.link(os.path.join(args.bundle, name), os.path.join(args.out, name))
    model = onnx.load(os.path.join(args.bundle, "model.onnx"), load_external_data=False)
    freed = 0
    for node in model.graph.node:
        if (node.op_type == "MatMul" and any(w in node.input[1] for w in args.weights)
                and node.input[0].endswith("_dequantized")):
            node.input[0] = node.input[0].removesuffix("_dequantized")
            freed += 1
    for op in ("DequantizeLinear", "QuantizeLinear"):  # drop the pairs nothing reads any more
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        kept = [n for n in model.graph.node if n.op_type != op or any(o in used for o in n.output)]
        del model.graph.node[:]
        model.graph.node.extend(kept)
    onnx.save(model, os.path.join(args.out, "model.onnx"))
    print(f"{freed} linear inputs left float -> {args.out}")


if __name__ == "__main__":
    main()
