"""Quantize a bundle to int8 (static, calibrated) and int4, and compare perplexity.

    python examples/02_quantize.py bundles/tiny --text data.txt

--text is calibration text in the model's domain; its last 10 % is held out for perplexity
(default: the Python standard library's source, which the demo model was trained on).
"""

import argparse
import tempfile
from pathlib import Path

from gptedge.exporter.training.corpus import load_corpus
from gptedge.quantize import Int4Config, Int8Config, perplexity, quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="fp32 bundle folder (from 01_export.py)")
    parser.add_argument("--text", type=Path, help="calibration/evaluation text (UTF-8)")
    parser.add_argument("--max-tokens", type=int, default=10_000, help="held-out tokens to score")
    args = parser.parse_args()

    text = args.text
    if text is None:  # the stdlib corpus, written to a file because quantize() reads files
        text = Path(tempfile.mkdtemp()) / "corpus.txt"
        text.write_text(load_corpus(None).text[:200_000], encoding="utf-8")
    held_out = text.with_name(text.stem + ".heldout.txt")
    content = text.read_text(encoding="utf-8")
    held_out.write_text(content[int(0.9 * len(content)):], encoding="utf-8")

    base = perplexity(args.bundle, held_out, max_tokens=args.max_tokens)
    print(f"fp32: perplexity {base.ppl:.3f} on {base.tokens} tokens")
    for name, config in (("int8", Int8Config()), ("int4", Int4Config())):
        out = args.bundle.with_name(f"{args.bundle.name}-{name}")
        bundle = quantize(args.bundle, config, out, calib_text=text, max_tokens=args.max_tokens, overwrite=True)
        quality = bundle.manifest.history[-1]["quality"]
        print(f"{name}: {out} perplexity {quality['ppl']:.3f} ({quality['ppl_increase_pct']:+.2f} %), "
              f"{quality['size_mb']:.2f} MB vs {quality['size_mb_source']:.2f} MB")


if __name__ == "__main__":
    main()
