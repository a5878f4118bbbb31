"""Export a nanoGPT checkpoint to a bundle (ONNX with KV cache, parity-checked).

    python examples/01_export.py --ckpt out/ckpt.pt --out bundles/mine   # your nanoGPT checkpoint
    python examples/01_export.py --out bundles/tiny                      # trains a tiny one first

Without --ckpt a tiny GPT is trained on the Python standard library's source (a few minutes;
--tiny: seconds) and written as nanoGPT's ckpt.pt + meta.pkl, then exported.
"""

import argparse
from pathlib import Path

from gptedge.exporter import ExportConfig, export
from gptedge.exporter.demo import SIZES
from gptedge.exporter.training.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="nanoGPT ckpt.pt (meta.pkl beside it); default: train one")
    parser.add_argument("--out", type=Path, default=Path("bundles/tiny"), help="bundle folder to write")
    parser.add_argument("--tiny", action="store_true", help="train the seconds-long tiny model")
    parser.add_argument("--steps", type=int, help="training steps (default: the size's)")
    args = parser.parse_args()

    ckpt = args.ckpt
    if ckpt is None:
        sizes = dict(SIZES["tiny" if args.tiny else "small"])
        sizes["steps"] = args.steps or sizes["steps"]
        sizes["eval_interval"] = sizes["steps"]
        ckpt = train(TrainConfig(out_dir=args.out.with_name(args.out.name + "-ckpt"), overwrite=True, **sizes))
        print(f"trained {ckpt}")
    bundle = export(ckpt, ExportConfig(overwrite=True), args.out)
    parity = bundle.manifest.parity
    print(f"exported {bundle.path}: {bundle.manifest.architecture.num_layers} layers, "
          f"vocab {bundle.manifest.architecture.vocab_size}, parity max-abs {parity['max_abs']:.1e} "
          f"vs float64 source, top-1 agreement {parity['top1_agreement']:.0%}")


if __name__ == "__main__":
    main()
