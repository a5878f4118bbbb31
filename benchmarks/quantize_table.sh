#!/usr/bin/env bash
# The README's quantization table: train a char GPT on tinyshakespeare, export, quantize every mode.
set -e
export OUT=${OUT:-/tmp/gptedge-quant}; mkdir -p $OUT
cd "$(dirname "$0")/.."
export TEXT=${TEXT:-../shared/data/tinyshakespeare.txt}
python - <<'PY'
import os
text = open(os.environ["TEXT"], encoding="utf-8").read()
cut = int(len(text) * 0.9)
open(os.environ["OUT"] + "/train.txt", "w").write(text[:cut]); open(os.environ["OUT"] + "/val.txt", "w").write(text[cut:])
from gptedge.exporter.training.train import TrainConfig, train
train(TrainConfig(text=os.environ["TEXT"], out_dir=os.environ["OUT"] + "/ckpt", steps=600, overwrite=True))
PY
gptedge export $OUT/ckpt -o $OUT/fp32 --overwrite
Q="--eval $OUT/val.txt --max-tokens 20000 --calib $OUT/train.txt --overwrite"
gptedge quantize $OUT/fp32 -o $OUT/fp16 --mode fp16 $Q
gptedge quantize $OUT/fp32 -o $OUT/int8dyn --mode int8-dynamic $Q
gptedge quantize $OUT/fp32 -o $OUT/int8 --mode int8 $Q
gptedge quantize $OUT/fp32 -o $OUT/int8sq --mode int8 --calib-method entropy --smoothquant 0.5 $Q
gptedge quantize $OUT/fp32 -o $OUT/int4 --mode int4 $Q
gptedge quantize $OUT/fp32 -o $OUT/int4qdq --mode int4-qdq $Q
gptedge quantize $OUT/fp32 -o $OUT/p24 --mode prune --prune-method 2:4 --sparsity 0.5 --max-ppl-increase 1000 $Q
gptedge quantize $OUT/fp32 -o $OUT/pstruct --mode prune --prune-method structured --sparsity 0.5 --max-ppl-increase 1000 $Q
gptedge quantize $OUT/fp32 -o $OUT/pstruct25 --mode prune --prune-method structured --sparsity 0.25 --max-ppl-increase 1000 $Q
python benchmarks/quantize_table.py "$OUT"
