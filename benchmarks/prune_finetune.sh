#!/usr/bin/env bash
# The README's pruning-recovery table: prune at export time one-shot and with a recovery fine-tune
# on the training text, then score every bundle on the held-out text (same model as quantize_table.sh).
set -e
export OUT=${OUT:-/tmp/gptedge-quant}; mkdir -p $OUT
cd "$(dirname "$0")/.."
export TEXT=${TEXT:-../shared/data/tinyshakespeare.txt}
STEPS=${STEPS:-200}
python - <<'PY'
import os
from gptedge.exporter.training.corpus import load_corpus
from gptedge.exporter.training.train import TrainConfig, matches, train_on
text = open(os.environ["TEXT"], encoding="utf-8").read()
cut = int(len(text) * 0.9)
open(os.environ["OUT"] + "/train.txt", "w").write(text[:cut]); open(os.environ["OUT"] + "/val.txt", "w").write(text[cut:])
config = TrainConfig(text=os.environ["TEXT"], out_dir=os.environ["OUT"] + "/ckpt", steps=600, overwrite=True)
corpus = load_corpus(config.text)
if not matches(config.out_dir / "ckpt.pt", config, corpus):  # quantize_table.sh's model: reuse it
    train_on(corpus, config)
PY
FT="--finetune-steps $STEPS --finetune-text $OUT/train.txt"
gptedge export $OUT/ckpt -o $OUT/fp32 --overwrite
gptedge export $OUT/ckpt -o $OUT/x24 --prune 2:4 --overwrite
gptedge export $OUT/ckpt -o $OUT/x24ft --prune 2:4 $FT --overwrite
for S in 25 50; do
  gptedge export $OUT/ckpt -o $OUT/xst$S --prune structured --sparsity 0.$S --overwrite
  gptedge export $OUT/ckpt -o $OUT/xst${S}ft --prune structured --sparsity 0.$S $FT --overwrite
done
gptedge export $OUT/ckpt -o $OUT/xsth --prune structured --sparsity 0.25 --prune-heads 0.5 --overwrite
gptedge export $OUT/ckpt -o $OUT/xsthft --prune structured --sparsity 0.25 --prune-heads 0.5 $FT --overwrite
python benchmarks/prune_finetune.py "$OUT" "$STEPS"
