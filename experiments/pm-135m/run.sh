#!/usr/bin/env bash
# Product Matching, end to end: SmolLM2-135M-Instruct zero-shot, QLoRA-trained on ECInstruct's real PM train
# split, evaluated again on every PM test item we hold, then the first-answer-token analysis and the tables.
#
#   bash experiments/pm-135m/run.sh PATH/TO/ecinstruct [WORKDIR]
#
# PATH/TO/ecinstruct holds pm_train_val.jsonl, test_rows_dev.jsonl and ave_train_100.jsonl (real ECInstruct rows).
# WORKDIR (default runs/pm-135m) receives rows.jsonl, zero-shot/, train/, finetuned/, decision.md.
# The training recipe is experiments/pm-135m/train.json (train.py --config). Environment (defaults in brackets): LR,
# EPOCHS, BATCH sequences per step, EVAL_EVERY steps between validations and checkpoints [train.json's], ROWS training
# rows drawn from the train split [all], MULTITASK=1 adds the other tasks' rows, REPORT where report.py writes
# [experiments/pm-135m/report, or report-multitask], THREADS torch threads [all cores],
# ZERO_SHOT=generate evaluates the multi-task run's zero-shot rows again [merge: see merge_metrics.py].
# Each step is skipped when its output is already there; a stopped training run resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${1:?usage: run.sh PATH/TO/ecinstruct [WORKDIR]}
WORK=${2:-runs/pm-135m}
PY=${PY:-.venv/bin/python}
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
GGUF=$($PY -c "from model.gguf import packaged_smollm2; print(packaged_smollm2())")
SETTINGS=IND_Diverse_Instruction,IND_Single_Instruction,IND_Unseen_Instruction
TASKS=PM
MAX_NEW=8
if [ "${MULTITASK:-0}" = 1 ]; then
  TASKS=all
  SETTINGS=$SETTINGS,OOD_Diverse_Instruction
  MAX_NEW=100,MPC=40,PRP=8,PM=8,PSI=8      # AVE's JSON list keeps the paper's 100
fi
REPORT_DEFAULT=experiments/pm-135m/report
[ "${MULTITASK:-0}" = 1 ] && REPORT_DEFAULT=experiments/pm-135m/report-multitask
REPORT=${REPORT:-$REPORT_DEFAULT}

$PY experiments/pm-135m/make_rows.py --shared "$SHARED" --out "$WORK" $([ "${MULTITASK:-0}" = 1 ] && echo --multitask)

# Multi-task: its zero-shot rows were all evaluated by the committed zero-shot runs (same model, caps and rows), so
# their scores are merged from there unless ZERO_SHOT=generate asks for a new run.
if [ "${MULTITASK:-0}" = 1 ] && [ "${ZERO_SHOT:-merge}" = merge ] && [ ! -f "$WORK/zero-shot/metrics.json" ]; then
  $PY experiments/pm-135m/merge_metrics.py --rows "$WORK/rows.jsonl" --out "$WORK/zero-shot/metrics.json" \
    experiments/pm-135m/report/zero-shot_metrics.json experiments/smollm2-135m-real/zero-shot_metrics.json
fi
[ -f "$WORK/zero-shot/metrics.json" ] || \
  $PY evaluate.py --model "$GGUF" --model-name "SmolLM2-135M-Instruct zero-shot" --dataset "$WORK/rows.jsonl" \
    --tasks "$TASKS" --settings "$SETTINGS" --max-new-tokens "$MAX_NEW" --out "$WORK/zero-shot"

# The paper's QLoRA (NF4 base with double quantization, LoRA r16/alpha16/dropout 0.1 on the seven projections and
# lm_head, AdamW, cosine with 5% warm-up, best adapter by validation loss), scaled to the data: see results.md.
# bf16 compute where the CPU multiplies bf16 natively (AMX, AVX512-BF16), fp32 elsewhere.
DTYPE=fp32
grep -qw -e amx_bf16 -e avx512_bf16 /proc/cpuinfo 2>/dev/null && DTYPE=bf16
$PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" && DTYPE=bf16
[ -f "$WORK/train/adapter/adapter_model.safetensors" ] || \
  $PY train.py --config experiments/pm-135m/train.json --model "$GGUF" --dataset "$WORK/rows.jsonl" --tasks "$TASKS" \
    --dtype "$DTYPE" ${LR:+--lr "$LR"} ${EPOCHS:+--epochs "$EPOCHS"} ${BATCH:+--batch-size "$BATCH"} \
    ${ROWS:+--max-train-rows "$ROWS"} ${EVAL_EVERY:+--eval-every "$EVAL_EVERY" --save-every "$EVAL_EVERY"} \
    --out "$WORK/train" --resume auto

# The best adapter, on the NF4 base it was trained on, merged for generation.
[ -f "$WORK/finetuned/metrics.json" ] || \
  $PY evaluate.py --model "$GGUF" --quant nf4 --adapter "$WORK/train/best" \
    --model-name "SmolLM2-135M-Instruct + QLoRA (ours)" --dataset "$WORK/rows.jsonl" \
    --tasks "$TASKS" --settings "$SETTINGS" --max-new-tokens "$MAX_NEW" --out "$WORK/finetuned"

mkdir -p "$REPORT"
$PY experiments/smollm2-135m-real/report.py --work "$WORK" --out "$REPORT"
[ -f "$REPORT/decision.md" ] || \
  $PY experiments/smollm2-135m-real/decision.py --work "$WORK" --adapter "$WORK/train/best" --out "$REPORT/decision.md"
