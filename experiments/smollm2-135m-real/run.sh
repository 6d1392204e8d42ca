#!/usr/bin/env bash
# The study's experiment at CPU scale, end to end: split the real ECInstruct rows by item, evaluate
# SmolLM2-135M-Instruct zero-shot, QLoRA-train it on the training items, evaluate the adapter, and
# read what the adapter learnt beyond each task's label prior (decision.py).
#
#   bash experiments/smollm2-135m-real/run.sh PATH/TO/ecinstruct [WORKDIR]
#
# PATH/TO/ecinstruct holds test_rows_dev.jsonl, ave_train_100.jsonl (real ECInstruct rows).
# WORKDIR (default runs/smollm2-135m-real) receives rows.jsonl, zero-shot/, train/, finetuned/.
# The training recipe is train.json here (train.py --config); LR and EPOCHS (environment) override it; REPORT (default this folder)
# is where report.py writes the tables and copies of the logs.
# On 2 CPU cores: zero-shot 15 min, about 25 min per training epoch, evaluation 6 min, decision.py 5 min.
# Each step is skipped when its output is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${1:?usage: run.sh PATH/TO/ecinstruct [WORKDIR]}
WORK=${2:-runs/smollm2-135m-real}
PY=${PY:-.venv/bin/python}
REPORT=${REPORT:-experiments/smollm2-135m-real}
GGUF=$($PY -c "from model.gguf import packaged_smollm2; print(packaged_smollm2())")
SETTINGS=IND_Diverse_Instruction,IND_Single_Instruction,IND_Unseen_Instruction,OOD_Diverse_Instruction
# Answers are one letter, yes/no or one option's text; AVE's JSON list keeps the paper's 100.
MAX_NEW=100,MPC=40,PRP=8,PM=8,PSI=8

$PY experiments/smollm2-135m-real/make_split.py --shared "$SHARED" --out "$WORK"

[ -f "$WORK/zero-shot/metrics.json" ] || \
  $PY evaluate.py --model "$GGUF" --model-name "SmolLM2-135M-Instruct zero-shot" --dataset "$WORK/rows.jsonl" \
    --settings "$SETTINGS" --max-new-tokens "$MAX_NEW" --out "$WORK/zero-shot"

# The paper's recipe (NF4 base, bf16 compute, LoRA r16/alpha16/dropout0.1 on 7 projections + lm_head,
# lr 1e-4, cosine with 5% warm-up, cut-off 2048), scaled to 1,679 training rows: 16 sequences per step
# instead of 128 (105 steps an epoch instead of 13), 2 epochs instead of 3 (the CPU time budget).
[ -f "$WORK/train/adapter/adapter_model.safetensors" ] || \
  $PY train.py --config experiments/smollm2-135m-real/train.json --model "$GGUF" --dataset "$WORK/rows.jsonl" \
    ${LR:+--lr "$LR"} ${EPOCHS:+--epochs "$EPOCHS"} --out "$WORK/train" --resume auto

# The adapter with the lowest validation loss, on the NF4 base it was trained on, merged for generation.
[ -f "$WORK/finetuned/metrics.json" ] || \
  $PY evaluate.py --model "$GGUF" --quant nf4 --adapter "$WORK/train/best" \
    --model-name "SmolLM2-135M-Instruct + QLoRA (ours)" --dataset "$WORK/rows.jsonl" \
    --settings "$SETTINGS" --max-new-tokens "$MAX_NEW" --out "$WORK/finetuned"

mkdir -p "$REPORT"
$PY experiments/smollm2-135m-real/report.py --work "$WORK" --out "$REPORT"

# What the best adapter learnt beyond each task's label prior, read from the first answer token.
[ -f "$REPORT/decision.md" ] || \
  $PY experiments/smollm2-135m-real/decision.py --work "$WORK" --adapter "$WORK/train/best" --out "$REPORT/decision.md"
