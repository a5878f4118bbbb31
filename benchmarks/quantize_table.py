"""Print the README's quantization table from the bundles quantize_table.sh wrote."""
import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gptedge-quant")
rows = [("fp16", "fp16"), ("int8dyn", "int8-dynamic"), ("int8", "int8 static (minmax)"),
        ("int8sq", "int8 static (entropy + SmoothQuant 0.5)"), ("int4", "int4 MatMulNBits (block 32)"),
        ("int4qdq", "int4-qdq (block 32)"), ("p24", "prune 2:4 (one-shot)"),
        ("pstruct25", "prune structured 25 % MLP"), ("pstruct", "prune structured 50 % MLP")]
print("| bundle | size MB | perplexity | delta % | greedy agreement | decode tok/s |")
print("|---|---:|---:|---:|---:|---:|")
first = True
for folder, label in rows:
    path = root / folder / "manifest.json"
    if not path.is_file():
        continue
    q = json.loads(path.read_text())["history"][-1]["quality"]
    if first:
        print(f"| fp32 (source) | {q['size_mb_source']:.2f} | {q['ppl_source']:.4f} | | | {q['decode_tok_s_source']:.0f} |")
        first = False
    print(f"| {label} | {q['size_mb']:.2f} | {q['ppl']:.4f} | {q['ppl_increase_pct']:+.3f} | "
          f"{q['greedy_agreement']:.2f} | {q['decode_tok_s']:.0f} |")
