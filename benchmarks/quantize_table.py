"""Print the README's quantization table from the bundles quantize_table.sh wrote.

:func:`markdown` is the table writer benchmarks/real_model.py uses too.
"""
import json
import sys
from pathlib import Path

ROWS = [("fp16", "fp16"), ("int8dyn", "int8-dynamic"), ("int8", "int8 static (minmax)"),
        ("int8sq", "int8 static (entropy + SmoothQuant 0.5)"), ("int4", "int4 MatMulNBits (block 32)"),
        ("int4qdq", "int4-qdq (block 32)"), ("p24", "prune 2:4 (one-shot)"),
        ("pstruct25", "prune structured 25 % MLP"), ("pstruct", "prune structured 50 % MLP")]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(root: Path) -> None:
    rows = []
    for folder, label in ROWS:
        path = root / folder / "manifest.json"
        if not path.is_file():
            continue
        q = json.loads(path.read_text())["history"][-1]["quality"]
        if not rows:
            rows.append(["fp32 (source)", f"{q['size_mb_source']:.2f}", f"{q['ppl_source']:.4f}", "", "",
                         f"{q['decode_tok_s_source']:.0f}"])
        rows.append([label, f"{q['size_mb']:.2f}", f"{q['ppl']:.4f}", f"{q['ppl_increase_pct']:+.3f}",
                     f"{q['greedy_agreement']:.2f}", f"{q['decode_tok_s']:.0f}"])
    print(markdown(["bundle", "size MB", "perplexity", "delta %", "greedy agreement", "decode tok/s"], rows))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gptedge-quant"))
