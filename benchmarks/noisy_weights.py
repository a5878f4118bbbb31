"""Copy a float32 bundle and add Gaussian noise to every linear weight: a model off any grid.

    python benchmarks/noisy_weights.py SRC_BUNDLE DST_BUNDLE [--scale 0.1] [--seed 0]

SmolLM2's GGUF weights sit on a Q4_1 grid (blocks of 32 with a float minimum), which asymmetric
int4 blocks express exactly; quantization methods are compared on this noisy copy too (README,
weight-only int4). Noise ``N(0, (scale * std(W))**2)`` per matrix, written in place into the copy's
``model.onnx.data`` (every graph of the bundle reads the same bytes).
"""
import argparse
import shutil
import sys

import numpy as np
import onnx


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shutil.copytree(args.src, args.dst, dirs_exist_ok=True)
    model = onnx.load(f"{args.src}/model.onnx", load_external_data=False)
    data = np.memmap(f"{args.dst}/model.onnx.data", dtype=np.uint8, mode="r+")
    rng = np.random.default_rng(args.seed)
    for init in model.graph.initializer:
        if len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT or not init.name.endswith("weight_t"):
            continue
        where = {entry.key: int(entry.value) for entry in init.external_data if entry.key in ("offset", "length")}
        weight = data[where["offset"]:where["offset"] + where["length"]].view(np.float32)
        weight += (rng.standard_normal(weight.shape) * args.scale * weight.std()).astype(np.float32)
    data.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
