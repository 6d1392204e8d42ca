#!/usr/bin/env bash
# Walmart-Amazon product matching, end to end, through the custom-task path: rows and task spec, SmolLM2-135M-Instruct
# zero-shot, QLoRA training on the train split (best adapter by validation loss on valid), evaluation on all 2,049
# test pairs (greedy, and with a threshold on p(yes) chosen on valid), the baselines, the GGUF export scored too.
#
#   bash experiments/walmart-amazon-135m/run.sh PATH/TO/walmart_amazon [WORKDIR]
#
# WORKDIR (default runs/walmart-amazon-135m) receives rows.jsonl, task_spec.json, zero-shot/, train/ (2 epochs),
# train-3ep/ (the same run continued to 3: the result), finetuned*/ and export*/ of each, baselines.json. Each step is skipped when its output is already there; a stopped
# training run resumes exactly (--resume auto). The training recipe is train.json here (train.py --config);
# environment: NEG negatives per match in the train split [3], EPOCHS, LR, BATCH sequences per step [train.json's].
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${1:?usage: run.sh PATH/TO/walmart_amazon [WORKDIR]}
WORK=${2:-runs/walmart-amazon-135m}
PY=${PY:-.venv/bin/python}
HERE=experiments/walmart-amazon-135m
GGUF=$($PY -c "from model.gguf import packaged_smollm2; print(packaged_smollm2())")
DTYPE=fp32   # bf16 where the CPU multiplies it natively (AMX, AVX512-BF16) or on a GPU
grep -qw -e amx_bf16 -e avx512_bf16 /proc/cpuinfo 2>/dev/null && DTYPE=bf16
$PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" && DTYPE=bf16

[ -f "$WORK/rows.jsonl" ] || $PY $HERE/make_rows.py "$SRC" "$WORK" --train-negatives-per-match "${NEG:-3}"

# The paper's QLoRA (NF4 base, LoRA r16/alpha16/dropout 0.1 on the seven projections and lm_head, AdamW, cosine with
# 5% warm-up), scaled to the data; the best adapter by validation loss on 400 pairs of valid.
[ -f "$WORK/train/adapter/adapter_model.safetensors" ] || \
  $PY train.py --config $HERE/train.json --model "$GGUF" --dataset "$WORK/rows.jsonl" --dtype "$DTYPE" \
    ${EPOCHS:+--epochs "$EPOCHS"} ${LR:+--lr "$LR"} ${BATCH:+--batch-size "$BATCH"} --out "$WORK/train" --resume auto

# Then a third epoch (the validation loss still fell at the end of the second): the run copied to train-3ep and
# continued there with --epochs 3 (--resume auto; the cosine then follows the 432-step schedule from step 288).
[ -d "$WORK/train-3ep" ] || cp -a "$WORK/train" "$WORK/train-3ep"
grep -q '"total_steps": 432' "$WORK/train-3ep/config.json" || \
  $PY train.py --config $HERE/train.json --model "$GGUF" --dataset "$WORK/rows.jsonl" --dtype "$DTYPE" --epochs 3 \
    --out "$WORK/train-3ep" --resume auto

# The baselines: always "match", and string-similarity rules fit on train.
[ -f "$WORK/baselines.json" ] || $PY $HERE/baselines.py "$SRC" --out "$WORK/baselines.json"

# All 2,049 test pairs: zero-shot and fine-tuned (the best adapter by validation loss, on the NF4 base it was trained
# on), greedy; the fine-tuned model also with --decode threshold (p(yes) >= t, t chosen on all 2,049 valid pairs).
SPEC=(--dataset "$WORK/rows.jsonl" --tasks walmart_amazon --task-spec "$WORK/task_spec.json" --max-new-tokens 4)
[ -f "$WORK/zero-shot/metrics.json" ] || \
  $PY evaluate.py --model "$GGUF" --model-name "SmolLM2-135M-Instruct zero-shot" "${SPEC[@]}" --out "$WORK/zero-shot"
[ -f "$WORK/finetuned/metrics.json" ] || \
  $PY evaluate.py --adapter "$WORK/train/best" --model-name "SmolLM2-135M-Instruct + QLoRA" "${SPEC[@]}" \
    --out "$WORK/finetuned"
[ -f "$WORK/finetuned-threshold/metrics.json" ] || \
  $PY evaluate.py --adapter "$WORK/train/best" --model-name "SmolLM2-135M-Instruct + QLoRA, threshold" "${SPEC[@]}" \
    --decode threshold --out "$WORK/finetuned-threshold"
for n in finetuned-3ep finetuned-3ep-threshold; do   # the 3-epoch adapter (the result), greedy and with the threshold
  [ -f "$WORK/$n/metrics.json" ] || $PY evaluate.py --adapter "$WORK/train-3ep/best" \
    --model-name "SmolLM2-135M-Instruct + QLoRA, 3 epochs" "${SPEC[@]}" \
    $([ $n = finetuned-3ep-threshold ] && echo --decode threshold) --out "$WORK/$n"
done

# The adapter merged into its base as a GGUF file (f16), scored like any model (greedy, bf16 like the adapter's run).
[ -f "$WORK/export/model.gguf" ] || $PY export.py --adapter "$WORK/train/best" --format gguf --out "$WORK/export/model.gguf"
[ -f "$WORK/finetuned-gguf/metrics.json" ] || \
  $PY evaluate.py --model "$WORK/export/model.gguf" --model-name "QLoRA merged, GGUF f16" "${SPEC[@]}" --dtype "$DTYPE" \
    --out "$WORK/finetuned-gguf"
[ -f "$WORK/export-3ep/model.gguf" ] || \
  $PY export.py --adapter "$WORK/train-3ep/best" --format gguf --out "$WORK/export-3ep/model.gguf"
[ -f "$WORK/finetuned-3ep-gguf/metrics.json" ] || \
  $PY evaluate.py --model "$WORK/export-3ep/model.gguf" --model-name "QLoRA 3 epochs merged, GGUF f16" "${SPEC[@]}" \
    --dtype "$DTYPE" --out "$WORK/finetuned-3ep-gguf"
